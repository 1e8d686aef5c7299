"""``SQFT_INFERENCE_DTYPE``: what the engine computes in, the API's engine and a batch job's alike.

The tiny Llama served in bf16 gives the next-token distribution of a bf16 forward of the same prompt,
not an fp32 one; a batch job's engine computes in the service's dtype too (a line's log-probabilities
are the route's exactly); ``auto`` is bf16 on a CPU that runs it natively and fp32 elsewhere.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from sqft_service.app import create_app
from sqft_service.inference.engine import InferenceEngine
from sqft_service.inference.spec import ModelSpec
from sqft_service.settings import Settings
from sqft_service.training.precision import native_bf16_supported
from tests.helpers import wait_until
from tests.integration.conftest import fine_tune_briefly, make_settings


def _first_token_logprobs(model_dir, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dtype).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)


def test_the_engine_places_models_in_the_dtype_asked(tmp_path, tiny_model_dir, caplog):
    spec = ModelSpec("tiny", str(tiny_model_dir))
    auto = torch.bfloat16 if native_bf16_supported() else torch.float32
    for dtype, expected in (("bf16", torch.bfloat16), ("fp32", torch.float32), ("auto", auto)):
        engine = InferenceEngine(threads=1, max_queue=0, max_models=1, model_cache_dir=None, device="cpu", dtype=dtype)
        try:
            with caplog.at_level(logging.INFO, logger="sqft_service.inference.engine"):
                model, _, _ = engine._activate(spec)
            assert {p.dtype for p in model.parameters()} == {expected}, dtype
            said = str(expected).removeprefix("torch.")
            assert f"serving {tiny_model_dir} on cpu in {said}" in caplog.text  # what an operator reads
            caplog.clear()
        finally:
            engine.shutdown()
    # An adapter keeps peft's fp32 weights on a bf16 base: cast to bf16, its low-rank matmuls decoded
    # slower on the CPU (README, "Models and inference"), so peft casts each adapted layer's input.
    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(
        adapter
    )
    engine = InferenceEngine(threads=1, max_queue=0, max_models=1, model_cache_dir=None, device="cpu", dtype="bf16")
    try:
        model, _, _ = engine._activate(ModelSpec("ft", str(tiny_model_dir), adapter=str(adapter)))
        assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
        assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    finally:
        engine.shutdown()
    with pytest.raises(SystemExit, match=r"SQFT_INFERENCE_DTYPE='fp16' is not one of auto, bf16, fp32"):
        Settings.from_env({"SQFT_INFERENCE_DTYPE": "fp16"})


def test_served_in_bf16_the_route_and_a_batch_job_compute_in_bf16(tmp_path, tiny_model_dir, tokenizer):
    settings = make_settings(tmp_path / "data", inference_dtype="bf16", inference_threads=1)
    ids = tokenizer("The sky is")["input_ids"]
    body = {"model": str(tiny_model_dir), "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 5}
    with TestClient(create_app(settings)) as client:
        fine_tune_briefly(client, tiny_model_dir, tmp_path)  # a base is served to a project that fine-tuned it
        routed = client.post("/v1/completions", json=body)
        assert routed.status_code == 200, routed.text
        top = routed.json()["choices"][0]["logprobs"]["top_logprobs"][0]

        bf16, fp32 = (_first_token_logprobs(tiny_model_dir, ids, d) for d in (torch.bfloat16, torch.float32))
        texts = {tokenizer.decode([i]): i for i in bf16.topk(5).indices.tolist()}
        assert set(top) == set(texts)  # the five likeliest tokens of the bf16 forward
        gaps = [(abs(v - float(bf16[texts[t]])), abs(v - float(fp32[texts[t]]))) for t, v in top.items()]
        assert max(g for g, _ in gaps) < 1e-3, gaps  # a bf16 forward's values ...
        assert max(g for _, g in gaps) > 1e-3, gaps  # ... which an fp32 forward's are not

        line = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": body}
        (tmp_path / "b.jsonl").write_text(json.dumps(line) + "\n")
        with open(tmp_path / "b.jsonl", "rb") as handle:
            uploaded = client.post("/v1/files", files={"file": ("b.jsonl", handle)}, data={"purpose": "batch"})
        batch = client.post(
            "/v1/batches", json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/completions"}
        ).json()
        done = wait_until(
            lambda: (b := client.get(f"/v1/batches/{batch['id']}").json())["status"] in ("completed", "failed") and b,
            120,
            what="the batch",
        )
        assert done["status"] == "completed", done
        (row,) = client.get(f"/v1/files/{done['output_file_id']}/content").text.splitlines()
        answered = json.loads(row)["response"]["body"]["choices"][0]["logprobs"]
        assert answered == routed.json()["choices"][0]["logprobs"]  # the job's engine computed in bf16 too
