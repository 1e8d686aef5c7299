"""The GPU benchmark on the CPU (``--tiny``), so that a GPU session never finds it broken; its profile verdicts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench.gpu.profile import Capture, kind

from tests.helpers import alpaca_records, write_json

REPO = Path(__file__).resolve().parents[2]


def _profiled(work) -> dict:
    capture = Capture("cpu", first=1)
    capture.begin(1)
    work()
    capture.end(2)  # PROFILED_STEPS = 2: steps 1 and 2
    return capture.summary


def test_a_matmul_loop_is_gemm_bound_and_an_elementwise_loop_memory_bound(one_thread):
    a = torch.randn(384, 384)
    gemm = _profiled(lambda: [a @ a for _ in range(20)])
    assert gemm["limit"] == "GEMM-bound" and gemm["shares"]["gemm"] > 0.9
    assert gemm["top"][0]["name"] == "aten::mm" and gemm["gpu_busy"] is None
    v = torch.randn(4_000_000)
    elementwise = _profiled(lambda: [(v * 2 + 1).exp_() for _ in range(5)])
    assert elementwise["limit"] == "memory-bound" and elementwise["shares"]["gemm"] == 0


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "gemm"),
        ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
        ("pytorch_flash::flash_fwd_kernel", "attention"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "other"),
    ],
)
def test_kernel_names_are_sorted_into_kinds(name, expected):
    assert kind(name) == expected


def test_the_tiny_dry_run_writes_rows_with_profiles(tmp_path, tokenizer_dir):
    cmd = [sys.executable, "-m", "bench.gpu", "--tiny", "--rows", "tiny:arce:8:hf+ours_lora", "--steps", "1"]
    data = tmp_path / "data"
    data.mkdir()
    write_json(data / "arce_train_instruct.json", alpaca_records(64))
    cmd += ["--warmup", "1", "--tokenizer", str(tokenizer_dir), "--data-dir", str(data), "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (result,) = tmp_path.glob("*-gpu-cpu-tiny.json")
    rows = json.loads(result.read_text())["rows"]
    assert [(r["setup"], r["status"]) for r in rows] == [("hf", "ok"), ("ours_lora", "ok")]
    for row in rows:
        assert row["real_tokens_per_s"] > 0 and row["profile"]["limit"] in ("GEMM-bound", "memory-bound")
        assert sum(row["profile"]["shares"].values()) == pytest.approx(1, abs=0.01)
    assert "What limits each row" in (tmp_path / result.name.replace(".json", ".md")).read_text()


def test_the_device_scripts_rows_name_known_setups_and_a_typo_is_refused_before_any_row_runs(tmp_path):
    import re

    from bench.gpu.__main__ import SETUPS, parse_rows

    rows = re.search(r'ROWS=\$\{ROWS:-"([^"]+)"\}', (REPO / "bench/gpu/device_run.sh").read_text()).group(1)
    plans = parse_rows(rows, SETUPS)  # refuses an unknown shape or setup
    assert len(plans) == rows.count(",") + 1
    assert all(data in ("arce", "gsm8k") and batch in (8, 32) for _, data, batch, _ in plans), plans
    cmd = [sys.executable, "-m", "bench.gpu", "--tiny", "--rows", "tiny:arce:8:hf,tiny:arce:8:ours_lora_nodrp"]
    done = subprocess.run([*cmd, "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "unknown setup 'ours_lora_nodrp'" in done.stderr
    assert "GEMM peak" not in done.stdout  # nothing ran: not the peak measurement, not the first row
