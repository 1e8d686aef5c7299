"""Per-route latency percentiles, the markdown table and the results JSON."""

from __future__ import annotations

import json
import math
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

from .traffic import DEFAULT_MIX, Sample

# The store's hot queries as it issues them (store/db.py page(), store/jobs.py, store/events.py,
# store/files.py), with an API key's owner and without keys. None may scan a table or an index ("SCAN",
# but see MAY_SCAN), and no page may sort all the rows it matches ("TEMP B-TREE" in a query with a LIMIT).
HOT_QUERIES: dict[str, str] = {
    "list jobs": "SELECT * FROM jobs WHERE kind IN (?) AND owner = ? ORDER BY seq DESC LIMIT ?",
    "list jobs, after": "SELECT * FROM jobs WHERE kind IN (?) AND owner = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
    "list jobs, no keys": "SELECT * FROM jobs WHERE kind IN (?) ORDER BY seq DESC LIMIT ?",
    "list jobs, no keys, after": "SELECT * FROM jobs WHERE kind IN (?) AND seq < ? ORDER BY seq DESC LIMIT ?",
    "retrieve job / page anchor": "SELECT * FROM jobs WHERE id = ?",
    "events of a job": "SELECT * FROM events WHERE job_id = ? ORDER BY seq DESC LIMIT ?",
    "events of a job, after": "SELECT * FROM events WHERE job_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
    "list files": "SELECT * FROM files WHERE owner = ? ORDER BY rowid DESC LIMIT ?",
    "list files of a purpose": "SELECT * FROM files WHERE purpose = ? AND owner = ? ORDER BY rowid DESC LIMIT ?",
    "list files, no keys": "SELECT * FROM files ORDER BY rowid DESC LIMIT ?",
    "retrieve file": "SELECT * FROM files WHERE id = ?",
    "files quota count": "SELECT COUNT(*) AS n FROM files WHERE owner IS ?",
    "unfinished jobs quota count": "SELECT COUNT(*) AS n FROM jobs WHERE status IN (?,?,?,?) AND owner IS ?",
    "queued jobs (manager)": "SELECT * FROM jobs WHERE status IN (?) ORDER BY seq ASC",
    "next job seq (create)": "SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs",
    "health counts": "SELECT kind, status, COUNT(*) AS n FROM jobs GROUP BY kind, status",
}
MAY_SCAN = {
    "health counts": "counts every job, from the covering (kind, status) index",
    "list files, no keys": "a scan in rowid order, which stops at the LIMIT",
}


def query_plans(db_path: Path) -> dict[str, str]:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        plans = {}
        for name, sql in HOT_QUERIES.items():
            rows = conn.execute(f"EXPLAIN QUERY PLAN {sql}", [None] * sql.count("?")).fetchall()
            plans[name] = "; ".join(row[-1] for row in rows)
        return plans
    finally:
        conn.close()


def bad_plans(plans: dict[str, str]) -> dict[str, str]:
    """The hot queries whose plan reads a whole table or index, or sorts every row a page matches."""
    bad = {}
    for name, plan in plans.items():
        steps = plan.split("; ")
        scans = name not in MAY_SCAN and any(step.startswith("SCAN") for step in steps)
        sorts = "LIMIT" in HOT_QUERIES[name] and any("TEMP B-TREE" in step for step in steps)
        if scans or sorts:
            bad[name] = plan
    return bad


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of an ascending list."""
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def route_stats(samples: list[Sample], wall_s: float) -> list[dict[str, Any]]:
    """One row per route (in the mix's order, then any other), and ``all``; times in milliseconds."""
    order = [r for r in DEFAULT_MIX if any(s.route == r for s in samples)]
    order += sorted({s.route for s in samples} - set(order))
    rows = []
    for route in [*order, "all"]:
        mine = [s for s in samples if route in ("all", s.route)]
        ms = sorted(1000 * s.seconds for s in mine)
        rows.append(
            {
                "route": route,
                "requests": len(mine),
                "errors": sum(1 for s in mine if s.status != 200),
                "statuses": {str(k): v for k, v in sorted(Counter(s.status for s in mine).items())},
                "p50_ms": round(percentile(ms, 0.50), 2),
                "p95_ms": round(percentile(ms, 0.95), 2),
                "p99_ms": round(percentile(ms, 0.99), 2),
                "max_ms": round(ms[-1], 2) if ms else None,
                "mean_ms": round(sum(ms) / len(ms), 2) if ms else None,
                "per_s": round(len(mine) / wall_s, 1) if wall_s else None,
            }
        )
    return rows


def markdown(result: dict[str, Any]) -> str:
    meta, load = result["meta"], result["load"]
    lines = [
        f"{meta['date']} · {meta['cpu']} · {meta['cores']} cores · sqft-service {meta['version']} · "
        f"SQLite {meta['sqlite']} · {meta['clients']} clients x {meta['requests_per_client']} requests · "
        f"{meta['stored_jobs']:,} stored jobs ({meta['stored_events']:,} events, {meta['stored_files']} files) · "
        f"max_concurrent_jobs {meta['max_concurrent_jobs']} · {'API key' if meta['auth'] else 'no API key'}",
        "",
        "| route | requests | errors | p50 ms | p95 ms | p99 ms | max ms | req/s | alone: p50 / p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    alone = {r["route"]: r for r in load["alone"]["routes"]}
    for r in load["routes"]:
        name = f"**{r['route']}**" if r["route"] == "all" else f"`{r['route']}`"
        a = alone.get(r["route"])
        alone_ms = f"{a['p50_ms']} / {a['p99_ms']}" if a else "-"
        lines.append(
            f"| {name} | {r['requests']} | {r['errors']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
            f"{r['max_ms']} | {r['per_s']} | {alone_ms} |"
        )
    cleanup, server = result["cleanup"], result["server"]
    lines += [
        "",
        f"{load['requests']} requests in {load['wall_s']:.1f} s ({load['requests'] / load['wall_s']:.0f} req/s); "
        f"{load['uploads']} uploads, {load['jobs_created']} jobs created (and {load['alone']['requests']} requests "
        f"by one client alone before: {load['alone']['uploads']} uploads, {load['alone']['jobs_created']} jobs). "
        f"Created jobs after the clean-up: {cleanup['statuses']} ({cleanup['cancelled']} cancelled by it, "
        f"{cleanup['wall_s']:.0f} s). Seeding took {meta['seed_s']:.0f} s, "
        f"server start {meta['server_start_s']:.1f} s. CPU seconds during the load: server {server.get('cpu_s')}, "
        f"load generator {server.get('client_cpu_s')}; job processes (whole run) {server.get('jobs_cpu_s_whole_run')}. "
        f"Server RSS {server.get('rss_mb')} MB.",
        "",
        "| check | ok | detail |",
        "|---|---|---|",
    ]
    lines += [f"| {c['name']} | {'yes' if c['ok'] else '**NO**'} | {c['detail']} |" for c in result["checks"]]
    return "\n".join(lines)


def write_results(out: Path, day: str, host: str, result: dict[str, Any]) -> Path:
    """``<out>/<day>-load-<host>.json`` (``-load-noauth-`` without API keys); ``latest.json`` stays the
    throughput benchmark's."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{day}-load{'' if result['meta']['auth'] else '-noauth'}-{host}.json"
    path.write_text(json.dumps(result, indent=2))
    return path
