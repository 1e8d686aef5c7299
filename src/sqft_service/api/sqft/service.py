"""Extract sub-adapters, merge adapters, sparsify base models.

Merge and sparsify load a whole model, so they run as ``python -m sqft_service.cli ...`` child
processes; extraction only slices adapter tensors and runs here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ...errors import ConflictError, InvalidRequestError, ServiceError
from ...settings import Settings
from ...store.ids import new_id
from ...store.jobs import JobRecord
from ..files.service import FileService
from ..fine_tuning.service import FineTuningService

_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_version_name(version: str, param: str) -> str:
    if not _VERSION_RE.match(version):
        raise InvalidRequestError(
            f"`{param}` {version!r} is not a valid name: use letters, digits, '-' and '_' only "
            "(it becomes a directory under the job's output)",
            param=param,
        )
    return version


class SqftService:
    def __init__(self, settings: Settings, jobs: FineTuningService, files: FileService) -> None:
        self.settings = settings
        self.jobs = jobs
        self.files = files

    def _succeeded_job(self, job_id: str) -> JobRecord:
        job = self.jobs.get(job_id)
        if job.status != "succeeded":
            raise ConflictError(
                f"Job {job_id} is {job.status}; its adapter is available once the job has succeeded",
                param="fine_tuning_job_id",
                code="job_not_succeeded",
            )
        return job

    @staticmethod
    def _lora(job: JobRecord) -> dict[str, Any]:
        return job.config.get("General", {}).get("lora_config", {})

    def extract(self, job_id: str, version: str, custom_config: list[int] | None) -> dict[str, Any]:
        from ...adapters.nls import ELASTIC_CONFIG_FILE, extract_sub_adapter, select_ranks

        version = check_version_name(version, "sub_adapter_version")
        job = self._succeeded_job(job_id)
        if not self._lora(job).get("neural_lora_search"):
            raise InvalidRequestError(
                f"Job {job_id} did not train an elastic super-adapter: extraction needs "
                "`General.lora_config.neural_lora_search: true`",
                param="fine_tuning_job_id",
            )
        if version == "adapter":
            raise InvalidRequestError("`sub_adapter_version` 'adapter' is reserved", param="sub_adapter_version")
        super_dir = Path(job.output_dir) / "adapter"
        elastic = json.loads((super_dir / ELASTIC_CONFIG_FILE).read_text())
        try:
            ranks = select_ranks(elastic, version, custom_config)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="custom_config") from None
        summary = extract_sub_adapter(super_dir, Path(job.output_dir) / version, ranks)
        return {
            "fine_tuning_job_id": job_id,
            "adapter_version": version,
            "ranks": ranks,
            "path": str(Path(summary["path"]).resolve()),
            "n_params": summary.get("n_params"),
            "dimensions": summary.get("dimensions", []),
        }

    def merge(self, job_id: str, version: str | None) -> dict[str, Any]:
        job = self._succeeded_job(job_id)
        output = Path(job.output_dir)
        if version is not None:
            check_version_name(version, "adapter_version")
            adapter_dir = output / version
            if not (adapter_dir / "adapter_config.json").is_file():
                raise InvalidRequestError(
                    f"Job {job_id} has no sub-adapter {version!r}: extract it first with /v1/finetune/extract_adapter",
                    param="adapter_version",
                )
        else:
            adapter_dir = output / "adapter"
        target = adapter_dir / "merged_model" if version else output / "merged_model"
        lora = self._lora(job)
        argv = ["merge", "--model", job.model, "--adapter", str(adapter_dir), "--output", str(target)]
        if lora.get("sparse_adapter"):
            argv.append("--sparse")
        argv += ["--model-cache", str(self.settings.model_cache_dir.resolve())]
        report = self._run_cli(argv)
        return {
            "fine_tuning_job_id": job_id,
            "adapter_version": version,
            "path": str(Path(report["path"]).resolve()),
            "sparse": bool(lora.get("sparse_adapter")),
            "dtype": report.get("dtype"),
            "zeros_preserved": report.get("zeros_preserved"),
            "sparsity": {"before": report.get("before"), "after": report.get("after")},
        }

    def sparsify(self, body: Any) -> dict[str, Any]:
        name = body.output_name or new_id("sparse")
        target = self.settings.model_cache_dir / "sparse" / name
        if target.exists():
            raise ConflictError(f"a sparse model named {name!r} already exists at {target}", param="output_name")
        argv = ["sparsify", "--model", body.model, "--method", body.method, "--sparsity", str(body.sparsity)]
        argv += ["--output", str(target), "--n-calibration", str(body.n_calibration)]
        argv += ["--model-cache", str(self.settings.model_cache_dir.resolve())]
        if body.pattern:
            argv += ["--pattern", body.pattern]
        if body.calibration_file:
            argv += ["--calibration-file", str(self.files.resolve(body.calibration_file, "calibration_file").path)]
        return self._run_cli(argv)

    def _run_cli(self, argv: list[str]) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            proc = subprocess.run(
                [sys.executable, "-m", "sqft_service.cli", *argv, "--json-out", str(out)],
                capture_output=True,
                text=True,
                timeout=6 * 3600,
            )
            if proc.returncode == 0 and out.is_file():
                return json.loads(out.read_text())
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        if proc.returncode == 2:
            raise InvalidRequestError(reason.removeprefix("error: "))
        raise ServiceError(f"{argv[0]} failed: {reason}")
