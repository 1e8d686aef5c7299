"""One load run from start to end: seed a data dir, start the server, load it, clean up, verify."""

from __future__ import annotations

import datetime as dt
import os
import platform
import resource
import secrets
import socket
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
from bench.throughput.report import cpu_name

from sqft_service import __version__
from sqft_service.threads import physical_cores

from .report import bad_plans, query_plans, route_stats
from .seed import populate
from .server import ServerProcess
from .traffic import (
    Check,
    LoadPlan,
    cancel_created,
    merged,
    run_alone,
    run_load,
    summary_counts,
    verify_api,
    verify_db,
    verify_server,
)


@dataclass(frozen=True)
class LoadOptions:
    clients: int = 50
    requests: int = 200
    stored_jobs: int = 10_000
    stored_files: int = 100
    events_per_job: int = 6
    max_concurrent_jobs: int = 1
    seed: int = 0
    timeout_s: float = 120.0
    # With an API key (the client sends it; the rows belong to its project), or single-tenant without.
    auth: bool = True
    # Before the load, one client sends this many requests of each route in turn (0: none): the
    # latency of each route on its own, to set against its latency under load.
    alone_per_route: int = 20


def _server_usage(pid: int) -> dict[str, Any]:
    """CPU seconds and RSS of the server process (its job processes not included)."""
    try:
        proc = psutil.Process(pid)
        times = proc.cpu_times()
        return {"cpu_s": round(times.user + times.system, 1), "rss_mb": round(proc.memory_info().rss / 2**20, 1)}
    except psutil.Error:
        return {}


def run(options: LoadOptions, model_dir: Path, work_dir: Path, log=print) -> dict[str, Any]:
    """The whole run in ``work_dir`` (which must be empty or new); returns the results (``checks`` included)."""
    load_at_start = os.getloadavg()
    data_dir = (work_dir / "sqft-data").resolve()
    api_key = secrets.token_urlsafe(24) if options.auth else None  # no project name: project `default`
    owner = "default" if options.auth else None
    log(f"seeding {options.stored_jobs:,} jobs and {options.stored_files} files into {data_dir}")
    seeded = populate(
        data_dir,
        n_jobs=options.stored_jobs,
        n_files=options.stored_files,
        model_dir=model_dir,
        owner=owner,
        events_per_job=options.events_per_job,
        seed=options.seed,
    )
    log(f"seeded in {seeded.seconds:.1f} s ({seeded.events:,} events)")
    plans = query_plans(data_dir / "sqft.db")
    bad = bad_plans(plans)
    checks = [Check("hot queries use an index (no scan, no sort of a whole match)", not bad, f"{bad or 'all indexed'}")]
    total = options.clients * options.requests
    server = ServerProcess(
        data_dir,
        env={
            "SQFT_API_KEY": api_key or "",
            "SQFT_MODEL_ROOTS": str(model_dir.resolve().parent),
            "SQFT_MAX_CONCURRENT_JOBS": str(options.max_concurrent_jobs),
            "SQFT_THREADS_PER_JOB": "1",
            "SQFT_CANCEL_GRACE_S": "5",
            # Quotas above anything the run can create: every create and upload must be accepted.
            "SQFT_MAX_UNFINISHED_JOBS": str(total + 8 * options.alone_per_route + 1),
            "SQFT_MAX_FILES": str(options.stored_files + total + 8 * options.alone_per_route + 1000),
        },
        log_path=work_dir / "server.log",
    )
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    server.start()
    server_start_s = time.perf_counter() - started
    assert server.proc is not None
    plan = LoadPlan(
        clients=options.clients,
        requests=options.requests,
        model_dir=model_dir,
        stored_job_ids=seeded.job_ids,
        stored_file_ids=seeded.file_ids,
        seed=options.seed,
        timeout_s=options.timeout_s,
    )
    try:
        alone = run_alone(server.url, api_key, plan, options.alone_per_route)
        log(f"{options.clients} clients x {options.requests} requests against {server.url}")
        usage_before = _server_usage(server.proc.pid)
        self_before = resource.getrusage(resource.RUSAGE_SELF)
        state = run_load(server.url, api_key, plan)
        usage_after = _server_usage(server.proc.pid)
        self_after = resource.getrusage(resource.RUSAGE_SELF)
        everything = merged(alone, state)
        log(f"load done in {state.wall_s:.1f} s; cancelling the {len(everything.created)} jobs created")
        cleanup = cancel_created(server.url, api_key, everything)
        log("verifying")
        checks += verify_api(server.url, api_key, plan, everything, cleanup)
        checks.append(Check("server alive after the load", server.alive, f"pid {server.proc.pid}"))
        usage_end = _server_usage(server.proc.pid)
    finally:
        exit_code = server.stop()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    children_cpu = (children.ru_utime + children.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
    checks += verify_db(data_dir / "sqft.db", plan, everything)
    checks += verify_server(server.log_text(), exit_code)
    now = dt.datetime.now()
    meta = {
        "date": now.strftime("%Y-%m-%d %H:%M"),
        "host": socket.gethostname(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "loadavg_at_start": [round(v, 2) for v in load_at_start],  # other work on the machine skews the figures
        "physical_cores": physical_cores(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "version": __version__,
        "clients": options.clients,
        "requests_per_client": options.requests,
        "stored_jobs": options.stored_jobs,
        "stored_files": options.stored_files,
        "stored_events": seeded.events,
        "max_concurrent_jobs": options.max_concurrent_jobs,
        "auth": options.auth,
        "options": asdict(options),
        "seed_s": round(seeded.seconds, 1),
        "server_start_s": round(server_start_s, 2),
        "created_jobs": "1 training step of a 2-layer random Llama each, 1 thread; the rest cancelled after the load",
    }
    # CPU seconds during the load: the server process, the load generator (this process); and the job
    # processes over the server's whole life (its waited-for children, less the server itself).
    server_usage = {
        "cpu_s": round(usage_after.get("cpu_s", 0) - usage_before.get("cpu_s", 0), 1) if usage_after else None,
        "rss_mb": usage_after.get("rss_mb"),
        "client_cpu_s": round(
            (self_after.ru_utime + self_after.ru_stime) - (self_before.ru_utime + self_before.ru_stime), 1
        ),
        "jobs_cpu_s_whole_run": round(children_cpu - usage_end.get("cpu_s", 0), 1) if usage_end else None,
    }
    return {
        "meta": meta,
        "load": {
            "wall_s": round(state.wall_s, 2),
            **summary_counts(state),
            "routes": route_stats(state.samples, state.wall_s),
            "alone": {
                "per_route": options.alone_per_route,
                "routes": route_stats(alone.samples, alone.wall_s),
                **summary_counts(alone),
            },
        },
        "cleanup": {
            "wall_s": round(cleanup.wall_s, 2),
            "cancelled": cleanup.cancelled,
            "already_final": cleanup.already_final,
            "statuses": cleanup.statuses,
            "routes": route_stats(cleanup.samples, cleanup.wall_s),
        },
        "server": server_usage,
        "query_plans": plans,
        "checks": [c.as_dict() for c in checks],
        "ok": all(c.ok for c in checks),
    }
