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


def serve_env(data_dir: Path, *, clean_env: bool = False, **extra: str) -> dict[str, str]:
    """The environment of ``sqft serve`` for a test: ``data_dir``, offline, then ``extra`` on top.

    ``clean_env`` drops the calling shell's ``SQFT_*`` variables, for tests whose point is a setting
    (a developer's own ``SQFT_API_KEY`` must not decide an authentication test).
    """
    inherited = {k: v for k, v in os.environ.items() if not (clean_env and k.startswith("SQFT_"))}
    env = dict(
        inherited,
        SQFT_DATA_DIR=str(data_dir),
        HF_HUB_OFFLINE="1",
        # Models come from the SmolLM2 package and the data dir's models/ (roots by default); the
        # test's own directory is listed too, for anything a test builds there.
        SQFT_MODEL_ROOTS=str(data_dir.parent),
    )
    env.update(extra)
    return env


class Server:
    def __init__(self, data_dir: Path, *, clean_env: bool = False, **env: str) -> None:
        self.data_dir = data_dir
        self.clean_env = clean_env
        self.extra_env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = serve_env(self.data_dir, clean_env=self.clean_env, SQFT_PORT=str(self.port), **self.extra_env)
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sqft_service.cli", "serve"], env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

        def healthy() -> bool:
            assert self.proc.poll() is None, f"server exited during start-up: {self.log_path.read_text()[-4000:]}"
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 60, interval=0.3, what="the server to answer /health")

    def stop(self) -> str:
        """Stop the server (SIGINT, as Ctrl-C does); returns its log."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        return self.log_path.read_text()

    def kill(self) -> None:
        """``kill -9`` of the service process alone: its job processes live on in their own sessions."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()
