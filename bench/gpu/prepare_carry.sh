#!/usr/bin/env bash
# Fill .gpu-carry/ (git-ignored) with what the GPU machine lacks, on the CPU machine, before a device run:
#   tokenizer/  SmolLM2's tokenizer, read from the GGUF here (the GPU image has no gguf package; models
#               are not carried: bench/gpu and tests/gpu build random-initialised ones there)
#   data/       ARC-E and GSM8K from ../shared/data (which does not travel)
#   wheels/     pydantic (+ core, annotated-types, typing-inspection), and the peft and transformers
#               versions this checkout is tested with (the image's may differ); the service's own
#               packages (FastAPI, uvicorn, httpx, llguidance, jsonschema, ...: tests/gpu/test_gpu_service.py runs `sqft serve`;
#               Pillow for the image tests)
# About 36 MB: well under the 64 MiB a device call carries. Then run bench/gpu/device_run.sh there.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
CARRY=.gpu-carry
mkdir -p "$CARRY/data" "$CARRY/wheels"
for root in ../shared/data /work/shared/data; do
  if [ -f "$root/arce_train_instruct.json" ]; then cp "$root"/arce_train_instruct.json "$root"/gsm8k_train.jsonl "$CARRY/data/"; break; fi
done
test -f "$CARRY/data/arce_train_instruct.json" || { echo "no ARC-E/GSM8K data found" >&2; exit 1; }
"$PY" - "$CARRY/tokenizer" <<'PYEOF'
import sys
from transformers import AutoTokenizer
from bench.throughput.inputs import default_model
gguf = default_model()
AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(sys.argv[1])
PYEOF
pins=$("$PY" -c 'from importlib.metadata import version as v
names = ("pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing_extensions", "peft",
         "transformers", "fastapi", "starlette", "annotated-doc", "opentelemetry-api", "anyio", "sniffio", "idna",
         "uvicorn", "h11", "click", "python-multipart", "prometheus_client", "python-json-logger", "httpx",
         "httpcore", "certifi", "llguidance", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py",
         "attrs", "pillow")
print(" ".join(f"{n}=={v(n)}" for n in names))')
rm -f "$CARRY"/wheels/*.whl
# The GPU image's Python is 3.12 (x86-64); see /work/.library/device/README.md.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$CARRY/wheels" $pins
du -sh "$CARRY"
