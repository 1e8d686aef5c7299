"""A data-parallel fine-tune on a Ray cluster: the job process drives Ray Train's ``TorchTrainer``.

Under the Ray runner a fine-tune with ``Training.num_training_workers = N > 1`` does not start local
ranks (``jobs/local_ranks.py``): its job process (under the job's actor, ``jobs/ray_runner.py``) joins
the cluster and runs ``TorchTrainer`` with N workers, each holding ``Training.resources_per_worker``
(default one CPU; plus one GPU for ``Training.device`` "cuda" when it names none) wherever Ray places
it. Ray Train initialises the process group (gloo on CPUs, NCCL on GPUs, oneCCL where
``oneccl_bindings_for_pytorch`` is installed, as the reference uses) and each worker runs
:func:`~sqft_service.jobs.worker.run_fine_tune_rank`: rank 0 reports through the job's journal and
writes the adapter and ``outcome.json``; the data-parallel contract is ``training/distributed.py``'s.

Stop (cancel, pause, shutdown): the workers are Ray actors, outside the job's process group, so the
job process turns its SIGTERM into a file in the shared workspace that rank 0 watches; rank 0 then
stops every rank at the next step boundary, as a local job does. SIGKILL of the job process ends the
Ray job it drives, and Ray removes its workers with it.

Failures: ``FailureConfig(max_failures=0)``. A lost worker fails the fit, the job process exits
without an outcome, and the manager queues the job again (``max_job_attempts``); the relaunch resumes
from the rolling resume point. One retry policy for every runner, counted in one place.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ..workspace import JobWorkspace
from .runner import worker_resources

log = logging.getLogger("sqft_service.worker")

# Set by the job's actor (jobs/ray_runner.py): this job process runs on a Ray cluster.
RAY_JOB_ENV = "SQFT_RAY_JOB"
# What a Ray Train worker needs of the job process's environment: the model policy, checkpoint interval,
# log format (SQFT_*), offline Hub and tokenizer settings, and the collectives' interface choices
# (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME) set for the service.
_FORWARDED_PREFIXES = ("SQFT_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "GLOO_", "NCCL_")
STOP_POLL_S = 0.5


def backend(use_gpu: bool) -> str | None:
    """The collective backend: Ray Train's default (gloo on CPU, NCCL on GPU) unless oneCCL is there."""
    if not use_gpu and importlib.util.find_spec("oneccl_bindings_for_pytorch") is not None:
        return "ccl"
    return None


def train_rank(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: one rank of the fine-tune, inside a Ray Train worker."""
    os.environ.update(config["env"])
    from ..logs import configure_logging
    from .worker import run_fine_tune_rank

    configure_logging(os.environ.get("SQFT_LOG_FORMAT", "text"), job_id=config["job_id"], stream="stdout")

    stop = threading.Event()
    stop_file = Path(config["stop_file"])
    done = threading.Event()

    def watch() -> None:  # rank 0 decides for all (training/distributed.py); the others' flag is ignored
        while not done.wait(STOP_POLL_S):
            if stop_file.exists():
                stop.set()
                return

    watcher = threading.Thread(target=watch, name="sqft-stop-watch", daemon=True)
    watcher.start()
    try:
        outcome = run_fine_tune_rank(
            config["workspace"], None, config["job_id"], model_cache_dir=config["model_cache"], stop=stop
        )
    finally:
        done.set()
    log.info("rank finished: %s", outcome.status)


def run_with_ray_train(
    job_id: str, workspace: JobWorkspace, model_cache: Path | None, spec: dict[str, Any], stop: threading.Event
) -> int:
    """Drive the job's ``TorchTrainer`` to the end; 0 once rank 0 has written the outcome, else 1."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    training = spec["params"].get("Training", {})
    workers = int(training["num_training_workers"])
    # A GPU per worker for Training.device "cuda" (worker_resources): Ray Train then binds each worker to
    # its GPU and initialises NCCL.
    resources = worker_resources(training)
    use_gpu = float(resources.get("GPU", 0)) > 0
    threads = max(1, int(resources.get("CPU", 1)))
    env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_PREFIXES)}
    # Each worker's intra-op threads: its CPU share, not the job process's budget.
    env.update({"SQFT_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)})
    env.pop(RAY_JOB_ENV, None)

    workspace.ray_stop_request.unlink(missing_ok=True)

    def forward_stop() -> None:
        stop.wait()
        workspace.ray_stop_request.write_text(str(time.time()))
        log.warning("stop requested: rank 0 stops every worker after the current step")

    threading.Thread(target=forward_stop, name="sqft-stop-forward", daemon=True).start()

    # log_to_driver: the workers' output lands in this process's stdout, the job's log (without colour codes).
    os.environ["RAY_COLOR_PREFIX"] = "0"
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=True, logging_level=logging.WARNING)
    # ray.init installs its own fatal-signal handler, which would end this process on SIGTERM (and Ray
    # the workers with it); the job's handler turns SIGTERM into a stop at the next step boundary.
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    trainer = TorchTrainer(
        train_rank,
        train_loop_config={
            "env": env,
            "workspace": str(workspace.root),
            "job_id": job_id,
            "model_cache": str(model_cache) if model_cache else None,
            "stop_file": str(workspace.ray_stop_request),
        },
        torch_config=TorchConfig(backend=backend(use_gpu)),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"sqft-{job_id}",
            storage_path=str(workspace.ray_train_dir),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    log.info("Ray Train: %d workers, %s each (use_gpu=%s)", workers, resources, use_gpu)
    try:
        trainer.fit()
    except Exception as exc:  # a worker died or raised: no outcome, the manager requeues the job
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.error("Ray Train failed: %s: %s", type(exc).__name__, first)
        return 1
    finally:
        ray.shutdown()
    return 0 if workspace.outcome.exists() else 1
