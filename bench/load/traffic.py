"""The concurrent clients, the clean-up of the jobs they created, and the checks that follow.

Each client is a coroutine with its own seeded RNG that sends its requests one after another over a
shared ``httpx.AsyncClient`` (one keep-alive connection per client). Nothing is retried: a request
that fails is an error, and a retried create could hide a duplicate. Every request is recorded
(route, status, seconds); each answer is also checked on the spot (ids, page shapes), and what does
not hold is an anomaly.

Uploads carry a unique filename and job creations a unique ``metadata.load_token``, so the
verification can count each of them in the listings and in the database: exactly once.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .seed import training_jsonl

UPLOAD = "POST /v1/files"
CREATE = "POST /v1/fine_tuning/jobs"
LIST_JOBS = "GET /v1/fine_tuning/jobs"
LIST_JOBS_AFTER = "GET /v1/fine_tuning/jobs?after="
RETRIEVE_JOB = "GET /v1/fine_tuning/jobs/{id}"
EVENTS = "GET /v1/fine_tuning/jobs/{id}/events"
LIST_FILES = "GET /v1/files"
RETRIEVE_FILE = "GET /v1/files/{id}"
CANCEL = "POST /v1/fine_tuning/jobs/{id}/cancel"

# Share of each route in a client's requests (weights, normalised when drawn).
DEFAULT_MIX: dict[str, float] = {
    UPLOAD: 10,
    CREATE: 5,
    LIST_JOBS: 15,
    LIST_JOBS_AFTER: 10,
    RETRIEVE_JOB: 20,
    EVENTS: 20,
    LIST_FILES: 10,
    RETRIEVE_FILE: 10,
}
FINAL = ("succeeded", "failed", "cancelled")
# Each created job trains one step of the tiny model: a real job process, as short as one can be.
JOB_TRAINING = {"max_train_steps": 1, "batch_size": 2, "logging_steps": 1}


@dataclass
class Sample:
    route: str
    status: int  # 0: no HTTP answer (connection error, timeout)
    seconds: float
    error: str | None = None
    at: float = 0.0  # when it was sent, seconds after the load started


@dataclass
class LoadPlan:
    clients: int
    requests: int
    model_dir: Path
    stored_job_ids: list[str]
    stored_file_ids: list[str]
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    seed: int = 0
    timeout_s: float = 120.0
    page_size: int = 20
    files_page_size: int = 100


@dataclass
class LoadState:
    """What the clients did and saw; one event loop, so no locks."""

    samples: list[Sample] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    uploaded: dict[str, str] = field(default_factory=dict)  # file id -> filename
    created: dict[str, str] = field(default_factory=dict)  # job id -> load token
    error_samples: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    t0: float = field(default_factory=time.perf_counter)

    def anomaly(self, text: str) -> None:
        self.anomalies.append(text)


class Clients:
    def __init__(self, http: httpx.AsyncClient, plan: LoadPlan, state: LoadState) -> None:
        self.http = http
        self.plan = plan
        self.state = state
        self.job_pool = list(plan.stored_job_ids)  # grows with the jobs the clients create
        self.file_pool = list(plan.stored_file_ids)  # and with their uploads
        self.routes = list(plan.mix)
        self.weights = [plan.mix[r] for r in self.routes]

    async def call(self, route: str, method: str, url: str, **kwargs: Any) -> httpx.Response | None:
        started = time.perf_counter()
        at = started - self.state.t0
        try:
            resp = await self.http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
            self.state.samples.append(Sample(route, 0, time.perf_counter() - started, error, at))
            if len(self.state.error_samples) < 20:
                self.state.error_samples.append(f"{route} at {at:.2f} s: {error}")
            return None
        seconds = time.perf_counter() - started
        if resp.status_code != 200:
            self.state.samples.append(Sample(route, resp.status_code, seconds, resp.text[:300], at))
            if len(self.state.error_samples) < 20:
                self.state.error_samples.append(f"{route} at {at:.2f} s: {resp.status_code} {resp.text[:300]}")
            return None
        self.state.samples.append(Sample(route, resp.status_code, seconds, None, at))
        return resp

    async def run_client(self, k: int) -> None:
        rng = random.Random(self.plan.seed * 100_003 + k)
        for i in range(self.plan.requests):
            route = rng.choices(self.routes, self.weights)[0]
            await self.ACTIONS[route](self, rng, k, i)

    async def run_alone(self, per_route: int) -> None:
        """One client (an id no load client has), each route ``per_route`` times in a row: a route's own
        latency, without queueing behind other clients. Writes last, so the jobs it queues start after."""
        rng, k = random.Random(self.plan.seed - 1), self.plan.clients
        routes = sorted(self.routes, key=lambda r: r in (UPLOAD, CREATE))
        for n, route in enumerate(routes):
            for i in range(per_route):
                await self.ACTIONS[route](self, rng, k, n * per_route + i)

    # ------------------------------------------------------------ the routes
    async def upload(self, rng: random.Random, k: int, i: int) -> None:
        name = f"load-c{k:03d}-r{i:04d}.jsonl"
        payload = training_jsonl(4 + rng.randrange(8), salt=f"{k}-{i}")
        resp = await self.call(
            UPLOAD,
            "POST",
            "/v1/files",
            files={"file": (name, payload, "application/jsonl")},
            data={"purpose": "fine-tune"},
        )
        if resp is None:
            return
        body = resp.json()
        if body.get("filename") != name or body.get("bytes") != len(payload):
            self.state.anomaly(f"upload {name}: answered {body}")
        if body["id"] in self.state.uploaded or body["id"] in self.plan.stored_file_ids:
            self.state.anomaly(f"upload {name}: id {body['id']} was already returned")
        self.state.uploaded[body["id"]] = name
        self.file_pool.append(body["id"])

    async def create(self, rng: random.Random, k: int, i: int) -> None:
        token = f"c{k:03d}-r{i:04d}"
        body = {
            "model": str(self.plan.model_dir),
            "training_file": rng.choice(self.file_pool),
            "suffix": token,
            "metadata": {"load_token": token},
            "Training": JOB_TRAINING,
        }
        resp = await self.call(CREATE, "POST", "/v1/fine_tuning/jobs", json=body)
        if resp is None:
            return
        job = resp.json()
        if job.get("metadata") != {"load_token": token} or job.get("status") not in ("queued", "running"):
            self.state.anomaly(f"create {token}: answered status {job.get('status')} metadata {job.get('metadata')}")
        if job["id"] in self.state.created or job["id"] in self.plan.stored_job_ids:
            self.state.anomaly(f"create {token}: id {job['id']} was already returned")
        self.state.created[job["id"]] = token
        self.job_pool.append(job["id"])

    def _check_page(self, what: str, body: dict, limit: int, anchor: str | None = None) -> None:
        ids = [item["id"] for item in body.get("data", [])]
        if len(ids) != len(set(ids)) or len(ids) > limit or (anchor is not None and anchor in ids):
            self.state.anomaly(f"{what}: a page of {len(ids)} (limit {limit}) repeats an id or holds its anchor")
        if body.get("has_more") and len(ids) < limit:
            self.state.anomaly(f"{what}: has_more with a short page of {len(ids)}")

    async def list_jobs(self, rng: random.Random, k: int, i: int) -> None:
        limit = self.plan.page_size
        resp = await self.call(LIST_JOBS, "GET", "/v1/fine_tuning/jobs", params={"limit": limit})
        if resp is not None:
            self._check_page("list jobs", resp.json(), limit)

    async def list_jobs_after(self, rng: random.Random, k: int, i: int) -> None:
        """A page further down: the one after a random known job (a cursor anywhere in the list)."""
        limit, anchor = self.plan.page_size, rng.choice(self.job_pool)
        resp = await self.call(LIST_JOBS_AFTER, "GET", "/v1/fine_tuning/jobs", params={"limit": limit, "after": anchor})
        if resp is not None:
            self._check_page("list jobs after", resp.json(), limit, anchor)

    async def retrieve_job(self, rng: random.Random, k: int, i: int) -> None:
        job_id = rng.choice(self.job_pool)
        resp = await self.call(RETRIEVE_JOB, "GET", f"/v1/fine_tuning/jobs/{job_id}")
        if resp is not None and resp.json().get("id") != job_id:
            self.state.anomaly(f"retrieve job {job_id}: answered {resp.json().get('id')}")

    async def events(self, rng: random.Random, k: int, i: int) -> None:
        job_id = rng.choice(self.job_pool)
        resp = await self.call(EVENTS, "GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 20})
        if resp is None:
            return
        body = resp.json()
        self._check_page(f"events of {job_id}", body, 20)
        if not body["data"]:
            self.state.anomaly(f"events of {job_id}: none (every job has at least its creation event)")

    async def list_files(self, rng: random.Random, k: int, i: int) -> None:
        limit = self.plan.files_page_size
        params: dict[str, Any] = {"limit": limit}
        if rng.random() < 0.5:
            params["purpose"] = "fine-tune"
        resp = await self.call(LIST_FILES, "GET", "/v1/files", params=params)
        if resp is not None:
            self._check_page("list files", resp.json(), limit)

    async def retrieve_file(self, rng: random.Random, k: int, i: int) -> None:
        file_id = rng.choice(self.file_pool)
        resp = await self.call(RETRIEVE_FILE, "GET", f"/v1/files/{file_id}")
        if resp is not None and resp.json().get("id") != file_id:
            self.state.anomaly(f"retrieve file {file_id}: answered {resp.json().get('id')}")

    ACTIONS = {
        UPLOAD: upload,
        CREATE: create,
        LIST_JOBS: list_jobs,
        LIST_JOBS_AFTER: list_jobs_after,
        RETRIEVE_JOB: retrieve_job,
        EVENTS: events,
        LIST_FILES: list_files,
        RETRIEVE_FILE: retrieve_file,
    }


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def http_client(base_url: str, api_key: str | None, connections: int, timeout_s: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        headers=auth_headers(api_key),
        timeout=timeout_s,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


async def _run(base_url: str, api_key: str | None, plan: LoadPlan, alone_per_route: int | None) -> LoadState:
    state = LoadState()
    async with http_client(base_url, api_key, plan.clients, plan.timeout_s) as http:
        clients = Clients(http, plan, state)
        state.t0 = time.perf_counter()
        if alone_per_route is None:
            await asyncio.gather(*(clients.run_client(k) for k in range(plan.clients)))
        else:
            await clients.run_alone(alone_per_route)
        state.wall_s = time.perf_counter() - state.t0
    return state


def run_load(base_url: str, api_key: str | None, plan: LoadPlan) -> LoadState:
    """All clients at once; returns when each has sent its ``plan.requests`` requests."""
    return asyncio.run(_run(base_url, api_key, plan, None))


def run_alone(base_url: str, api_key: str | None, plan: LoadPlan, per_route: int) -> LoadState:
    """One client, ``per_route`` requests of each route in turn (see :meth:`Clients.run_alone`)."""
    return asyncio.run(_run(base_url, api_key, plan, per_route))


def merged(*states: LoadState) -> LoadState:
    """The requests, anomalies and created objects of several runs, for the verification."""
    out = LoadState()
    for state in states:
        out.samples += state.samples
        out.anomalies += state.anomalies
        out.error_samples += state.error_samples
        out.uploaded.update(state.uploaded)
        out.created.update(state.created)
    return out


# ------------------------------------------------------------------ clean-up
@dataclass
class Cleanup:
    cancelled: int = 0
    already_final: int = 0
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0


async def _cleanup(base_url: str, api_key: str | None, job_ids: list[str], settle_timeout_s: float) -> Cleanup:
    """Cancel every created job not yet ended, then wait until all of them have ended."""
    result = Cleanup()
    started = time.perf_counter()
    gate = asyncio.Semaphore(8)
    async with http_client(base_url, api_key, 8, 120) as http:

        async def cancel(job_id: str) -> None:
            async with gate:
                t = time.perf_counter()
                resp = await http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
                result.samples.append(Sample(CANCEL, resp.status_code, time.perf_counter() - t))
                if resp.status_code == 200:
                    result.cancelled += 1
                elif resp.status_code == 400 and resp.json()["error"]["code"] == "job_not_cancellable":
                    result.already_final += 1  # it finished between the load and its cancel
                else:
                    result.errors.append(f"cancel {job_id}: {resp.status_code} {resp.text[:200]}")

        await asyncio.gather(*(cancel(j) for j in job_ids))
        deadline = time.monotonic() + settle_timeout_s
        statuses: dict[str, str] = {}
        while True:
            pending = [j for j in job_ids if statuses.get(j) not in FINAL]
            for job_id in pending:
                resp = await http.get(f"/v1/fine_tuning/jobs/{job_id}")
                statuses[job_id] = resp.json()["status"] if resp.status_code == 200 else f"http {resp.status_code}"
            if all(s in FINAL for s in statuses.values()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    result.statuses = dict(Counter(statuses.values()))
    result.wall_s = time.perf_counter() - started
    return result


def cancel_created(base_url: str, api_key: str | None, state: LoadState, settle_timeout_s: float = 120) -> Cleanup:
    return asyncio.run(_cleanup(base_url, api_key, list(state.created), settle_timeout_s))


# --------------------------------------------------------------- verification
@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


def _walk(http: httpx.Client, path: str, limit: int, params: dict[str, Any] | None = None) -> list[dict]:
    """Every item of a paginated list, following ``after`` = the last id of each page."""
    items: list[dict] = []
    after = None
    while True:
        resp = http.get(path, params={**(params or {}), "limit": limit, **({"after": after} if after else {})})
        resp.raise_for_status()
        body = resp.json()
        items += body["data"]
        if not body["has_more"] or not body["data"]:
            return items
        after = body["data"][-1]["id"]


def _once(name: str, expected: list[str], seen: list[str]) -> Check:
    """Each of ``expected`` occurs exactly once in ``seen``, and ``seen`` repeats nothing."""
    counts = Counter(seen)
    missing = [x for x in expected if counts[x] == 0]
    repeated = [x for x, n in counts.items() if n > 1]
    detail = f"{len(expected)} expected, {len(seen)} listed, {len(missing)} missing, {len(repeated)} repeated"
    if missing or repeated:
        detail += f" (e.g. {(missing or repeated)[:3]})"
    return Check(name, not missing and not repeated, detail)


def verify_api(base_url: str, api_key: str | None, plan: LoadPlan, state: LoadState, cleanup: Cleanup) -> list[Check]:
    """While the server still runs: errors, anomalies, the listings and /health."""
    checks: list[Check] = []
    failures = [s for s in state.samples if s.status != 200]
    by_status = Counter(s.status for s in failures)
    checks.append(
        Check("no request failed", not failures, f"{len(failures)} of {len(state.samples)} {dict(by_status)}")
    )
    checks.append(
        Check(
            "every answer checked out", not state.anomalies, f"{len(state.anomalies)} anomalies {state.anomalies[:3]}"
        )
    )
    checks.append(
        Check(
            "clean-up cancels answered",
            not cleanup.errors,
            f"{cleanup.cancelled} cancelled, {cleanup.already_final} already ended, {cleanup.errors[:3]}",
        )
    )
    unfinished = {s: n for s, n in cleanup.statuses.items() if s not in ("cancelled", "succeeded")}
    checks.append(Check("created jobs ended cancelled or succeeded", not unfinished, f"{cleanup.statuses}"))
    with httpx.Client(base_url=base_url, headers=auth_headers(api_key), timeout=120) as http:
        files = _walk(http, "/v1/files", 1000)
        fine_tune_files = [f["id"] for f in files if f["purpose"] == "fine-tune"]
        expected_files = plan.stored_file_ids + list(state.uploaded)
        checks.append(_once("each uploaded and stored file listed once", expected_files, fine_tune_files))
        names = [f["filename"] for f in files if f["filename"].startswith("load-")]
        checks.append(_once("each upload's filename listed once", list(state.uploaded.values()), names))
        jobs = _walk(http, "/v1/fine_tuning/jobs", 100)
        expected_jobs = plan.stored_job_ids + list(state.created)
        checks.append(_once("each stored and created job listed once", expected_jobs, [j["id"] for j in jobs]))
        tokens = [(j.get("metadata") or {}).get("load_token") for j in jobs]
        checks.append(
            _once("each create's load_token listed once", list(state.created.values()), [t for t in tokens if t])
        )
        health = http.get("/health")
        counted = sum(health.json().get("jobs", {}).values()) if health.status_code == 200 else -1
        checks.append(
            Check(
                "/health answers and counts every job",
                health.status_code == 200 and counted == len(expected_jobs),
                f"{health.status_code}, {counted} fine-tunes counted, {len(expected_jobs)} expected",
            )
        )
    return checks


def verify_db(db_path: Path, plan: LoadPlan, state: LoadState) -> list[Check]:
    """After the server stopped: the rows themselves."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        one = lambda sql, *args: conn.execute(sql, args).fetchone()  # noqa: E731
        n, ids, seqs = one("SELECT COUNT(*), COUNT(DISTINCT id), COUNT(DISTINCT seq) FROM jobs")
        expected = len(plan.stored_job_ids) + len(state.created)
        checks = [
            Check(
                "jobs rows: one per job, distinct ids and seqs",
                n == ids == seqs == expected,
                f"{n}/{ids}/{seqs} of {expected}",
            )
        ]
        rows = conn.execute("SELECT id, json_extract(metadata, '$.load_token') FROM jobs WHERE metadata IS NOT NULL")
        tokens = {job_id: token for job_id, token in rows if token}
        wrong = [j for j, t in state.created.items() if tokens.get(j) != t]
        checks.append(
            Check(
                "created jobs stored with their tokens, no extra",
                not wrong and len(tokens) == len(state.created),
                f"{len(tokens)} rows with a load_token, {len(state.created)} created, {len(wrong)} mismatched",
            )
        )
        (n_files,) = one("SELECT COUNT(*) FROM files WHERE purpose = 'fine-tune'")
        expected_files = len(plan.stored_file_ids) + len(state.uploaded)
        dup_names = one(
            "SELECT COUNT(*) FROM (SELECT filename FROM files WHERE filename LIKE 'load-%' "
            "GROUP BY filename HAVING COUNT(*) > 1)"
        )[0]
        checks.append(
            Check(
                "files rows: one per upload",
                n_files == expected_files and not dup_names,
                f"{n_files} of {expected_files}, {dup_names} names repeated",
            )
        )
        names_on_disk = [p.name for p in (db_path.parent / "files").iterdir()]
        staging = sum(1 for name in names_on_disk if name.startswith("."))  # .staging-* left by an upload
        blobs = len(names_on_disk) - staging
        (all_files,) = one("SELECT COUNT(*) FROM files")
        checks.append(
            Check(
                "one blob per file row, no staging file left",
                blobs == all_files and not staging,
                f"{blobs} blobs, {all_files} rows, {staging} staging",
            )
        )
        created_events = dict(
            conn.execute(
                "SELECT job_id, COUNT(*) FROM events WHERE message LIKE 'Created fine-tuning job: %' GROUP BY job_id"
            )
        )
        bad = [j for j in state.created if created_events.get(j) != 1]
        (orphans,) = one("SELECT COUNT(*) FROM events WHERE job_id NOT IN (SELECT id FROM jobs)")
        checks.append(
            Check(
                "each created job has one creation event, no orphan event",
                not bad and not orphans,
                f"{len(bad)} wrong, {orphans} orphans",
            )
        )
    finally:
        conn.close()
    return checks


def verify_server(log_text: str, exit_code: int | None) -> list[Check]:
    tracebacks = log_text.count("Traceback (most recent call last)")
    errors = [line for line in log_text.splitlines() if " ERROR " in line or line.startswith("ERROR:")]
    return [
        Check(
            "server log: no traceback, no ERROR line",
            not tracebacks and not errors,
            f"{tracebacks} tracebacks, {errors[:2]}",
        ),
        Check("server stopped cleanly on SIGINT", exit_code == 0, f"exit code {exit_code}"),
    ]


def summary_counts(state: LoadState) -> dict[str, Any]:
    return {
        "requests": len(state.samples),
        "uploads": len(state.uploaded),
        "jobs_created": len(state.created),
        "anomalies": state.anomalies[:20],
        "error_samples": state.error_samples,
    }
