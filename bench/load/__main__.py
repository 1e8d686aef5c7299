"""Entry point: ``python -m bench.load [options]`` from the repository root (``make load ARGS=...``).

Exit status 1 when any check fails (an error, a lost or repeated row, an unhealthy server).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from bench.throughput.inputs import CACHE, RESULTS

from . import __doc__ as package_doc
from .harness import LoadOptions, run
from .report import markdown, write_results
from .seed import tiny_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = LoadOptions()
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=(package_doc or "").split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=defaults.clients, help="concurrent clients (default: 50)")
    parser.add_argument("--requests", type=int, default=defaults.requests, help="requests per client (default: 200)")
    parser.add_argument("--stored-jobs", type=int, default=defaults.stored_jobs, help="jobs stored before the start")
    parser.add_argument("--stored-files", type=int, default=defaults.stored_files, help="training files stored before")
    parser.add_argument("--events-per-job", type=int, default=defaults.events_per_job)
    parser.add_argument("--max-concurrent-jobs", type=int, default=defaults.max_concurrent_jobs)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seeds the clients' choices")
    parser.add_argument(
        "--alone", type=int, default=defaults.alone_per_route, help="requests per route by one client first (0: none)"
    )
    parser.add_argument("--no-auth", action="store_true", help="no API key (single-tenant); default: with one")
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s, help="per-request timeout, seconds")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default: bench/results)")
    parser.add_argument("--no-write", action="store_true", help="print only; write no results file")
    parser.add_argument("--keep", action="store_true", help="keep the data dir and server log (path printed)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = LoadOptions(
        clients=args.clients,
        requests=args.requests,
        stored_jobs=args.stored_jobs,
        stored_files=args.stored_files,
        events_per_job=args.events_per_job,
        max_concurrent_jobs=args.max_concurrent_jobs,
        seed=args.seed,
        timeout_s=args.timeout,
        auth=not args.no_auth,
        alone_per_route=args.alone,
    )
    model_dir = tiny_model(CACHE)
    work_dir = Path(tempfile.mkdtemp(prefix="sqft-load-"))
    try:
        result = run(options, model_dir, work_dir, log=lambda text: print(text, flush=True))
    finally:
        if args.keep:
            print(f"kept {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    print()
    print(markdown(result))
    if not args.no_write:
        path = write_results(args.out, dt.date.today().isoformat(), socket.gethostname(), result)
        print(f"\nwrote {path}")
    if not result["ok"]:
        failed = [c for c in result["checks"] if not c["ok"]]
        print("\nFAILED:\n" + json.dumps(failed, indent=2), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
