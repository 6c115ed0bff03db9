"""Engine fixtures for this directory (a root `pytest_plugins` entry would share them wider)."""

from tests.vllm_fixtures import tiny_model_dir, vllm_server

__all__ = ["tiny_model_dir", "vllm_server"]
