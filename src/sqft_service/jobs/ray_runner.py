"""The Ray runner (``SQFT_RUNNER=ray``): each job runs on a Ray cluster, under a detached actor.

Why an actor per job and not the Ray Jobs API: job submission needs the cluster's dashboard (many
clusters, CI's included, run ``--include-dashboard=false``), and it gives no process group to signal
for a cooperative stop. A *detached, named* actor (``sqft-job-<id>`` in the ``sqft`` namespace)
outlives the service that created it, so the service (the Ray driver) can stop or crash while the job
goes on, and the next service finds it again by name (:meth:`RayRunner.attach`). The actor starts
the same ``python -m sqft_service.jobs.worker`` command the subprocess runner starts, in its own
session on the actor's node: SIGTERM to that group is the same cooperative stop (a fine-tune stops
at the next step and writes its resume point), SIGKILL the same hard stop.

The child gets ``PR_SET_PDEATHSIG``: if the actor dies (its node's raylet killed it, the node went
away, or :meth:`RayRunner.kill` removed it), the job process dies with it, so a job the manager
treats as crashed and queues again is never still running somewhere else.

Data: every node must see the service's data dir at the same path (a shared file system), and run
the same Python environment (``sys.executable`` is in the command). The actor checks both before it
starts the job and fails the launch with a message naming the node otherwise. See README "Run on a
Ray cluster".
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

try:
    import ray
    from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
except ImportError as exc:  # the optional extra is missing: say what to install
    raise ImportError(
        "SQFT_RUNNER=ray needs Ray: pip install -e '.[ray]' (or `make serve RUNNER=ray`, which installs it)"
    ) from exc

from ..devices import gpus_short
from .ray_train import RAY_JOB_ENV
from .runner import LaunchError, LaunchSpec

log = logging.getLogger(__name__)

NAMESPACE = "sqft"
# The exit code poll reports when the actor (and so the job process) is gone without an exit status:
# 128 + SIGKILL, what a shell reports for a process the OOM killer took.
ACTOR_LOST_EXIT_CODE = 137
# Seconds one call to a job's actor may take. A busy cluster may need long to place a new actor.
CALL_TIMEOUT_S = 30.0
START_TIMEOUT_S = 120.0
CHECK_TIMEOUT_S = 5.0
PR_SET_PDEATHSIG = 1


def actor_name(job_id: str) -> str:
    return f"sqft-job-{job_id}"


def _die_with_parent() -> None:
    """In the job process, before exec: SIGKILL when the actor process that started it exits."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: a lost actor may leave its job process running
        pass


@ray.remote(max_restarts=0)
class JobProcess:
    """Owns one job process on its node. Methods run one at a time on the actor's main thread (the
    thread that started the child, which PR_SET_PDEATHSIG follows)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.process: subprocess.Popen | None = None

    def start(self, argv: list[str], env: dict[str, str], log_path: str, cwd: str, data_paths: list[str]) -> dict:
        node = socket.gethostname()
        for path in data_paths:
            if not os.path.exists(path):
                raise LaunchError(
                    f"Ray node {node} does not see {path}: the data dir must be on a file system shared by every "
                    "node, mounted at the same path"
                )
        if not os.access(argv[0], os.X_OK):
            raise LaunchError(f"Ray node {node} has no {argv[0]}: every node needs the service's Python environment")
        env = dict(env)
        # What Ray gave this actor on this node, and the cluster's address for a job that starts Ray
        # Train workers itself (num_training_workers > 1).
        for name in ("CUDA_VISIBLE_DEVICES",):
            if name in os.environ:
                env[name] = os.environ[name]
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        env[RAY_JOB_ENV] = "1"
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        # The GPUs Ray gave this actor (and so the job): none unless it asked for one (worker_resources).
        gpus = [str(gpu) for gpu in ray.get_gpu_ids()]
        return {"pid": self.process.pid, "node": node, "job_id": self.job_id, "gpus": gpus}

    def poll(self) -> int | None:
        return self.process.poll() if self.process is not None else ACTOR_LOST_EXIT_CODE

    def signal(self, sig: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass


@dataclass
class RayHandle:
    job_id: str
    actor: Any
    pid: int | None
    node: str = ""
    # While Ray places the actor and it starts the job process: the pending ``start`` call and when it
    # was made. Submit returns at once, so a job no node can take yet never holds the manager (and a
    # cancel) for the placement wait; poll settles the start.
    starting: Any = None
    submitted_at: float = 0.0


def connect(address: str, namespace: str) -> None:
    """Join the cluster at ``address`` as a driver (idempotent); a clear error if none answers."""
    if ray.is_initialized():
        return
    _check_reachable(address)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # log_to_driver off: job output goes to each job's log file, not to the service's stdout.
        ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConnectionError(
            f"no Ray cluster at SQFT_RAY_ADDRESS={address!r} ({exc}); start one with `ray start --head` or "
            "point SQFT_RAY_ADDRESS at the head node (host:port)"
        ) from exc
    # ray.init replaces the SIGTERM handler with one that ends the process at once; the server's own
    # (a graceful shutdown) must stay.
    if threading.current_thread() is threading.main_thread():
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)


def _check_reachable(address: str) -> None:
    """Fail at once when nothing listens at ``host:port``: ray.init would retry for minutes first."""
    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep or not port.isdigit():
        return  # "auto" fails fast by itself when no cluster runs here
    try:
        socket.create_connection((host, int(port)), timeout=CALL_TIMEOUT_S).close()
    except OSError as exc:
        raise ConnectionError(
            f"no Ray cluster at SQFT_RAY_ADDRESS={address!r} ({exc.strerror or exc}); start one with "
            "`ray start --head` or point SQFT_RAY_ADDRESS at the head node (host:port)"
        ) from exc


def _answer(future: concurrent.futures.Future, call: Callable[[], Any]) -> None:
    future.set_running_or_notify_cancel()
    try:
        future.set_result(call())
    except BaseException as exc:  # handed to the waiter, as an executor would
        future.set_exception(exc)


class RayRunner:
    """Runs each job under a detached :class:`JobProcess` actor; see the module docstring."""

    # Jobs keep running on the cluster when the service stops; the next start re-attaches.
    jobs_outlive_service = True
    # The job may run on another node: it reports through its journal (jobs/journal.py).
    job_writes_store = False

    def __init__(self, address: str = "auto", namespace: str = NAMESPACE) -> None:
        self.address = address
        self.namespace = namespace
        connect(address, namespace)
        self._asked: dict[str, concurrent.futures.Future] = {}
        self._asked_at: dict[str, float] = {}
        self._asking = threading.Lock()

    def submit(self, spec: LaunchSpec) -> RayHandle:
        self._remove_stale(spec.job_id)
        actor = JobProcess.options(
            name=actor_name(spec.job_id),
            namespace=self.namespace,
            lifetime="detached",
            **self._actor_resources(spec),
        ).remote(spec.job_id)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        data_paths = [str(spec.log_path.parent), *(str(p) for p in spec.data_paths)]
        starting = actor.start.remote(spec.argv, spec.env, str(spec.log_path), str(spec.cwd), data_paths)
        return RayHandle(spec.job_id, actor, None, starting=starting, submitted_at=time.monotonic())

    def _settle_start(self, handle: RayHandle) -> int | None:
        """Follow a pending start: None once the job process runs (or while Ray is still placing it),
        an exit code if the actor died meanwhile.

        Raises:
            LaunchError: the node cannot run the job (no shared data dir, no environment), or no node
                could take it within START_TIMEOUT_S.
        """
        ready, _ = ray.wait([handle.starting], timeout=0)
        if not ready:
            if time.monotonic() - handle.submitted_at < START_TIMEOUT_S:
                return None
            self._release(handle)
            raise LaunchError(
                f"no Ray node could take the job within {START_TIMEOUT_S:.0f} s (resources asked in "
                "`Training.resources_per_worker`, and a GPU for `Training.device` 'cuda'); see `ray status`"
            )
        try:
            started = ray.get(handle.starting)
        except RayActorError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, LaunchError):
                self._release(handle)
                raise LaunchError(str(cause)) from exc
            return ACTOR_LOST_EXIT_CODE  # killed while starting (a cancel) or its node went away
        except Exception as exc:
            self._release(handle)
            cause = exc.cause if isinstance(getattr(exc, "cause", None), LaunchError) else exc
            raise LaunchError(str(cause)) from exc
        handle.starting = None
        handle.pid, handle.node = started["pid"], started["node"]
        gpus = ", ".join(started["gpus"]) or "none"
        log.info("job %s runs on Ray node %s (pid %s, GPUs: %s)", handle.job_id, handle.node, handle.pid, gpus)
        return None

    @staticmethod
    def _actor_resources(spec: LaunchSpec) -> dict[str, Any]:
        """A one-worker job trains inside the actor's job process, so the actor holds the worker's
        resources (Ray places it on a node that has them; the manager put them in the spec with
        ``worker_resources``, a GPU for ``Training.device`` "cuda" included). A multi-worker job's process
        only drives Ray Train, whose workers hold the resources, so the actor asks for none."""
        if spec.num_workers > 1:
            return {"num_cpus": 0}
        wanted = dict(spec.resources_per_worker or {"CPU": 1})
        options: dict[str, Any] = {"num_cpus": wanted.pop("CPU", 0), "num_gpus": wanted.pop("GPU", 0)}
        if wanted:
            options["resources"] = wanted
        return options

    def _remove_stale(self, job_id: str) -> None:
        """An actor left by an earlier launch of this job (its cleanup was cut short) would block the name."""
        try:
            stale = ray.get_actor(actor_name(job_id), namespace=self.namespace)
        except ValueError:
            return
        ray.kill(stale)

    def poll(self, handle: RayHandle) -> int | None:
        if handle.starting is not None:
            code = self._settle_start(handle)
            if code is not None or handle.starting is not None:
                return code
        try:
            code = ray.get(handle.actor.poll.remote(), timeout=CALL_TIMEOUT_S)
        except (GetTimeoutError, ActorUnavailableError):
            return None  # the cluster is slow or reconnecting: ask again at the next tick
        except RayActorError as exc:
            # The actor died (node lost, killed): its job process died with it.
            log.warning("job %s: its Ray actor died: %s", handle.job_id, str(exc).splitlines()[0])
            return ACTOR_LOST_EXIT_CODE
        if code is not None:
            self._release(handle)
        return code

    def _release(self, handle: RayHandle) -> None:
        """The job process has exited: its actor has nothing left to do."""
        try:
            ray.kill(handle.actor)
        except Exception:  # already gone
            pass

    def _signal(self, handle: RayHandle, sig: int) -> None:
        if handle.starting is not None and not ray.wait([handle.starting], timeout=0)[0]:
            # Not started yet: the actor's methods run one at a time, so a signal would wait behind the
            # start. Removing the actor ends the job (its process, if any, dies with it); poll reports it.
            self._release(handle)
            return
        try:
            ray.get(handle.actor.signal.remote(int(sig)), timeout=CALL_TIMEOUT_S)
        except (RayActorError, GetTimeoutError, ActorUnavailableError):
            pass  # gone (poll reports it) or unreachable (the manager escalates after the grace period)

    def terminate(self, handle: RayHandle) -> None:
        self._signal(handle, signal.SIGTERM)

    def kill(self, handle: RayHandle) -> None:
        self._signal(handle, signal.SIGKILL)

    def attach(self, job_id: str, pid: int | None) -> RayHandle | None:
        """The job's actor, if it is still alive on the cluster (the service restarted while it ran)."""
        try:
            actor = ray.get_actor(actor_name(job_id), namespace=self.namespace)
        except ValueError:
            return None
        return RayHandle(job_id, actor, pid)

    def _ask_cluster(self, question: str, call: Callable[[], Any]) -> Any:
        """``call()`` on a thread of its own, waited for at most CHECK_TIMEOUT_S: with the head down, Ray's
        own calls wait a minute. A question still unanswered is not asked twice, and is waited for only
        until CHECK_TIMEOUT_S after it was first asked: a request that asks two questions of a lost head
        (a multi-GPU job's checks) waits once, not once per question.

        A daemon thread, not an executor's: the interpreter joins executor threads at exit, so a call
        stuck on a lost head would hold the service's shutdown (SIGTERM, `docker stop`) until it is killed.

        Raises:
            concurrent.futures.TimeoutError: no answer within CHECK_TIMEOUT_S.
        """
        with self._asking:
            pending = self._asked.get(question)
            if pending is None or pending.done():
                pending = self._asked[question] = concurrent.futures.Future()
                self._asked_at[question] = time.monotonic()
                threading.Thread(target=_answer, args=(pending, call), name=f"sqft-ray-{question}", daemon=True).start()
            left = CHECK_TIMEOUT_S - (time.monotonic() - self._asked_at[question])
        return pending.result(timeout=max(left, 0.0))

    def check(self) -> str | None:
        """None while the cluster answers, else why not (GET /ready)."""
        try:
            nodes = self._ask_cluster("nodes", lambda: [n for n in ray.nodes() if n.get("Alive")])
        except concurrent.futures.TimeoutError:
            return f"the Ray cluster at {self.address} does not answer within {CHECK_TIMEOUT_S:.0f} s"
        except Exception as exc:
            return f"the Ray cluster does not answer: {type(exc).__name__}"
        if not nodes:
            return "the Ray cluster has no live node"
        return None

    def check_gpu(self) -> str | None:
        """None while some node of the cluster declares a GPU (``ray.cluster_resources()``), else why not.
        The cluster, not this machine: the service may run on a CPU-only head while GPU nodes take the jobs.

        A cluster that does not answer within CHECK_TIMEOUT_S refuses nothing: the job is queued and
        waits for a node like any other (START_TIMEOUT_S), since the client's config is not at fault.
        """
        try:
            resources = self._ask_cluster("resources", ray.cluster_resources)
        except Exception as exc:  # a timeout, or the cluster is reconnecting
            log.warning("could not ask the Ray cluster for its GPUs (%s); accepting the job", type(exc).__name__)
            return None
        if resources.get("GPU", 0) > 0:
            return None
        return f"no CUDA GPU in the Ray cluster ({self.address}): no node declares one (see `ray status`)"

    def check_gpu_workers(self, device: str, workers: int) -> str | None:
        """For "cuda", None while the cluster declares a GPU per worker (each Ray Train worker asks for one,
        ``worker_resources``); "auto" under Ray asks for none. An unanswered question refuses nothing."""
        if device != "cuda":
            return None
        try:
            resources = self._ask_cluster("resources", ray.cluster_resources)
        except Exception as exc:
            log.warning("could not ask the Ray cluster for its GPUs (%s); accepting the job", type(exc).__name__)
            return None
        return gpus_short(int(resources.get("GPU", 0)), workers, f"the Ray cluster ({self.address})")
