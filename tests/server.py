"""The real server (``python -m sqft_service.cli serve``) in a subprocess, for tests that need a real
process to kill, restart or load."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.helpers import wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data_dir: Path, **env: str) -> None:
        self.data_dir = data_dir
        self.extra_env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(
            os.environ,
            SQFT_DATA_DIR=str(self.data_dir),
            SQFT_PORT=str(self.port),
            HF_HUB_OFFLINE="1",
            # Models come from the SmolLM2 package and the data dir's models/ (roots by default); the
            # test's own directory is listed too, for anything a test builds there.
            SQFT_MODEL_ROOTS=str(self.data_dir.parent),
        )
        env.update(self.extra_env)
        self.log = open(  # noqa: SIM115 - closed in stop()
            self.data_dir.parent / f"server-{self.port}.log", "ab"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sqft_service.cli", "serve"], env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

        def healthy() -> bool:
            assert self.proc.poll() is None, "server exited during start-up"
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 60, interval=0.3, what="the server to answer /health")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def kill(self) -> None:
        """``kill -9`` of the service process alone: its job processes live on in their own sessions."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()
