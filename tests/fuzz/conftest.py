"""The fuzz run's server: the real service in a subprocess, with seeded objects, and the end-of-run tally."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fuzz.harness import KNOWN, SERVER_ENV, TALLY, seed_server
from tests.server import Server


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_model_dir) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("fuzz")
    data_dir = tmp / "sqft-data"
    data_dir.mkdir()
    # The only model root besides the data dir's models/ is the tiny model itself: whatever model a
    # fuzzed request names, nothing bigger can be loaded.
    server = Server(data_dir, SQFT_MODEL_ROOTS=str(tiny_model_dir), **SERVER_ENV)
    server.start()
    TALLY.log_path = str(tmp / f"server-{server.port}.log")
    try:
        seed_server(server.url, tmp, tiny_model_dir, KNOWN)
        yield server
    finally:
        server.stop()


def pytest_terminal_summary(terminalreporter) -> None:
    if TALLY.cases:
        terminalreporter.write_sep("=", "fuzz: cases per operation")
        terminalreporter.write_line(TALLY.report())
