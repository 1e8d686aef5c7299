"""The Ray runner (SQFT_RUNNER=ray) end to end: a local Ray head started by the test, the real server in
a subprocess, jobs under detached actors that report through their journal.

One Ray head for the module (``ray start --head --num-cpus 2 --include-dashboard=false``, loopback,
its own temp dir and ports), stopped by its pids at the end, even when a test fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import ray  # the `ray` extra: `make test` installs it

from tests.helpers import alpaca_records, wait_until, write_json
from tests.integration.conftest import PYTEST_TMP_ROOT
from tests.ray_cluster import RayNode
from tests.server import Server, free_port

pytestmark = pytest.mark.ray

# The reference README's NLS payload (as in test_sqft_api).
NLS_LORA_CONFIG = {
    "r": 16,
    "neural_lora_search": True,
    "target_module_groups": [["q_proj", "k_proj", "v_proj"], ["up_proj"], ["down_proj"]],
    "search_space": ["16,12,8", "16,12,8", "16,12,8"],
}

LORA = {"General": {"lora_config": {"r": 4, "lora_alpha": 8}}, "Dataset": {"validation_split_percentage": 0}}
SHORT = {**LORA, "Training": {"epochs": 2, "batch_size": 2, "learning_rate": 1e-3, "seed": 3, "logging_steps": 1}}
# Long enough to act on while it runs (~200 tiny steps), short enough to finish in a test.
LONG = {**LORA, "Training": {"epochs": 12, "batch_size": 1, "learning_rate": 1e-3, "seed": 3, "logging_steps": 1}}
MEDIUM = {**LONG, "Training": {**LONG["Training"], "epochs": 5}}  # 80 steps


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayNode]:
    head = RayNode(num_cpus=2)
    try:
        head.wait_started()
        ray.init(address=head.address, namespace="sqft", log_to_driver=False, logging_level="WARNING")
        yield head
    finally:
        ray.shutdown()
        head.stop()


def ray_server(data_dir: Path, head: RayNode, **env: str) -> Server:
    server = Server(
        data_dir,
        SQFT_RUNNER="ray",
        SQFT_RAY_ADDRESS=head.address,
        SQFT_POLL_INTERVAL_S="0.2",
        SQFT_THREADS_PER_JOB="1",
        SQFT_CANCEL_GRACE_S="5",
        SQFT_MODEL_ROOTS=str(PYTEST_TMP_ROOT[0]),  # where the tiny model is
        **env,
    )
    server.start()
    return server


@pytest.fixture
def server(tmp_path, ray_head) -> Iterator[Server]:
    server = ray_server(tmp_path / "data", ray_head)
    yield server
    server.stop()


def upload_colors(server: Server, tmp_path: Path) -> str:
    path = write_json(tmp_path / "colors.json", alpaca_records(16))
    with open(path, "rb") as handle:
        resp = httpx.post(f"{server.url}/v1/files", files={"file": handle}, data={"purpose": "fine-tune"})
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


@pytest.fixture
def train_file(server, tmp_path) -> str:
    return upload_colors(server, tmp_path)


def create_job(server: Server, model: Path, file_id: str, body: dict) -> dict:
    resp = httpx.post(f"{server.url}/v1/fine_tuning/jobs", json={"model": str(model), "training_file": file_id, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def get_job(server: Server, job_id: str) -> dict:
    return httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}").json()


def wait_final(server: Server, job_id: str, timeout: float = 180) -> dict:
    final = ("succeeded", "failed", "cancelled")
    return wait_until(lambda: (j := get_job(server, job_id))["status"] in final and j, timeout, what=f"{job_id} to end")


def events(server: Server, job_id: str) -> list[dict]:
    return httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}/events?limit=1000").json()["data"][::-1]


def steps_done(server: Server, job_id: str) -> int:
    data = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}/events?limit=5").json()["data"]
    return max([e["data"]["step"] for e in data if e["type"] == "metrics" and "step" in (e["data"] or {})] or [0])


def actor_alive(job_id: str) -> bool:
    try:
        ray.get_actor(f"sqft-job-{job_id}", namespace="sqft")
    except ValueError:
        return False
    return True


def job_pid(data_dir: Path, job_id: str) -> int:
    from sqft_service.store.db import Database
    from sqft_service.store.jobs import JobStore

    db = Database(data_dir / "sqft.db")
    try:
        return JobStore(db).get(job_id).pid
    finally:
        db.close()


def is_job_process(pid: int, job_id: str) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and job_id in " ".join(proc.cmdline())
    except psutil.NoSuchProcess:
        return False


def test_ready_reports_the_ray_cluster(server):
    body = httpx.get(f"{server.url}/ready").json()
    assert body["status"] == "ready" and body["checks"]["ray_cluster"] == {"ok": True}


def test_lora_job_runs_under_a_ray_actor_and_reports_through_its_journal(server, train_file, tiny_model_dir):
    job = create_job(server, tiny_model_dir, train_file, SHORT)
    done = wait_final(server, job["id"])
    assert done["status"] == "succeeded", done["error"]
    assert Path(done["fine_tuned_model_path"], "adapter_model.safetensors").is_file()
    assert done["trained_tokens"] > 0 and done["result_files"]

    messages = [e["message"] for e in events(server, job["id"])]
    assert messages[-1] == "The job has successfully completed"
    assert any(m.startswith("job process started (pid") for m in messages)  # written by the job, on Ray
    metrics = [e for e in events(server, job["id"]) if e["type"] == "metrics"]
    assert [e["data"]["step"] for e in metrics][:3] == [1, 2, 3]
    checkpoints = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert checkpoints and checkpoints[0]["step_number"] == 16  # 16 records / batch 2 x 2 epochs

    workspace = server.data_dir / "jobs" / job["id"]
    assert (workspace / "journal.jsonl").stat().st_size > 0
    assert "job process started" in httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job['id']}/log").text
    assert not actor_alive(job["id"])  # released once the job ended


def test_nls_job_on_ray(server, train_file, tiny_model_dir):
    body = {**SHORT, "General": {"lora_config": NLS_LORA_CONFIG}, "Training": {**SHORT["Training"], "epochs": 1}}
    job = create_job(server, tiny_model_dir, train_file, body)
    done = wait_final(server, job["id"])
    assert done["status"] == "succeeded", done["error"]
    assert Path(done["fine_tuned_model_path"], "nls_stats.json").is_file()
    sub = httpx.post(
        f"{server.url}/v1/finetune/extract_adapter",
        json={"fine_tuning_job_id": job["id"], "sub_adapter_version": "heuristic"},
        timeout=120,
    )
    assert sub.status_code == 200, sub.text  # an operation job, on Ray too
    assert sub.json()["ranks"] == [12] * 6


def test_cancel_stops_a_two_worker_ray_train_job_at_a_step_boundary(server, train_file, tiny_model_dir):
    # The Ray Train workers are outside the job's process group: the stop reaches them through rank 0.
    training = {**LONG["Training"], "num_training_workers": 2, "resources_per_worker": {"CPU": 1}}
    job = create_job(server, tiny_model_dir, train_file, {**LONG, "Training": training})
    wait_until(lambda: steps_done(server, job["id"]) >= 2, 180, what="a few steps")
    pid = job_pid(server.data_dir, job["id"])
    assert is_job_process(pid, job["id"])
    resp = httpx.post(f"{server.url}/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert resp.status_code == 200
    assert wait_final(server, job["id"], timeout=60)["status"] == "cancelled"
    wait_until(lambda: not is_job_process(pid, job["id"]), 15, what="the job process to exit")
    assert not actor_alive(job["id"])
    messages = [e["message"] for e in events(server, job["id"])]
    assert any(m.startswith("stopped: stopped at step") for m in messages)  # rank 0 stopped every rank
    assert steps_done(server, job["id"]) < 150  # stopped early, not run to the end
    # The workers' resources are back: nothing of the job is left on the cluster.
    wait_until(lambda: ray.available_resources().get("CPU") == 2, 30, what="the cluster's CPUs to be free")


def test_a_restarted_service_reattaches_to_the_job_ray_kept_running(tmp_path, ray_head, tiny_model_dir):
    data_dir = tmp_path / "data"
    first = ray_server(data_dir, ray_head)
    try:
        job = create_job(first, tiny_model_dir, upload_colors(first, tmp_path), LONG)
        wait_until(lambda: steps_done(first, job["id"]) >= 3, 120, what="a few steps")
    finally:
        first.stop()  # a graceful stop: Ray keeps the job running
    pid = job_pid(data_dir, job["id"])
    assert is_job_process(pid, job["id"]) and actor_alive(job["id"])

    second = ray_server(data_dir, ray_head)
    try:
        done = wait_final(second, job["id"], timeout=240)
        assert done["status"] == "succeeded", done["error"]
        messages = [e["message"] for e in events(second, job["id"])]
        assert "The service stopped; the job keeps running on the Ray cluster" in messages
        assert "The service restarted and re-attached to the running job" in messages
        assert not any(m.startswith("Interrupted") or "started again" in m for m in messages)
        steps = [e["data"]["step"] for e in events(second, job["id"]) if e["type"] == "metrics"]
        assert steps == sorted(set(steps))  # the journal was read again from the start, nothing twice
    finally:
        second.stop()


def test_a_job_whose_actor_dies_is_requeued_and_resumes(tmp_path, ray_head, tiny_model_dir):
    # A resume point after every step, so the relaunch resumes where the kill landed.
    server = ray_server(tmp_path / "data", ray_head, SQFT_CHECKPOINT_INTERVAL_S="0")
    try:
        job = create_job(server, tiny_model_dir, upload_colors(server, tmp_path), MEDIUM)
        wait_until(lambda: steps_done(server, job["id"]) >= 5, 120, interval=0.05, what="some steps")
        pid = job_pid(server.data_dir, job["id"])
        # As when Ray loses the actor's node or its memory monitor kills the actor: no exit status.
        ray.kill(ray.get_actor(f"sqft-job-{job['id']}", namespace="sqft"))
        wait_until(lambda: not is_job_process(pid, job["id"]), 15, what="the job process to die with its actor")
        done = wait_final(server, job["id"], timeout=240)
        assert done["status"] == "succeeded", done["error"]
        messages = [e["message"] for e in events(server, job["id"])]
        interrupted = "Interrupted: the job process died (exit code 137); queued again, it will resume from its last"
        assert any(m.startswith(interrupted) for m in messages)
        assert "Fine-tuning job started again (launch 2)" in messages
        resumed = [m for m in messages if m.startswith("resuming from step ")]
        assert resumed and int(resumed[0].split()[3]) >= 4
    finally:
        server.stop()


def test_asking_for_ray_without_it_installed_says_what_to_install(tmp_path):
    # The interpreter as a service whose environment lacks Ray (an import of `ray` fails).
    code = "import sys; sys.modules['ray'] = None; from sqft_service.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, SQFT_DATA_DIR=str(tmp_path / "data"))
    proc = subprocess.run(
        [sys.executable, "-c", code, "serve", "--runner", "ray"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "pip install -e '.[ray]'" in proc.stderr and "Traceback" not in proc.stderr


def metric_losses(server: Server, job_id: str) -> list[float]:
    return [
        e["data"]["train_loss"] for e in events(server, job_id) if e["type"] == "metrics" and "train_loss" in e["data"]
    ]


def test_two_ray_train_workers_train_like_one_worker_with_the_same_global_batch(server, train_file, tiny_model_dir):
    # No dropout and fp32: what remains between the runs is the order of float sums (gradients all-reduced).
    lora = {"General": {"lora_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}}}
    training = {**SHORT["Training"], "mixed_precision": "no"}
    one = create_job(server, tiny_model_dir, train_file, {**SHORT, **lora, "Training": {**training, "batch_size": 2}})
    two_workers = {**training, "batch_size": 1, "num_training_workers": 2, "resources_per_worker": {"CPU": 1}}
    two = create_job(server, tiny_model_dir, train_file, {**SHORT, **lora, "Training": two_workers})
    for job in (one, two):
        done = wait_final(server, job["id"], timeout=240)
        assert done["status"] == "succeeded", done["error"]

    log = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{two['id']}/log").text
    assert "Ray Train: 2 workers" in log
    messages = [e["message"] for e in events(server, two["id"])]
    assert any(m.startswith("data-parallel over 2 ranks: global batch 2") for m in messages)
    a, b = metric_losses(server, one["id"]), metric_losses(server, two["id"])
    assert len(a) == len(b) == 16
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4, (a, b)


def test_a_job_runs_on_a_second_ray_node_that_shares_the_data_dir(server, train_file, tiny_model_dir, ray_head):
    # A second raylet on this machine, with its own temp dir: the only node with the `second_node` resource.
    second = RayNode(num_cpus=1, address=ray_head.address, resources='{"second_node": 1}')
    try:
        second.wait_started()
        wait_until(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 30, what="the second node to join")
        training = {**SHORT["Training"], "resources_per_worker": {"CPU": 1, "second_node": 1}}
        job = create_job(server, tiny_model_dir, train_file, {**SHORT, "Training": training})
        done = wait_final(server, job["id"])
        assert done["status"] == "succeeded", done["error"]
        assert Path(done["fine_tuned_model_path"], "adapter_model.safetensors").is_file()
    finally:
        second.stop()


def test_no_cluster_at_the_ray_address_stops_the_service_at_once(tmp_path):
    env = dict(os.environ, SQFT_DATA_DIR=str(tmp_path / "data"), SQFT_RAY_ADDRESS=f"127.0.0.1:{free_port()}")
    proc = subprocess.run(
        [sys.executable, "-m", "sqft_service.cli", "serve", "--runner", "ray"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "no Ray cluster at SQFT_RAY_ADDRESS=" in proc.stderr and "ray start --head" in proc.stderr


def test_a_node_that_does_not_see_the_data_dir_fails_the_launch_naming_it(ray_head, tmp_path):
    from sqft_service.jobs.ray_runner import RayRunner
    from sqft_service.jobs.runner import LaunchError, LaunchSpec

    runner = RayRunner(ray_head.address)
    missing = tmp_path / "not-mounted"
    spec = LaunchSpec(
        "ftjob-nodata", [sys.executable, "-c", "pass"], dict(os.environ), tmp_path / "job.log", tmp_path, [missing]
    )
    handle = runner.submit(spec)  # returns at once: the start is settled by poll

    def launch_refused() -> bool:
        with pytest.raises(LaunchError, match=f"does not see {missing}: the data dir must be on a file system shared"):
            while runner.poll(handle) is None:
                pass
        return True

    wait_until(launch_refused, 60, what="the launch to be refused")
    assert not actor_alive("ftjob-nodata")


def test_a_job_no_node_can_take_waits_without_holding_the_service_and_cancels_at_once(
    server, train_file, tiny_model_dir
):
    # No node has this resource: Ray keeps the actor pending. The service must stay responsive (the
    # placement wait is not under the manager's lock) and a cancel must end the job at once.
    training = {**SHORT["Training"], "resources_per_worker": {"CPU": 1, "no_such_accelerator": 1}}
    job = create_job(server, tiny_model_dir, train_file, {**SHORT, "Training": training})
    wait_until(lambda: get_job(server, job["id"])["status"] == "running", 30, what="the job to be submitted")
    assert actor_alive(job["id"])
    resp = httpx.post(f"{server.url}/v1/fine_tuning/jobs/{job['id']}/cancel", timeout=10)
    assert resp.status_code == 200
    assert wait_final(server, job["id"], timeout=20)["status"] == "cancelled"
    wait_until(lambda: not actor_alive(job["id"]), 15, what="the pending actor to be removed")
    assert httpx.get(f"{server.url}/v1/fine_tuning/jobs", timeout=5).status_code == 200


def cuda_body() -> dict:
    return {**SHORT, "Training": {**SHORT["Training"], "device": "cuda"}}


def test_cuda_is_refused_when_no_ray_node_declares_a_gpu(server, train_file, tiny_model_dir, ray_head):
    # The service asks the cluster, not its own machine. The head declares no GPU (and a GPU node of an
    # earlier test must be gone from the cluster's resources first).
    wait_until(lambda: not ray.cluster_resources().get("GPU"), 30, what="no GPU in the cluster")
    before = httpx.get(f"{server.url}/v1/fine_tuning/jobs").json()["data"]
    body = {"model": str(tiny_model_dir), "training_file": train_file, **cuda_body()}
    resp = httpx.post(f"{server.url}/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "Training.device" and error["code"] == "invalid_configuration"
    assert f"no CUDA GPU in the Ray cluster ({ray_head.address})" in error["message"]
    assert httpx.get(f"{server.url}/v1/fine_tuning/jobs").json()["data"] == before  # nothing was created


def test_a_cuda_job_is_placed_on_the_node_that_declares_a_gpu_and_gets_it(server, train_file, tiny_model_dir, ray_head):
    # A CPU-only head (the service's machine) and a node that declares one GPU: "cuda" is accepted, the
    # job's actor asks Ray for the GPU and lands on that node. There is no real GPU on this machine, so
    # the job itself then fails, naming the field.
    gpu_node = RayNode(num_cpus=1, address=ray_head.address, num_gpus=1)
    try:
        gpu_node.wait_started()
        wait_until(lambda: ray.cluster_resources().get("GPU") == 1, 30, what="the GPU node to join")
        # Two workers asking for a GPU each where the cluster declares one: a 400 naming the workers.
        two = cuda_body()
        two["Training"] = {**two["Training"], "num_training_workers": 2}
        refused = httpx.post(
            f"{server.url}/v1/fine_tuning/jobs", json={"model": str(tiny_model_dir), "training_file": train_file, **two}
        )
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "Training.num_training_workers"
        assert f"the Ray cluster ({ray_head.address}) has 1" in refused.json()["error"]["message"]
        job = create_job(server, tiny_model_dir, train_file, cuda_body())
        done = wait_final(server, job["id"], timeout=120)
        assert done["status"] == "failed"
        assert done["error"]["param"] == "Training.device" and done["error"]["code"] == "invalid_configuration"
        assert "no CUDA GPU is available to this job" in done["error"]["message"]
        # What Ray gave the actor (ray.get_gpu_ids()): the GPU, so it asked for one.
        placed = rf"job {job['id']} runs on Ray node \S+ \(pid \d+, GPUs: 0\)"
        service_log = Path(server.log.name).read_text()
        assert re.search(placed, service_log), service_log[-3000:]
    finally:
        gpu_node.stop()
