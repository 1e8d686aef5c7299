"""Data parallel on this machine's GPUs (jobs/local_ranks.py): one rank per GPU, NCCL between them.

On a one-GPU machine: a rank joins an NCCL group on its GPU and reduces a CUDA tensor, and the
service's probe refuses more workers than GPUs. With two GPUs or more: a two-worker job runs through
the service, one GPU each, and its adapter opens on the CPU with stock peft.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sqft_service.jobs import local_ranks
from sqft_service.jobs.subprocess_runner import SubprocessRunner
from sqft_service.training.distributed import DataParallel
from tests.conftest import make_tiny_llama
from tests.helpers import alpaca_records, write_json


def test_a_rank_joins_an_nccl_group_on_its_own_gpu():
    store = local_ranks.open_store(1)
    local_ranks.join_group(0, 1, store=store, on_gpus=True)
    try:
        assert dist.get_backend() == "nccl" and torch.cuda.current_device() == 0
        summed = torch.ones(4, device="cuda")
        dist.all_reduce(summed)
        assert summed.tolist() == [1.0] * 4
        assert DataParallel.current().world_size == 1  # one rank: trains as a single process
    finally:
        dist.destroy_process_group()


def test_more_workers_than_gpus_are_refused_by_the_service_probe():
    gpus = torch.cuda.device_count()
    runner = SubprocessRunner()
    assert runner.check_gpu_workers("cuda", gpus) is None
    short = runner.check_gpu_workers("auto", gpus + 1)
    assert short is not None and f"take one GPU each, and this machine has {gpus}" in short
    assert local_ranks.ranks_on_gpus({"device": "auto"}, gpus, local_ranks.local_gpu_count()) is True


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two ranks on GPUs need two GPUs")
def test_two_workers_train_on_two_gpus_through_the_service(tmp_path, gpu_tokenizer_dir):
    # Here, not at the top: the GPU image has no FastAPI (bench/gpu/prepare_carry.sh carries no service
    # wheels), and a failed import at collection would stop every GPU test; a two-GPU machine needs it.
    from fastapi.testclient import TestClient
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sqft_service.app import create_app
    from tests.integration.conftest import make_settings, upload, wait_status

    tokenizer = AutoTokenizer.from_pretrained(gpu_tokenizer_dir)
    model_dir = tmp_path / "tiny"
    make_tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    training = {"num_training_workers": 2, "batch_size": 2, "epochs": 1, "device": "cuda", "logging_steps": 1}
    with TestClient(create_app(make_settings(tmp_path / "data", model_roots=(tmp_path,)))) as client:
        f = upload(client, write_json(tmp_path / "t.json", alpaca_records(16)))
        body = {"model": str(model_dir), "training_file": f["id"], "Training": training}
        job = client.post("/v1/fine_tuning/jobs", json=body)
        assert job.status_code == 200, job.text
        done = wait_status(client, job.json()["id"], ("succeeded", "failed", "cancelled"), timeout=300)
        assert done["status"] == "succeeded", done["error"]
        events = client.get(f"/v1/fine_tuning/jobs/{done['id']}/events?limit=1000").json()["data"]
        assert any(e["message"].startswith("data-parallel over 2 ranks (one GPU each)") for e in events)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), done["fine_tuned_model_path"])
    assert any(float(p.abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
