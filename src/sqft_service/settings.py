"""One Settings object. Every field is settable as ``SQFT_<FIELD>`` (``SQFT_MAX_CONCURRENT_JOBS=2``);
``sqft serve`` has flags for the common ones (host, port, data dir, concurrent jobs)."""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

INFERENCE_DTYPES = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8015
    data_dir: Path = Path("./sqft-data")
    # Jobs of any kind (fine-tune, extract, merge, sparsify) that run at once; the rest wait queued.
    max_concurrent_jobs: int = 1
    # Seconds between SIGTERM and SIGKILL when a job is cancelled.
    cancel_grace_s: float = 10.0
    # How often the job manager looks at its job processes and the queue.
    poll_interval_s: float = 0.5
    # Seconds an idle keep-alive connection stays open. Longer than clients keep theirs (httpx and the
    # openai SDK: 5 s, proxies often 60 s): at uvicorn's own 5 s a client could reuse a connection the
    # server was closing and get a reset (seen by `make load` as a rare ReadError).
    keep_alive_s: int = 75
    # Largest upload in MiB. It is enforced while the body is read, so a bigger one is cut off there.
    max_upload_mb: int = 512
    # The same limit in bytes; when set it wins over max_upload_mb (tests use small limits).
    max_upload_bytes: int | None = None
    # Largest JSON request body, checked as it arrives (413); nothing a client sends here is bigger.
    max_json_bytes: int = 1024 * 1024
    # ... for the routes that take images as base64 (chat completions, responses): OpenAI's 20 MB per image.
    max_media_json_bytes: int = 20 * 1024 * 1024
    # Threads per job process (unset: the physical cores divided by max_concurrent_jobs).
    threads_per_job: int | None = None
    # Per project (API key; the whole service without keys): jobs of any kind not yet ended (queued,
    # running, paused) and stored files. Beyond them creation answers 429: a queue that only grows
    # would hold the machine for days, and files fill the disk.
    max_unfinished_jobs: int = 100
    max_files: int = 10000
    # Stored chat completions (`store: true`) and stored responses are deleted this many days after they
    # were created, as OpenAI keeps them 30 days; 0 keeps them until deleted. The sweep runs every minute.
    stored_retention_days: float = 30.0
    # Seconds a batch has to end in (OpenAI's `completion_window`, which is "24h"): the requests not answered
    # by then go to its error file as `batch_expired` and the batch ends `expired`, queued or running.
    batch_window_s: float = 24 * 3600.0
    # How often a running fine-tune writes its rolling resume point (it also writes one when stopped).
    checkpoint_interval_s: float = 300.0
    # Launches of one job's process before a job that keeps dying (crash, kill -9, OOM) is failed.
    max_job_attempts: int = 3
    # How long extract/merge/sparsify requests wait for their result before answering 202 with the operation.
    operation_wait_s: float = 6 * 3600.0
    # API keys, comma-separated, each `key` or `project:key` (api/auth.py). Empty: no authentication,
    # and `sqft serve` only binds to loopback. Kept out of repr so the keys never reach a log.
    api_key: str = field(default="", repr=False)
    # Directories a request may name models in, besides the data dir's models/ and the bundled SmolLM2
    # (model_access.py); SQFT_MODEL_ROOTS lists them separated by os.pathsep (":" on Linux).
    model_roots: tuple[Path, ...] = ()
    # Hugging Face Hub ids as models (downloads); off, a Hub id is refused at once.
    allow_hub: bool = False
    # `General.config.trust_remote_code: true`, which runs Python shipped with a model, in the job process.
    allow_remote_code: bool = False
    # "text" or "json" (one JSON object per line, for log collectors): the service, uvicorn and job processes.
    log_format: str = "text"
    # GET /ready answers 503 when the data dir's file system has less free space than this (MiB).
    min_free_disk_mb: int = 256
    # The in-process inference engine (inference/engine.py): torch threads it uses, so that it leaves the
    # rest of the cores to training jobs, and requests that may wait behind the one generating (then 429).
    inference_threads: int = 2
    inference_queue: int = 8
    # Models (bases and merged models; adapters ride on their base) kept loaded, least recently used evicted.
    inference_max_models: int = 2
    # Where the engine serves models: "auto" (a CUDA GPU when torch sees one and the model fits in its free
    # memory, in bf16; else the CPU) or "cpu" (keeps the GPU to the training jobs).
    inference_device: str = "auto"
    # What the engine computes in: "auto" (bf16 where the device runs it natively: a GPU with bf16, else
    # fp16; a CPU with AVX512-BF16/AMX; fp32 on other CPUs), "bf16" (also on a CPU without it: slower),
    # or "fp32" (the model's full precision everywhere: log-probabilities to 1e-4 of an fp32 forward).
    # Batch, eval and judge jobs' engines compute in the same.
    inference_dtype: str = "auto"
    # The GPUs the subprocess runner hands out to job processes (jobs/gpus.py): "" all this service sees,
    # "none" none, or the machine's ids ("1,2,3", as nvidia-smi numbers them, or GPU UUIDs), e.g. to
    # keep GPU 0 for the inference engine.
    job_gpus: str = ""
    # Where jobs run: "subprocess" (a child process of this service) or "ray" (a Ray cluster, needs the
    # `ray` extra; jobs/ray_runner.py). ray_address is what `ray.init` takes: "auto" finds the cluster
    # `ray start` started on this machine, or "host:port" of the head node.
    runner: str = "subprocess"
    ray_address: str = "auto"
    ray_namespace: str = "sqft"

    def __post_init__(self) -> None:
        if self.log_format not in ("text", "json"):
            raise ValueError(f"SQFT_LOG_FORMAT={self.log_format!r} is not `text` or `json`")
        if self.inference_device not in ("auto", "cpu"):
            raise ValueError(f"SQFT_INFERENCE_DEVICE={self.inference_device!r} is not `auto` or `cpu`")
        if self.inference_dtype not in INFERENCE_DTYPES:
            listed = ", ".join(INFERENCE_DTYPES)
            raise ValueError(f"SQFT_INFERENCE_DTYPE={self.inference_dtype!r} is not one of {listed}")
        ids = self.job_gpu_ids
        if ids is not None and (len(set(ids)) != len(ids) or any(not i.replace("-", "").isalnum() for i in ids)):
            raise ValueError(
                f"SQFT_JOB_GPUS={self.job_gpus!r} is not a list of distinct GPU ids (`0,1`, GPU UUIDs) or `none`"
            )
        if self.stored_retention_days < 0:
            raise ValueError(f"SQFT_STORED_RETENTION_DAYS={self.stored_retention_days!r} is negative (0 keeps them)")
        if self.batch_window_s <= 0:
            raise ValueError(f"SQFT_BATCH_WINDOW_S={self.batch_window_s!r} is not a positive number of seconds")
        if self.runner not in ("subprocess", "ray"):
            raise ValueError(f"SQFT_RUNNER={self.runner!r} is not `subprocess` or `ray`")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f"SQFT_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f"SQFT_{f.name.upper()}", raw, f.default)
        try:
            settings = cls(**values)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        return replace(settings, max_concurrent_jobs=max(1, settings.max_concurrent_jobs))

    def with_overrides(self, **overrides: object) -> Settings:
        known = {f.name for f in fields(self)}
        clean = {k: v for k, v in overrides.items() if k in known and v is not None}
        return replace(self, **clean)

    @property
    def job_gpu_ids(self) -> list[str] | None:
        """``job_gpus`` as ids (None: every GPU this service sees; []: none)."""
        if not self.job_gpus.strip():
            return None
        if self.job_gpus.strip().lower() == "none":
            return []
        return [i.strip() for i in self.job_gpus.split(",")]

    @property
    def upload_limit_bytes(self) -> int:
        """The upload limit in effect: ``max_upload_bytes`` if set, else ``max_upload_mb`` MiB."""
        return self.max_upload_bytes if self.max_upload_bytes is not None else self.max_upload_mb * 1024 * 1024

    @property
    def db_path(self) -> Path:
        return self.data_dir / "sqft.db"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def uploads_dir(self) -> Path:
        """Parts of uploads not yet completed (api/uploads)."""
        return self.data_dir / "uploads"

    @property
    def model_cache_dir(self) -> Path:
        return self.data_dir / "models"

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.files_dir, self.jobs_dir, self.model_cache_dir):
            d.mkdir(parents=True, exist_ok=True)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse_bool(name: str, raw: str) -> bool:
    word = raw.strip().lower()
    if word not in _TRUE + _FALSE:
        raise SystemExit(f"{name}={raw!r} is not a boolean (use 1/true/yes or 0/false/no)")
    return word in _TRUE


def _parse(name: str, raw: str, default: Any) -> Any:
    """``raw`` as the type of the field's default; a bad value stops the service with the variable named."""
    # bool before int: bool is an int subclass, and int("true") would fail (or "0" read as a number).
    if isinstance(default, bool):
        return _parse_bool(name, raw)
    if isinstance(default, tuple):  # a list of directories
        return tuple(Path(p) for p in raw.split(os.pathsep) if p)
    if default is MISSING or default is None or (isinstance(default, int) and not isinstance(default, bool)):
        kind: type = int
    elif isinstance(default, float):
        kind = float
    elif isinstance(default, Path):
        return Path(raw)
    else:
        return raw
    try:
        return kind(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not {'an integer' if kind is int else 'a number'}") from None
