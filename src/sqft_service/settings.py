"""One Settings object: environment variables (``SQFT_*``) with matching CLI flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not an integer") from None


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8015
    data_dir: Path = Path("./sqft-data")
    max_concurrent_jobs: int = 1
    # Seconds between SIGTERM and SIGKILL when a job is cancelled.
    cancel_grace_s: float = 10.0
    # How often the job manager looks at its subprocesses and the queue.
    poll_interval_s: float = 0.5
    max_upload_bytes: int = 512 * 1024 * 1024
    # Threads per job process (None: torch's default, i.e. all cores divided by concurrent jobs).
    threads_per_job: int | None = None

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            host=os.environ.get("SQFT_HOST", cls.host),
            port=_env_int("SQFT_PORT", cls.port),
            data_dir=Path(os.environ.get("SQFT_DATA_DIR", str(cls.data_dir))),
            max_concurrent_jobs=max(1, _env_int("SQFT_MAX_CONCURRENT_JOBS", cls.max_concurrent_jobs)),
            cancel_grace_s=float(os.environ.get("SQFT_CANCEL_GRACE_S", cls.cancel_grace_s)),
        )

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
