#!/usr/bin/env bash
# One GPU session's checks in one go: the GPU tests, then the benchmark, results under $OUT.
#
# Prepare here first (CPU machine): bash bench/gpu/prepare_carry.sh
# Then launch with the device tool, e.g.:
#   run(command="bash bench/gpu/device_run.sh", carry=[".gpu-carry"], timeout_s=420)
# It is sized to end within about 6.5 minutes (tests <= TESTS_S s; no new benchmark row after BENCH_S s,
# the last one cut at BENCH_S + 60 s), leaving device time for a rerun. ROWS picks the benchmark rows
# (shape:data:batch[:setup+setup]), most important first: SmolLM2-135M and Llama-1B with all four
# setups, then the Llama-3-8B rows (GSM8K batch 32: where HF ran out of memory on an H200), then
# ours_lora with torch.compile on two rows (first_step_s: the compile cost), then LoRA and SparsePEFT
# without dropout on a GEMM-bound row (SparsePEFT's fused path), if time is left.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/sqft-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
if [ -z "${SKIP_WHEELS:-}" ] && ls .gpu-carry/wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu-carry/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__)'
} 2>&1 | tee "$OUT/env.txt"

echo "== GPU tests"
# Most important first (a timeout cuts the rest): every method on CUDA, then serving, the service, data parallel.
GPU_TESTS="tests/gpu/test_gpu_training.py tests/gpu/test_gpu_serving.py tests/gpu/test_gpu_service.py tests/gpu/test_gpu_data_parallel.py"
test "$(ls tests/gpu/test_*.py | wc -l)" -eq 4 || GPU_TESTS=tests/gpu  # a new file: run them all
timeout "${TESTS_S:-180}" $PY -m pytest -p no:cacheprovider -q -m gpu $GPU_TESTS 2>&1 | tee "$OUT/tests.log"
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.log"

echo "== benchmark"
ROWS=${ROWS:-"smollm2-135m:arce:8,llama-3.2-1b:gsm8k:32,llama-3-8b:gsm8k:32:hf+ours_lora,llama-3-8b:gsm8k:8:hf+ours_lora,smollm2-135m:gsm8k:32:hf+ours_lora,llama-3.2-1b:arce:8:hf+ours_lora,smollm2-135m:arce:8:ours_lora_compile,llama-3.2-1b:gsm8k:32:ours_lora_compile,llama-3.2-1b:gsm8k:32:ours_lora_nodrop+ours_sparsepeft_nodrop"}
BENCH_S=${BENCH_S:-130}
TINY=()
if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA GPU here: a --tiny dry run of the script"; TINY=(--tiny); ROWS="tiny:arce:8,tiny:gsm8k:8:hf+ours_lora+ours_lora_compile+ours_lora_nodrop+ours_sparsepeft_nodrop"
fi
timeout $((BENCH_S + 60)) $PY -m bench.gpu "${TINY[@]}" --rows "$ROWS" --budget-s "$BENCH_S" --child-timeout-s 150 \
  --data-dir .gpu-carry/data --tokenizer .gpu-carry/tokenizer --out "$OUT" 2>&1 | tee "$OUT/bench.log"
echo "bench exit: ${PIPESTATUS[0]}"
