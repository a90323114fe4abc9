# One command to set up and run, one to test. Creates .venv with the CPU torch where there is no GPU.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Without a GPU (no nvidia-smi) torch comes as the CPU build; `make run TORCH_SPEC=torch` for another.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo --extra-index-url https://download.pytorch.org/whl/cpu)
DEPLOY_APT := podman buildah runc debootstrap nginx prometheus

BROWSER_APT := chromium chromium-driver

.PHONY: setup run test test-deploy browser-deps bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Re-installs only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/python -m server $(ARGS)

test: setup
	$(BIN)/ruff check model server weights bench tests
	$(BIN)/python -m pytest -q -m "not deploy" $(PYTEST_ARGS)

# Containers (Podman), nginx scale-out, Prometheus scrape and config validators.
test-deploy: setup
	$(BIN)/pip install -q -e ".[deploy]"
	@missing=""; for p in $(DEPLOY_APT); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing (install them to run every deployment check)"; fi; \
	fi
	$(BIN)/python -m pytest -q -m deploy $(PYTEST_ARGS)

# Debian's Chromium for the playground's browser tests (they skip, saying why, without it).
browser-deps:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_APT) >/dev/null; \
	  else echo "chromium missing: browser tests will be skipped (apt-get install $(BROWSER_APT))"; fi; \
	fi

bench: setup
	$(BIN)/pip install -q -e ".[bench]"
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.serve

clean:
	rm -rf $(VENV) .cache artifacts
