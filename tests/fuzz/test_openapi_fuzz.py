"""Schemathesis over the OpenAPI schema of the real server (a subprocess): no 5xx, every response
matches its declared status code and schema, invalid input is refused, protected routes need the key.

The short run is part of `make test`; `make fuzz` runs the same tests with FUZZ_CASES=1000.
"""

from __future__ import annotations

import re

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.fuzz.harness import (
    API_KEY,
    JOBS_WAIT_S,
    KNOWN,
    SEED,
    TALLY,
    app_schema,
    examples_per_operation,
    settle_jobs,
    target_cases,
)

# Every built-in check runs on every case except positive_data_acceptance: it wants every schema-valid
# request accepted, but this API answers 400 (as OpenAI's does) to well-formed requests whose values no
# schema can judge: a model path outside the model roots, a file that is not training data, cancelling
# a job that has already finished.
# The key goes through schemathesis's auth (the schema's `apiKey` bearer scheme). Generated cases keep it
# (`with-security-parameters: false`), or half of the negative ones would test nothing but the 401; the
# `ignored_auth` check resends a case that succeeded without the key and with a wrong one, and
# test_every_operation_needs_the_key sends each operation both.
# A schema-violating body that is also over the size limit is rejected before it is read: 413 is a
# rejection too (schemathesis's default list of rejections lacks it).
REJECTED = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
CONFIG = {
    "seed": SEED,
    "checks": {
        "positive_data_acceptance": {"enabled": False},
        "negative_data_rejection": {"expected-statuses": REJECTED},
    },
    "auth": {"openapi": {"apiKey": {"bearer": API_KEY}}},
    "generation": {"with-security-parameters": False},
}

schema = schemathesis.openapi.from_dict(app_schema(), config=schemathesis.Config.from_dict(CONFIG))


@schema.hook
def before_generate_case(context, strategy):
    # Some positive cases name objects that exist (KNOWN is filled once the server is seeded).
    return st.tuples(strategy, st.integers(0, 2**16)).map(lambda pair: KNOWN.substitute(*pair))


def test_served_schema_is_the_fuzzed_one(fuzz_server):
    """The cases come from the app's schema built in-process; the server must serve exactly it."""
    served = httpx.get(f"{fuzz_server.url}/openapi.json", timeout=30)
    assert served.status_code == 200
    assert served.json() == app_schema()


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", f"Basic {API_KEY}"])
def test_every_operation_needs_the_key(fuzz_server, authorization):
    """Each operation that declares the bearer scheme answers 401 (declared, in the error envelope)
    without the key, with a wrong one, or with the right one in another scheme; /health and /ready stay open."""
    headers = {"Authorization": authorization} if authorization else {}
    for path, operations in app_schema()["paths"].items():
        for method, operation in operations.items():
            url = fuzz_server.url + re.sub(r"\{[^}]+\}", "x", path)
            resp = httpx.request(method, url, headers=headers, json={} if method == "post" else None, timeout=30)
            if not operation.get("security"):
                assert resp.status_code == 200 and path in ("/health", "/ready"), (method, path, resp.status_code)
                continue
            assert resp.status_code == 401 and "401" in operation["responses"], (method, path, resp.text)
            assert resp.json()["error"]["code"] == "invalid_api_key"
            assert resp.headers["www-authenticate"] == "Bearer"


@schema.parametrize()
@settings(
    max_examples=examples_per_operation(),
    deadline=None,
    database=None,  # nothing written to .hypothesis/
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
def test_api_conforms_to_its_schema(case, fuzz_server):
    """One test per operation: every built-in check on each case (see CONFIG)."""
    label = case.operation.label
    phase = case.meta.phase.name.value if case.meta is not None else "explicit"
    transport = {"base_url": fuzz_server.url, "timeout": 60}
    try:
        response = case.call(**transport)
    except BaseException as exc:  # schemathesis raises exception groups
        TALLY.record(label, phase, None)
        TALLY.fail(label, f"{type(exc).__name__}: {exc}")
        raise
    TALLY.record(label, phase, response.status_code)
    try:
        case.validate_response(response, transport_kwargs=transport)
    except BaseException as exc:
        titles = "; ".join(getattr(e, "title", type(e).__name__) for e in getattr(exc, "exceptions", [exc]))
        TALLY.fail(label, f"{titles} [{response.status_code}]: {case.as_curl_command()[:300]}")
        raise


def test_fuzzed_jobs_did_not_crash(fuzz_server):
    """The jobs and operations that fuzzed requests started ended as a success or as the client's error
    (a 400-style `error`), never as a crash: with `wait`, a crashed operation is a 500."""
    if not TALLY.cases:
        pytest.skip("the fuzz tests did not run")
    crashed = settle_jobs(fuzz_server.url, JOBS_WAIT_S)
    for job in crashed:
        TALLY.fail(f"job {job['kind']}", f"{job['id']} {job['error']} params={job.get('params') or job.get('config')}")
    assert not crashed, "\n\n".join(f"{j['id']} {j['error']}\n{j['log_tail']}" for j in crashed)


def test_fuzz_reached_its_case_count():
    """Runs after the fuzz tests (file order): the fuzzing phase alone generated FUZZ_CASES cases."""
    if not TALLY.cases:
        pytest.skip("the fuzz tests did not run")
    assert TALLY.by_phase()["fuzzing"] >= target_cases(), TALLY.report()
