"""The fuzz run's fixtures: the real server with seeded objects, its schema, and the end-of-run tally."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import strategies as st

from tests.fuzz.harness import SERVER_ENV, TALLY, Known, seed_server
from tests.server import Server

# Checks every case runs, and the one left out.
# positive_data_acceptance is off: it wants every schema-valid request accepted, but this API answers
# 400 (as OpenAI does) to well-formed requests whose values the schema cannot judge: a model path
# outside the model roots, a file that is not training data, cancelling a job that has finished.
FUZZ_CONFIG = {"checks": {"positive_data_acceptance": {"enabled": False}}}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_model_dir) -> Iterator[tuple[Server, Known]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    data_dir = tmp / "sqft-data"
    data_dir.mkdir()
    # The only model root besides the data dir's models/ is the tiny model itself: whatever model a
    # fuzzed request names, nothing bigger can be loaded.
    server = Server(data_dir, SQFT_MODEL_ROOTS=str(tiny_model_dir), **SERVER_ENV)
    server.start()
    try:
        yield server, seed_server(server.url, tmp, tiny_model_dir)
    finally:
        server.stop()
        TALLY.log_path = str(data_dir.parent / f"server-{server.port}.log")


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    server, known = fuzz_server
    schema = schemathesis.openapi.from_url(
        f"{server.url}/openapi.json", config=schemathesis.Config.from_dict(FUZZ_CONFIG)
    )

    @schema.hook
    def before_generate_case(context, strategy):
        return st.tuples(strategy, st.integers(0, 2**16)).map(lambda pair: known.substitute(*pair))

    return schema


def pytest_terminal_summary(terminalreporter) -> None:
    if TALLY.cases:
        terminalreporter.write_sep("=", "fuzz: cases per operation")
        terminalreporter.write_line(TALLY.report())
