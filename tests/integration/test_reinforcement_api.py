"""Reinforcement fine-tuning (``method.type: "reinforcement"``) through the API: the official SDK end to
end on a real server, and the requests the service refuses, each naming its field."""

from __future__ import annotations

import openai
import pytest

from tests.helpers import write_jsonl
from tests.integration.conftest import assert_job_refused, sdk_job_end, upload
from tests.unit.test_reinforcement import COLOUR_FORMAT, SIMILARITY, prompt_records

CHECK = {
    "type": "string_check",
    "name": "exact",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "operation": "ilike",
}


def test_openai_sdk_runs_a_reinforcement_job_and_chats_with_its_model(sdk, tmp_path, tiny_model_dir):
    client = sdk
    with open(write_jsonl(tmp_path / "prompts.jsonl", prompt_records(8)), "rb") as handle:
        uploaded = client.files.create(file=handle, purpose="fine-tune")
    hyperparameters = {
        "n_epochs": 1,
        "batch_size": 2,
        "compute_multiplier": 0.75,
        "eval_interval": 2,
        "eval_samples": 2,
    }
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir),
        training_file=uploaded.id,
        method={"type": "reinforcement", "reinforcement": {"grader": SIMILARITY, "hyperparameters": hyperparameters}},
        extra_body={
            "Training": {"logging_steps": 1, "rl_max_tokens": 4},
            "Dataset": {"validation_split_percentage": 25},
        },
    )
    rl = job.method.reinforcement
    assert job.method.type == "reinforcement" and rl.grader.type == "text_similarity"
    assert rl.grader.reference == "{{ item.answer }}"
    # compute_multiplier 0.75: 3 answers per prompt (4 x 0.75); eval_interval and eval_samples as given.
    assert rl.hyperparameters.compute_multiplier == 0.75 and rl.hyperparameters.eval_interval == 2
    assert rl.hyperparameters.eval_samples == 2 and rl.hyperparameters.reasoning_effort == "default"
    done = sdk_job_end(client, job.id)
    assert done.status == "succeeded", done.error
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    texts = [e.message for e in events]
    assert any("step 1: sampled 6 answers" in t for t in texts), texts  # 2 prompts x 3
    rows = [e.data for e in events if e.type == "metrics" and e.data]
    assert any("train_reward_mean" in r for r in rows) and any("valid_reward_mean" in r for r in rows), rows

    # The model answers chat requests as the prompts were rendered in training (the chat template).
    answer = client.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "Name colour number 3."}], max_tokens=4
    )
    assert answer.model == done.fine_tuned_model and 1 <= answer.usage.completion_tokens <= 4

    # Prompts have no reference replies: an evaluate job on them is refused, pointing at the Evals API.
    for body, param in (({"file": uploaded.id}, "file"), ({"fine_tuning_job_id": job.id}, "fine_tuning_job_id")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.post("/finetune/evaluate", body={"candidates": [done.fine_tuned_model], **body}, cast_to=object)
        error = refused.value.body
        assert error["param"] == param and "prompt records, which have no reference replies" in error["message"]
        assert "/v1/evals" in error["message"]


def test_the_reference_route_takes_the_grader_in_training(client, tmp_path, tiny_model_dir):
    f = upload(client, write_jsonl(tmp_path / "prompts.jsonl", prompt_records(4)))
    body = {
        "model": str(tiny_model_dir),
        "training_file": f["id"],
        "Training": {"method": "reinforcement", "rl_grader": CHECK, "rl_group_size": 2, "rl_max_tokens": 2},
    }
    resp = client.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 200, resp.text
    method = resp.json()["method"]
    assert method["type"] == "reinforcement" and method["reinforcement"]["grader"] == CHECK
    assert method["reinforcement"]["hyperparameters"]["compute_multiplier"] == 0.5
    # A response format every answer is held to, checked as chat's and echoed in the job's method.
    body["Training"]["rl_response_format"] = {"type": "json_object"}
    resp = client.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["method"]["reinforcement"]["response_format"] == {"type": "json_object"}
    openai_body = rl_job(tiny_model_dir, f["id"], Training={"rl_group_size": 2, "rl_max_tokens": 2})
    openai_body["method"]["reinforcement"]["response_format"] = COLOUR_FORMAT
    resp = client.post("/v1/fine_tuning/jobs", json=openai_body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["method"]["reinforcement"]["response_format"] == COLOUR_FORMAT
    del body["Training"]["rl_response_format"]
    # A multi grader too, its graders' scores combined by its formula, echoed as given.
    body["Training"]["rl_grader"] = MULTI
    resp = client.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 200 and resp.json()["method"]["reinforcement"]["grader"] == MULTI, resp.text


def chat_records(n: int) -> list[dict]:
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    return [{"messages": turns} for _ in range(n)]


def rl_job(model, file_id: str, **extra) -> dict:
    return {
        "model": str(model),
        "training_file": file_id,
        "method": {"type": "reinforcement", "reinforcement": {"grader": CHECK}},
        **extra,
    }


def _grader(**changes) -> dict:
    return {"type": "reinforcement", "reinforcement": {"grader": {**CHECK, **changes}}}


JUDGE = {
    "type": "score_model",
    "name": "judge",
    "model": "ft:none:org-local::ftjob-000000000000000000000000",
    "input": [{"role": "user", "content": "Score {{ sample.output_text }} against {{ item.answer }}"}],
}
MULTI = {
    "type": "multi",
    "name": "blend",
    "graders": {"exact": CHECK, "close": SIMILARITY},
    "calculate_output": "0.5 * exact + 0.5 * close",
}


BAD = {"type": "object", "properties": {"a": {"$ref": "#/definitions/nowhere"}}}


def _multi(graders: dict) -> dict:
    return {"type": "reinforcement", "reinforcement": {"grader": {**MULTI, "graders": graders}}}


@pytest.mark.parametrize(
    "change, param, words",
    [
        ({"training_file": "sft"}, "training_file", "holds chat records; a reinforcement job needs prompt records"),
        ({"method": None}, "training_file", "holds prompt records; a supervised job needs Alpaca or chat records"),
        ({"method": {"type": "reinforcement", "dpo": {}}}, "method", "`method.dpo` given with `method.type`"),
        ({"method": _grader(reference="{{ row.answer }}")}, "method.reinforcement.grader.reference", "row"),
        ({"method": _grader(operation="contains")}, "method.reinforcement.grader.operation", "'eq'"),
        (
            {"method": {"type": "reinforcement", "reinforcement": {"grader": {"type": "python", "source": "x"}}}},
            "method.reinforcement.grader.type",
            "'python' graders are not offered here",
        ),
        (
            {
                "method": {
                    **_grader(),
                    "reinforcement": {"grader": CHECK, "hyperparameters": {"compute_multiplier": 17}},
                }
            },
            "method.reinforcement.hyperparameters.compute_multiplier",
            "at most 16",
        ),
        (
            {
                "method": {
                    **_grader(),
                    "reinforcement": {"grader": CHECK, "hyperparameters": {"reasoning_effort": "high"}},
                }
            },
            "method.reinforcement.hyperparameters.reasoning_effort",
            "no reasoning effort",
        ),
        (
            {"method": {"type": "reinforcement", "reinforcement": {"grader": {**MULTI, "calculate_output": "x"}}}},
            "method.reinforcement.grader.calculate_output",
            "the formula reads `x`, which is not one of `graders` (exact, close)",
        ),
        (
            {"method": _multi({"exact": CHECK, "p": {"type": "python", "source": "x"}})},
            "method.reinforcement.grader.graders.p.type",
            "'python' graders are not offered here",
        ),
        (
            {"method": _multi({"exact": JUDGE, "close": {**JUDGE, "model": "another"}})},
            "method.reinforcement.grader.graders.exact.model",
            "share one judge model; these name ft:none:org-local::ftjob-000000000000000000000000, another",
        ),
        (
            {"method": {**_grader(), "reinforcement": {"grader": CHECK, "response_format": {"type": "json_schema"}}}},
            "method.reinforcement.response_format",
            "`json_schema` is given with `type: json_schema`",
        ),
        (
            {"Training": {"rl_response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": BAD}}}},
            "Training.rl_response_format",
            "this JSON schema is not supported",
        ),
        (
            {"method": None, "Training": {"rl_response_format": {"type": "json_object"}}},
            "Training",
            "`rl_response_format` applies to reinforcement",
        ),
        ({"Dataset": {"packing": True}}, "Dataset.packing", "leave `Dataset.packing` off"),
        ({"Dataset": {"mask_input": False}}, "Dataset.mask_input", "a reinforcement job scores the replies only"),
        ({"method": None, "Training": {"rl_group_size": 8}}, "Training", "`rl_group_size` applies to reinforcement"),
        ({"method": None, "Training": {"method": "reinforcement"}}, "Training", "a reinforcement job needs a grader"),
        (
            {"method": None, "Training": {"method": "reinforcement", "rl_grader": {**CHECK, "operation": "x"}}},
            "Training.rl_grader",
            "string_check.operation",
        ),
        (
            {"Training": {"rl_judge": {"model": "/etc"}}},
            "Training.rl_judge",
            "set by the service from the grader's `model`",
        ),
        ({"Training": {"rl_group_size": 1}}, "Training.rl_group_size", "greater than or equal to 2"),
        ({"Training": {"rl_clip_epsilon": 0.1}}, "Training", "`rl_clip_epsilon` applies with `rl_updates_per_sample`"),
        ({"Training": {"rl_updates_per_sample": 17}}, "Training.rl_updates_per_sample", "less than or equal to 16"),
        ({"Training": {"rl_kl_beta": -1}}, "Training.rl_kl_beta", "greater than or equal to 0"),
        ({"method": None, "Training": {"rl_kl_beta": 0.1}}, "Training", "`rl_kl_beta` applies to reinforcement"),
        ({"Training": {"torch_compile": True}}, "Training", "`torch_compile` does not apply to reinforcement"),
    ],
)
def test_a_reinforcement_request_the_service_cannot_honour_is_a_400_naming_the_field(
    client, tmp_path, tiny_model_dir, change, param, words
):
    prompts = upload(client, write_jsonl(tmp_path / "prompts.jsonl", prompt_records(4)))
    assert prompts["format"] == "prompt" and prompts["n_records"] == 4
    sft = upload(client, write_jsonl(tmp_path / "sft.jsonl", chat_records(4)))
    body = rl_job(tiny_model_dir, prompts["id"])
    assert_job_refused(client, body, change, sft["id"], param, words)


@pytest.mark.parametrize("via_method", [True, False, "multi"], ids=["openai", "reference", "multi"])
def test_a_judge_the_caller_cannot_use_is_a_404_naming_the_graders_model(client, tmp_path, tiny_model_dir, via_method):
    prompts = upload(client, write_jsonl(tmp_path / "prompts.jsonl", prompt_records(4)))
    if via_method:
        method = {"type": "reinforcement", "reinforcement": {"grader": JUDGE}}
        if via_method == "multi":  # a judge among a multi grader's graders
            method = _multi({"exact": CHECK, "close": JUDGE})
        body = rl_job(tiny_model_dir, prompts["id"], method=method)
    else:
        body = {"model": str(tiny_model_dir), "training_file": prompts["id"]}
        body["Training"] = {"method": "reinforcement", "rl_grader": JUDGE}
    resp = client.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 404, resp.text
    param = {True: "method.reinforcement.grader.model", False: "Training.rl_grader"}.get(via_method)
    param = param or "method.reinforcement.grader.graders.close.model"
    assert resp.json()["error"]["param"] == param
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


@pytest.mark.parametrize("multi", [False, True], ids=["score_model", "multi"])
def test_a_score_model_grader_judges_with_a_model_of_the_service(sdk, tmp_path, tiny_model_dir, multi):
    client = sdk
    with open(write_jsonl(tmp_path / "prompts.jsonl", prompt_records(4)), "rb") as handle:
        uploaded = client.files.create(file=handle, purpose="fine-tune")
    judge = {**JUDGE, "model": str(tiny_model_dir), "range": [0, 1]}
    if multi:  # the judge as one of a multi grader's graders
        judge = {**MULTI, "graders": {"judge": judge, "exact": CHECK}, "calculate_output": "(judge + exact) / 2"}
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir),
        training_file=uploaded.id,
        method={"type": "reinforcement", "reinforcement": {"grader": judge, "hyperparameters": {"batch_size": 2}}},
        extra_body={"Training": {"logging_steps": 1, "rl_max_tokens": 4, "max_train_steps": 2}},
    )
    assert job.method.reinforcement.grader.type == ("multi" if multi else "score_model")
    done = sdk_job_end(client, job.id)
    assert done.status == "succeeded", done.error
    rows = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "metrics"]
    rewards = [r["train_reward_mean"] for r in rows if r and "train_reward_mean" in r]
    assert len(rewards) == 2 and all(0.0 <= r <= 1.0 for r in rewards)


@pytest.mark.parametrize(
    "grader, words",
    [
        ({"type": "python", "name": "p", "source": "x"}, "`Training.rl_grader.type`: 'python' graders are not offered"),
        ({**CHECK, "reference": "{{ row.answer }}"}, "`Training.rl_grader.reference`: a template reads `item`"),
    ],
)
def test_the_reference_routes_grader_is_refused_naming_its_own_field(client, tmp_path, tiny_model_dir, grader, words):
    f = upload(client, write_jsonl(tmp_path / "prompts.jsonl", prompt_records(4)))
    body = {"model": str(tiny_model_dir), "training_file": f["id"]}
    body["Training"] = {"method": "reinforcement", "rl_grader": grader}
    resp = client.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "Training.rl_grader" and words in error["message"], error
