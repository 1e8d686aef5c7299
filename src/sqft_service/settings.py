"""One Settings object. Every field is settable as ``SQFT_<FIELD>`` (``SQFT_MAX_CONCURRENT_JOBS=2``);
``sqft serve`` has flags for the common ones (host, port, data dir, concurrent jobs)."""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any


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
    max_upload_bytes: int = 512 * 1024 * 1024
    # Threads per job process (unset: the physical cores divided by max_concurrent_jobs).
    threads_per_job: int | None = None
    # How long extract/merge/sparsify requests wait for their result before answering 202 with the operation.
    operation_wait_s: float = 6 * 3600.0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f"SQFT_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f"SQFT_{f.name.upper()}", raw, f.default)
        settings = cls(**values)
        return replace(settings, max_concurrent_jobs=max(1, settings.max_concurrent_jobs))

    def with_overrides(self, **overrides: object) -> Settings:
        known = {f.name for f in fields(self)}
        clean = {k: v for k, v in overrides.items() if k in known and v is not None}
        return replace(self, **clean)

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
    def model_cache_dir(self) -> Path:
        return self.data_dir / "models"

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.files_dir, self.jobs_dir, self.model_cache_dir):
            d.mkdir(parents=True, exist_ok=True)


def _parse(name: str, raw: str, default: Any) -> Any:
    """``raw`` as the type of the field's default; a bad value stops the service with the variable named."""
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
