"""Where a job's files live. No other module spells a job file name.

A job owns one directory under the data dir (``jobs/<job-id>/``)::

    spec.json       what to run: {"kind": ..., "params": ...} (written by the manager at launch)
    job.log         the job process's stdout and stderr (downloadable through the API)
    outcome.json    how it ended (``jobs.outcome.JobOutcome``), written once by the job process
    secrets.json    secrets kept out of the stored config (``job_secrets.py``), mode 0600
    journal.jsonl   events, checkpoints and progress of a job that must not write the store itself
                    (a Ray job, possibly on another node: ``jobs/journal.py``), read by the manager
    stop-request    a Ray Train job's stop, for its workers outside the job's process group
    ray-train/      Ray Train's run directory (``RunConfig.storage_path``) of a multi-worker Ray job
    output/         a fine-tune's artifacts (:class:`TrainingOutputs`)

The layout is shared by the service (``jobs/``, ``api/``) and the job process (``training/``), so it
lives at the top of the package and imports nothing but the standard library.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# An NLS super-adapter's search space, beside its PEFT files (written by ``adapters/nls/config.py``;
# the API checks for it before an extract, without importing torch).
ELASTIC_CONFIG_FILE = "elastic_adapter_config.json"


# A fine-tune of a fine-tuned adapter: the adapter merged into its base, written by the job before it trains.
PARENT_MERGED_DIR = "parent_merged"


@dataclass(frozen=True)
class TrainingOutputs:
    """What a fine-tune writes: under a job's ``output/``, or under ``sqft train --output``."""

    root: Path

    @property
    def adapter(self) -> Path:
        """The final adapter (stock PEFT format; NLS jobs add their search files)."""
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    @property
    def resume_state(self) -> Path:
        """The rolling resume point (adapter + trainer state), rewritten every few minutes and on stop."""
        return self.root / "resume-state"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def training_config(self) -> Path:
        return self.root / "training_config.json"

    def sub_adapter(self, version: str) -> Path:
        """An NLS sub-adapter extracted from the super-adapter (``version``: maximal, heuristic, ...)."""
        return self.root / version

    def merged_model(self, version: str | None = None) -> Path:
        """The base with the adapter (or the named sub-adapter) merged in."""
        return (self.sub_adapter(version) if version else self.root) / "merged_model"

    @classmethod
    def reserved_names(cls) -> frozenset[str]:
        """What a fine-tune writes at the top of ``output/``: a sub-adapter named so would overwrite it.

        Read off the properties above (and ``merged_model``), so a new output entry is reserved too.
        """
        probe = cls(Path("/"))
        names = {getattr(probe, name).name for name, attr in vars(cls).items() if isinstance(attr, property)}
        return frozenset({*names, probe.merged_model().name})


@dataclass(frozen=True)
class JobWorkspace:
    """Every path of one job."""

    root: Path

    @classmethod
    def for_job(cls, jobs_dir: Path, job_id: str) -> JobWorkspace:
        return cls((Path(jobs_dir) / job_id).resolve())

    @property
    def spec(self) -> Path:
        return self.root / "spec.json"

    @property
    def log(self) -> Path:
        return self.root / "job.log"

    @property
    def outcome(self) -> Path:
        return self.root / "outcome.json"

    @property
    def journal(self) -> Path:
        return self.root / "journal.jsonl"

    @property
    def ray_stop_request(self) -> Path:
        return self.root / "stop-request"

    @property
    def ray_train_dir(self) -> Path:
        return self.root / "ray-train"

    @property
    def secrets(self) -> Path:
        """The job's secrets (``General.config.token``), mode 0600, read by the job process only."""
        return self.root / "secrets.json"

    @property
    def output(self) -> TrainingOutputs:
        return TrainingOutputs(self.root / "output")

    def create(self) -> JobWorkspace:
        self.root.mkdir(parents=True, exist_ok=True)
        return self


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` so that a reader sees the old file or the whole new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def staging_dir_for(target: Path) -> Path:
    """A fresh sibling of ``target`` to build it in before :func:`publish_dir` puts it in place."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}.staging")


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """Build ``target`` in a staging directory: published by :func:`publish_dir` if the block ends
    normally, removed if it raises (a failed merge must not leave a model's worth of files behind)."""
    staging = staging_dir_for(target)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_dir(staging, target)


def publish_dir(staging: Path, target: Path) -> Path:
    """Replace ``target`` by the finished ``staging`` directory.

    Readers never see a half-written model: the new directory appears by one rename, and an old one is
    renamed away first (directories cannot be replaced in one rename), then deleted.
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
