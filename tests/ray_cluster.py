"""A throwaway local Ray cluster for tests: ``ray start --block`` in its own session, stopped by pid.

``ray stop`` would stop every Ray on the machine (other users' and other test runs' too), so the test
cluster is started with ``--block`` in a new session, and stopping it signals the processes of that
session only: ``ray start`` itself (which stops what it started on SIGTERM), then SIGKILL for whatever
is left (Ray's workers are in the same session, each in its own process group).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).parent / "ray")
# Ports Ray would otherwise take at fixed numbers (10001, 52365, ...) and share with any other Ray here,
# or pick at random itself (and may then pick one of ours: Ray refuses to start on a clash).
_PORT_FLAGS = (
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
    "--node-manager-port",
    "--object-manager-port",
)


def distinct_free_ports(n: int) -> list[int]:
    """``n`` different free ports: each socket stays bound until all are chosen, so none repeats."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class RayNode:
    """One ``ray start`` (head, or a worker joining ``address``) with its own temp dir."""

    def __init__(
        self, *, num_cpus: int, address: str | None = None, resources: str | None = None, num_gpus: int = 0
    ) -> None:
        # Short: Ray puts unix sockets under it, and a socket path has at most 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="sqft-ray-", dir="/tmp"))
        port, *flag_ports = distinct_free_ports(1 + len(_PORT_FLAGS))
        self.port = port
        self.address = address or f"127.0.0.1:{self.port}"
        # GPUs declared, not detected: a test cluster has the GPUs its test names (Ray schedules on a
        # declared GPU whether or not the machine has one), the same on a CPU machine and a GPU one.
        argv = [RAY, "start", "--block", "--disable-usage-stats", "--num-cpus", str(num_cpus)]
        argv += ["--num-gpus", str(num_gpus)]
        argv += ["--node-ip-address", "127.0.0.1", "--temp-dir", str(self.temp_dir)]
        if address is None:
            argv += ["--head", "--port", str(self.port), "--include-dashboard=false"]
        else:
            argv += ["--address", address]
        for flag, flag_port in zip(_PORT_FLAGS, flag_ports, strict=True):
            argv += [flag, str(flag_port)]
        if resources:
            argv += ["--resources", resources]
        self.log_path = self.temp_dir.with_suffix(".log")
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )

    def wait_started(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited ({self.proc.returncode}): {self.log_path.read_text()[-3000:]}")
            if b"Ray runtime started" in self.log_path.read_bytes():
                return
            time.sleep(0.2)
        raise RuntimeError(f"ray start did not start within {timeout}s: {self.log_path.read_text()[-3000:]}")

    def session_pids(self) -> list[int]:
        pids = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == self.proc.pid:
                    pids.append(proc.pid)
            except (ProcessLookupError, PermissionError):
                continue
        return pids

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for pid in self.session_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)
