"""Schemathesis over the OpenAPI schema of the real server (a subprocess): no 5xx, every response
matches its declared status code and schema, invalid input is refused, protected routes need the key.

The short run is part of `make test`; `make fuzz` runs the same test with FUZZ_CASES=1000.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.fuzz.harness import AUTH, TALLY, examples_per_operation, target_cases

schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=examples_per_operation(),
    deadline=None,
    database=None,  # nothing written to .hypothesis/
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
def test_api_conforms_to_its_schema(case, fuzz_server):
    server, _ = fuzz_server
    label = case.operation.label
    try:
        response = case.call(base_url=server.url, headers=AUTH, timeout=60)
    except Exception as exc:
        TALLY.record(label, None)
        TALLY.fail(label, f"{type(exc).__name__}: {exc}")
        raise
    TALLY.record(label, response.status_code)
    try:
        case.validate_response(response, headers=AUTH, transport_kwargs={"base_url": server.url, "headers": AUTH})
    except Exception as exc:
        TALLY.fail(label, str(exc).strip().splitlines()[0] + f" [{response.status_code}] {case.as_curl_command()}")
        raise


def test_fuzz_reached_its_case_count():
    """Runs after the fuzz test (file order): the run as a whole reached FUZZ_CASES."""
    if not TALLY.cases:
        pytest.skip("the fuzz test did not run")
    assert TALLY.total >= target_cases(), TALLY.report()
