"""The fuzz run's pieces: what it seeds in the real server, the ids it feeds the generator, its tally.

``make fuzz`` and the short run in ``make test`` run the same test (``test_openapi_fuzz.py``); they differ
only in ``FUZZ_CASES``, the number of cases the run must reach in total (spread over the operations).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import alpaca_records, wait_until, write_json, write_jsonl

API_KEY = "fuzz-" + "k" * 40
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# The short run of `make test`; `make fuzz` sets FUZZ_CASES=1000.
DEFAULT_CASES = 300


def target_cases() -> int:
    return int(os.environ.get("FUZZ_CASES", DEFAULT_CASES))


def operation_count() -> int:
    """How many operations the schema has (built in-process: the same routes the server serves)."""
    from sqft_service.app import create_app
    from sqft_service.settings import Settings

    schema = create_app(Settings(api_key=API_KEY)).openapi()
    return sum(len(methods) for methods in schema["paths"].values())


def examples_per_operation() -> int:
    """The fuzzing phase's ``max_examples``: the target spread evenly (explicit examples and the
    coverage phase add their own cases on top)."""
    return max(1, math.ceil(target_cases() / operation_count()))


# The fuzz server's settings: one job at a time, one thread each, short waits, a small upload limit.
SERVER_ENV = {
    "SQFT_API_KEY": API_KEY,
    "SQFT_MAX_CONCURRENT_JOBS": "1",
    "SQFT_THREADS_PER_JOB": "1",
    "SQFT_POLL_INTERVAL_S": "0.1",
    "SQFT_CANCEL_GRACE_S": "2",
    # extract / merge / sparsify requests that wait answer 202 after a second instead of hours
    "SQFT_OPERATION_WAIT_S": "1",
    "SQFT_MAX_UPLOAD_BYTES": str(1 << 20),
    "SQFT_CHECKPOINT_INTERVAL_S": "3600",
}

NLS_LORA = {
    "r": 16,
    "neural_lora_search": True,
    "target_module_groups": [["q_proj", "k_proj", "v_proj"], ["up_proj"], ["down_proj"]],
    "search_space": ["16,12,8", "16,12,8", "16,12,8"],
}


@dataclass
class Known:
    """Ids and paths that exist on the fuzz server: the generator uses them in some positive cases,
    so that the routes answer about real objects, not only 404."""

    model_dir: str
    file_ids: list[str] = field(default_factory=list)
    filenames: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    operation_ids: list[str] = field(default_factory=list)

    def pools(self) -> dict[str, list[str]]:
        files = self.file_ids + self.filenames
        return {
            "file_id": self.file_ids,
            "job_id": self.job_ids,
            "operation_id": self.operation_ids,
            "fine_tuning_job_id": self.job_ids,
            "training_file": files,
            "validation_file": files,
            "calibration_file": files,
            "model": [self.model_dir],
            "after": self.file_ids + self.job_ids + self.operation_ids,
        }

    def substitute(self, case: Any, seed: int) -> Any:
        """``case`` with some of its ids replaced by existing ones (``seed`` picks which, so Hypothesis
        can replay and shrink it). Positive cases only: a negative case stays as invalid as generated."""
        meta = getattr(case, "meta", None)
        if seed % 2 == 0 or meta is None or not meta.generation.mode.is_positive:
            return case
        rng = random.Random(seed)
        pools = self.pools()
        for container in (case.path_parameters, case.query):
            for name in list(container or {}):
                if pools.get(name) and rng.random() < 0.8:
                    container[name] = rng.choice(pools[name])
        if isinstance(case.body, dict):
            for name in list(case.body):
                if pools.get(name) and rng.random() < 0.8:
                    case.body[name] = rng.choice(pools[name])
        return case


def seed_server(url: str, tmp: Path, model_dir: Path) -> Known:
    """Upload files, train one tiny NLS job to success, and start an extract operation from it."""
    known = Known(model_dir=str(model_dir))
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
        uploads = [
            (write_json(tmp / "alpaca.json", alpaca_records(16)), "fine-tune"),
            (write_jsonl(tmp / "colors.jsonl", alpaca_records(8)), "fine-tune"),
            (write_jsonl(tmp / "notes.jsonl", [{"note": "not training data"}]), "batch"),
        ]
        for path, purpose in uploads:
            with open(path, "rb") as handle:
                resp = http.post("/v1/files", files={"file": (path.name, handle)}, data={"purpose": purpose})
            assert resp.status_code == 200, resp.text
            known.file_ids.append(resp.json()["id"])
            known.filenames.append(path.name)
        body = {
            "training_file": known.file_ids[0],
            "model": str(model_dir),
            "General": {"lora_config": NLS_LORA},
            "Training": {"max_train_steps": 2, "batch_size": 4, "learning_rate": 1e-3},
        }
        resp = http.post("/v1/fine_tuning/jobs", json=body)
        assert resp.status_code == 200, resp.text
        job_id = resp.json()["id"]

        def finished() -> dict | None:
            job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        job = wait_until(finished, 180, interval=0.3, what="the seed job to finish")
        assert job["status"] == "succeeded", job
        known.job_ids.append(job_id)
        resp = http.post(
            "/v1/finetune/extract_adapter",
            json={"fine_tuning_job_id": job_id, "sub_adapter_version": "minimal", "wait": False},
        )
        assert resp.status_code == 202, resp.text
        known.operation_ids.append(resp.json()["id"])
    return known


@dataclass
class Tally:
    """Cases per operation, the statuses they got, and the failures (one message per distinct failure)."""

    cases: Counter = field(default_factory=Counter)
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    failures: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    started: float = field(default_factory=time.monotonic)
    log_path: str | None = None  # the fuzz server's log (tracebacks of any 500)

    def record(self, label: str, status: int | None) -> None:
        self.cases[label] += 1
        self.statuses[label][status if status is not None else "error"] += 1

    def fail(self, label: str, message: str) -> None:
        if message not in self.failures[label]:
            self.failures[label].append(message)

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    def report(self) -> str:
        width = max((len(label) for label in self.cases), default=10)
        lines = [f"{'operation':<{width}}  cases  statuses"]
        for label in sorted(self.cases, key=lambda lab: (lab.split(" ", 1)[1], lab)):
            statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses[label].items(), key=str))
            lines.append(f"{label:<{width}}  {self.cases[label]:>5}  {statuses}")
        n_failures = sum(len(v) for v in self.failures.values())
        lines.append(
            f"total: {self.total} cases over {len(self.cases)} operations in {time.monotonic() - self.started:.0f} s; "
            f"failures: {n_failures}"
        )
        if self.log_path:
            lines.append(f"server log: {self.log_path}")
        for label, messages in self.failures.items():
            for message in messages:
                lines.append(f"FAILED {label}: {message}")
        return "\n".join(lines)


TALLY = Tally()
