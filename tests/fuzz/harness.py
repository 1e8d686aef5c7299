"""The fuzz run's pieces: the server's settings, what it seeds there, the ids it feeds the generator,
how it checks the jobs the cases started, and its tally.

``make fuzz`` and the short run in ``make test`` run the same tests (``test_openapi_fuzz.py``). They differ
in ``FUZZ_CASES`` (how many cases the fuzzing phase generates, spread over the operations; the coverage
phase adds its own boundary cases on top), ``FUZZ_SEED`` and ``FUZZ_JOBS_WAIT_S``.
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


def fuzz_seed() -> int:
    """FUZZ_SEED: a number replays that run's cases; ``random`` draws one (`make fuzz`); unset, the
    short run of `make test` uses 0, so that it asks the same questions every time."""
    raw = os.environ.get("FUZZ_SEED", "0")
    return random.SystemRandom().getrandbits(32) if raw == "random" else int(raw)


SEED = fuzz_seed()


def app_schema() -> dict[str, Any]:
    """The OpenAPI schema of the app as the fuzz server runs it (with API keys, so with security).

    Built in-process because the tests are generated at collection time, before the server runs;
    ``test_served_schema_is_the_fuzzed_one`` checks that the server serves exactly this schema.
    """
    from sqft_service.app import create_app
    from sqft_service.settings import Settings

    return create_app(Settings(api_key=API_KEY)).openapi()


def operation_count() -> int:
    return sum(len(methods) for methods in app_schema()["paths"].values())


def examples_per_operation() -> int:
    """The fuzzing phase's ``max_examples``: FUZZ_CASES spread evenly over the operations."""
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
    # Small quotas: the job queue stays short, and the 429 answers get exercised too.
    "SQFT_MAX_UNFINISHED_JOBS": "8",
    "SQFT_MAX_FILES": "30",
}
# After the cases, how long the jobs they started get to end (then the rest are cancelled), and how
# long a fuzzed fine-tune may run before it is cancelled to let the queue move.
JOBS_WAIT_S = float(os.environ.get("FUZZ_JOBS_WAIT_S", 60))
FINE_TUNE_RUN_S = 15.0
# How a job ends when its process raised something other than a UserError: the client's input crashed
# it (with `wait`, extract / merge / sparsify answer that with a 500).
CRASH_CODES = {"fine_tune_failed", "extract_failed", "merge_failed", "sparsify_failed", "job_crashed"}
UNFINISHED = {"validating_files", "queued", "running", "paused"}

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

    model_dir: str = ""
    file_ids: list[str] = field(default_factory=list)
    filenames: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    operation_ids: list[str] = field(default_factory=list)
    eval_ids: list[str] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    output_item_ids: list[str] = field(default_factory=list)
    completion_ids: list[str] = field(default_factory=list)

    def pools(self, method: str) -> dict[str, list[str]]:
        files = self.file_ids + self.filenames
        return {
            # DELETE gets only the file kept for it: deleting the others would turn later cases into 404s.
            "file_id": self.file_ids[-1:] if method == "DELETE" else self.file_ids,
            "job_id": self.job_ids,
            "operation_id": self.operation_ids,
            "fine_tuning_job_id": self.job_ids,
            "training_file": files,
            "validation_file": files,
            "calibration_file": files,
            "model": [self.model_dir],
            "after": self.file_ids + self.job_ids + self.operation_ids + self.eval_ids + self.run_ids,
            # DELETE gets the eval kept for it (the other holds the run).
            "eval_id": self.eval_ids[-1:] if method == "DELETE" else self.eval_ids,
            "run_id": self.run_ids,
            "output_item_id": self.output_item_ids,
            "completion_id": self.completion_ids[-1:] if method == "DELETE" else self.completion_ids,
        }

    def substitute(self, case: Any, seed: int) -> Any:
        """``case`` with some of its ids replaced by existing ones (``seed`` picks which, so Hypothesis
        can replay and shrink it). Positive cases only: a negative case stays as invalid as generated."""
        meta = getattr(case, "meta", None)
        if seed % 3 == 0 or meta is None or not meta.generation.mode.is_positive:
            return case
        rng = random.Random(seed)
        pools = self.pools(case.operation.method.upper())
        body = case.body if isinstance(case.body, dict) else {}
        if "training_file" in body:
            # A create-job body with every section filled at random is refused for one value or
            # another; without some of them (all optional) it can pass and start a job.
            for name in ("General", "Dataset", "Training", "method", "integrations"):
                if rng.random() < 0.7:
                    body.pop(name, None)
            body.setdefault("model", None)  # optional, but a job needs it (or General.base_model)
        for container in (case.path_parameters, case.query, body):
            for name in list(container or {}):
                if pools.get(name) and rng.random() < 0.8:
                    container[name] = rng.choice(pools[name])
        return case


def seed_server(url: str, tmp: Path, model_dir: Path, known: Known) -> None:
    """Upload files, train one tiny NLS job to success, and start an extract operation from it."""
    known.model_dir = str(model_dir)
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
        uploads = [
            (write_json(tmp / "alpaca.json", alpaca_records(16)), "fine-tune"),
            (write_jsonl(tmp / "colors.jsonl", alpaca_records(8)), "fine-tune"),
            # the last one is the file that DELETE cases may delete
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
        seed_evals(http, known)
        for text in ("kept", "for DELETE"):  # stored chat completions of the seed job's model
            chat = {"model": job["fine_tuned_model"], "messages": [{"role": "user", "content": text}], "max_tokens": 2}
            resp = http.post("/v1/chat/completions", json={**chat, "store": True, "metadata": {"seed": text}})
            assert resp.status_code == 200, resp.text
            known.completion_ids.append(resp.json()["id"])


def seed_evals(http: httpx.Client, known: Known) -> None:
    """Two evals (the last one for DELETE cases), and a graded run of the first one."""
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    grader = {"type": "string_check", "name": "eq", "input": "{{ sample.output_text }}", "reference": "{{ item.a }}"}
    for name in ("kept", "for DELETE"):
        body = {
            "name": name,
            "data_source_config": {"type": "custom", "item_schema": schema, "include_sample_schema": True},
            "testing_criteria": [{**grader, "operation": "eq"}],
        }
        resp = http.post("/v1/evals", json=body)
        assert resp.status_code == 200, resp.text
        known.eval_ids.append(resp.json()["id"])
    rows = [{"item": {"a": a}, "sample": {"output_text": "x"}} for a in ("x", "y")]
    source = {"type": "jsonl", "source": {"type": "file_content", "content": rows}}
    runs = f"/v1/evals/{known.eval_ids[0]}/runs"
    resp = http.post(runs, json={"data_source": source})
    assert resp.status_code == 200, resp.text
    run_id = resp.json()["id"]
    run = wait_until(
        lambda: (r := http.get(f"{runs}/{run_id}").json())["status"] in ("completed", "failed") and r,
        120,
        what="the seed eval run",
    )
    assert run["status"] == "completed", run
    known.run_ids.append(run_id)
    known.output_item_ids += [i["id"] for i in http.get(f"{runs}/{run_id}/output_items").json()["data"]]


def settle_jobs(url: str, wait_s: float) -> list[dict[str, Any]]:
    """Let the jobs and operations the fuzzed requests started run (up to ``wait_s``; a fine-tune for
    ``FINE_TUNE_RUN_S``), cancel what is left, and return every one that ended as a crash."""
    deadline = time.monotonic() + wait_s
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:

        def everything() -> list[dict[str, Any]]:
            jobs = http.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]
            ops = http.get("/v1/finetune/operations", params={"limit": 100}).json()["data"]
            return [{**j, "kind": "fine_tune"} for j in jobs] + ops

        while time.monotonic() < deadline:
            pending = [j for j in everything() if j["status"] in UNFINISHED]
            if not pending:
                break
            for job in pending:
                started = job.get("started_at")
                if job["kind"] == "fine_tune" and (
                    job["status"] == "paused" or (started and time.time() - started > FINE_TUNE_RUN_S)
                ):
                    http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
            time.sleep(1)
        for job in everything():
            if job["status"] in UNFINISHED:
                route = "/v1/fine_tuning/jobs" if job["kind"] == "fine_tune" else "/v1/finetune/operations"
                http.post(f"{route}/{job['id']}/cancel")
        crashed = [
            j for j in everything() if j["status"] == "failed" and (j.get("error") or {}).get("code") in CRASH_CODES
        ]
        for job in crashed:
            route = "/v1/fine_tuning/jobs" if job["kind"] == "fine_tune" else "/v1/finetune/operations"
            job["log_tail"] = http.get(f"{route}/{job['id']}/log").text[-3000:]
    return crashed


@dataclass
class Tally:
    """Cases per operation, the statuses they got, and the failures (one message per distinct failure)."""

    cases: Counter[str] = field(default_factory=Counter)
    phases: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    statuses: dict[str, Counter[int | str]] = field(default_factory=lambda: defaultdict(Counter))
    failures: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    started: float = field(default_factory=time.monotonic)
    log_path: str | None = None  # the fuzz server's log (tracebacks of any 500)

    def record(self, label: str, phase: str, status: int | None) -> None:
        self.cases[label] += 1
        self.phases[label][phase] += 1
        self.statuses[label][status if status is not None else "error"] += 1

    def fail(self, label: str, message: str) -> None:
        if message not in self.failures[label]:
            self.failures[label].append(message)

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    def by_phase(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for per_operation in self.phases.values():
            counts.update(per_operation)
        return counts

    def report(self) -> str:
        width = max((len(label) for label in self.cases), default=10)
        names = sorted(self.by_phase())
        header = f"({'/'.join(names)})"
        lines = [f"{'operation':<{width}}  cases  {header}  statuses"]
        for label in sorted(self.cases, key=lambda lab: (lab.split(" ", 1)[1], lab)):
            phases = "/".join(str(self.phases[label][p]) for p in names)
            statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses[label].items(), key=str))
            lines.append(f"{label:<{width}}  {self.cases[label]:>5}  {phases:>{len(header)}}  {statuses}")
        n_failures = sum(len(v) for v in self.failures.values())
        phases = ", ".join(f"{phase} {n}" for phase, n in sorted(self.by_phase().items()))
        lines.append(
            f"total: {self.total} cases ({phases}) over {len(self.cases)} operations "
            f"in {time.monotonic() - self.started:.0f} s; failures: {n_failures}; FUZZ_SEED={SEED}"
        )
        if self.log_path:
            lines.append(f"server log: {self.log_path}")
        for label, messages in self.failures.items():
            for message in messages:
                lines.append(f"FAILED {label}: {message}")
        return "\n".join(lines)


TALLY = Tally()
# Filled by the `fuzz_server` fixture once the seed objects exist, read by the generator's hook.
KNOWN = Known()
