"""Regressions for what `make fuzz` (tests/fuzz) found: each test is the smallest request that failed."""

from __future__ import annotations

import pytest

from sqft_service.app import create_app
from sqft_service.settings import Settings


@pytest.mark.parametrize("pattern", ["4:2", "2:2", "0:4", "7127025286114970901735383:14", "2:060104"])
def test_sparsify_refuses_a_pattern_that_is_not_n_below_m(client, tiny_model_dir, pattern):
    # Found as a 500 (`sparsify_failed`) once the operation ran: the pattern only had to look like N:M.
    resp = client.post("/v1/finetune/sparsify", json={"model": str(tiny_model_dir), "pattern": pattern})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "pattern"


def test_sparsify_pattern_that_does_not_fit_the_model_is_a_400(client, tiny_model_dir):
    # 2:5 is a fine pattern, but the tiny model's layers have 16 and 32 inputs: the job tells the client
    # (a user error, 400 naming `pattern`), where it used to fail as a crash (500 server_error).
    resp = client.post("/v1/finetune/sparsify", json={"model": str(tiny_model_dir), "pattern": "2:5"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "pattern" and "16" in error["message"], error


def test_405_lists_every_method_of_the_path(client):
    # Starlette's 405 named only the first route of the path (`Allow: POST` for /v1/files), and the error
    # handler dropped the header altogether.
    resp = client.request("PUT", "/v1/files")
    assert resp.status_code == 405
    assert set(resp.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    assert resp.json()["error"]["type"] == "invalid_request_error"
    resp = client.request("PATCH", "/v1/files/file-x")
    assert set(resp.headers["allow"].replace(" ", "").split(",")) >= {"GET", "DELETE"}
    # A concrete path wins over the template that also matches it (OpenAPI's rule).
    assert client.request("PUT", "/v1/fine_tuning/jobs/retrieve").headers["allow"] == "POST"


def test_a_body_that_is_not_json_names_no_field(client):
    resp = client.post("/v1/fine_tuning/jobs", content=b"\x00", headers={"content-type": "application/json"})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["message"].startswith("the request body is not valid JSON") and error["param"] is None, error


def test_openapi_declares_the_error_envelope_not_422(tmp_path):
    schema = create_app(Settings(data_dir=tmp_path, api_key="k")).openapi()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    envelope = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            if path not in ("/health", "/ready"):  # the probes are open without a key
                assert responses["401"]["content"]["application/json"]["schema"] == envelope, (method, path)
    job_routes = schema["paths"]["/v1/fine_tuning/jobs/{job_id}"]["get"]["responses"]
    assert {"200", "401", "404"} <= set(job_routes)
    ref_body = schema["paths"]["/v1/fine_tuning/jobs/retrieve"]["post"]["requestBody"]
    assert ref_body["content"]["application/json"]["schema"]["required"] == ["fine_tuning_job_id"]
    assert (
        "application/octet-stream"
        in (schema["paths"]["/v1/files/{file_id}/content"]["get"]["responses"]["200"]["content"])
    )


def test_a_query_parameter_given_twice_is_a_400(client):
    # Schemathesis sent `limit` as an array (`?limit=1&limit=2`): the schema says one integer, and the
    # service used whichever came last. Every query parameter of this API takes one value.
    resp = client.get("/v1/files", params=[("limit", "1"), ("limit", "2")])
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "limit"
    assert client.get("/v1/files", params={"limit": "1", "order": "asc"}).status_code == 200
