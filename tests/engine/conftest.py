"""Engine fixtures come from the root conftest (`pytest_plugins`): one vLLM per session."""
