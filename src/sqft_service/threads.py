"""The one CPU-thread policy, for the service (how many threads each job gets) and the job process.

Oversubscribed OpenMP threads thrash: the service splits the machine's physical cores between the jobs
it runs at once and hands each job its share (``SQFT_NUM_THREADS``, plus ``OMP_NUM_THREADS`` for the
libraries that read it at import); inside the job, intra-op threads never exceed that share nor the
physical cores the process may use (SMT siblings add contention to GEMMs that are compute-bound already).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "SQFT_NUM_THREADS"


def physical_cores() -> int:
    """Physical cores this process may use (SMT siblings counted once)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    try:
        block: dict[str, str] = {}
        for line in [*Path("/proc/cpuinfo").read_text().splitlines(), ""]:
            if line.strip():
                key, _, value = line.partition(":")
                block[key.strip()] = value.strip()
                continue
            if block and int(block.get("processor", -1)) in allowed:
                cores.add((block.get("physical id", "0"), block.get("core id", block.get("processor", "0"))))
            block = {}
    except (OSError, ValueError):
        pass
    return max(1, len(cores) or len(allowed))


def job_thread_budget(max_concurrent_jobs: int, override: int | None = None) -> int:
    """Threads one job process gets when up to ``max_concurrent_jobs`` run at once."""
    if override:
        return override
    return max(1, physical_cores() // max(1, max_concurrent_jobs))


def job_environment(threads: int) -> dict[str, str]:
    """Environment variables that hand a job process its thread budget."""
    return {ENV_VAR: str(threads), "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


def configure_torch_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads: ``requested``, else the job's budget, capped by the physical cores.

    Returns:
        The thread count now in effect.
    """
    import torch

    wanted = requested
    if wanted is None:
        budget = os.environ.get(ENV_VAR)
        wanted = min(int(budget) if budget else torch.get_num_threads(), physical_cores())
    if wanted != torch.get_num_threads():
        torch.set_num_threads(wanted)
    return torch.get_num_threads()
