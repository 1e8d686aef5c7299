"""The caller's models, derived from the store and the job workspaces (no table of their own).

* base models: every ``model`` the caller's fine-tunes named (id: the reference as given);
* per succeeded fine-tune (``model_names.py``): its adapter ``ft:…:<job>``, each extracted sub-adapter
  ``ft:…:<job>:<version>``, each merged model ``ft:…:<job>:merged`` / ``ft:…:<job>:<version>:merged``,
  each checkpoint ``ft:…:<job>:ckpt-step-<N>`` (an adapter, served and scored like the final one),
  listed while their directory exists (deleting one removes the directory, so it leaves the list).

Another project's model is a 404 like a missing one, as for jobs and files, unless that project shared
it with the caller's (``store/permissions.py``, OpenAI's checkpoint permissions): then the caller lists
and uses it (inference, batches, evaluation, fine-tuning on from it) and may download it, but only its
project deletes or shares it.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ...errors import ConflictError, NotFoundError, ServiceError
from ...inference.spec import ModelSpec
from ...jobs.kinds import BatchModel
from ...jobs.manager import JobManager
from ...model_access import ModelAccess
from ...model_names import FineTunedRef, checkpoint_ref, parse_fine_tuned
from ...settings import Settings
from ...store.files import FileStore
from ...store.jobs import FINE_TUNE, JobRecord, JobStore
from ...store.permissions import PermissionStore
from ...workspace import TrainingOutputs
from ..owner import current_owner, owned_by_caller

BASE_OWNER = "system"
_STEP_DIR = re.compile(r"step-([0-9]{1,9})")  # workspace.TrainingOutputs.checkpoint's names
MERGED_DIR = TrainingOutputs(Path("/")).merged_model().name


class PermissionDeniedError(ServiceError):
    """403, as OpenAI answers a delete of a model the caller does not own (a base model here)."""

    status_code = 403
    type = "invalid_request_error"


@dataclass(frozen=True)
class ModelEntry:
    id: str
    created: int
    owned_by: str
    path: Path | None = None  # a fine-tuned model's directory; None for a base model
    job: JobRecord | None = None
    ref: FineTunedRef | None = None
    shared: bool = False  # another project's model, shared with the caller's


def _is_model_dir(path: Path, marker: str) -> bool:
    return path.is_dir() and (path / marker).is_file()


def _mtime(path: Path) -> int:
    return int(path.stat().st_mtime)


class ModelService:
    def __init__(
        self, settings: Settings, jobs: JobStore, files: FileStore, manager: JobManager, permissions: PermissionStore
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.files = files
        self.manager = manager
        self.permissions = permissions
        # Called with a deleted model's directory, so the engine drops what it loaded from it.
        self.on_delete: Callable[[Path], None] | None = None

    # ---------------------------------------------------------------- reading
    def _fine_tunes(self, everyone: bool = False) -> Iterator[JobRecord]:
        """The caller's fine-tunes (every project's with ``everyone``)."""
        after = None
        while True:
            owner = None if everyone else current_owner()
            page, more = self.jobs.list(kinds=(FINE_TUNE,), after=after, limit=500, owner=owner)
            yield from page
            if not more or not page:
                return
            after = page[-1].id

    def _derived(self, job: JobRecord) -> Iterator[ModelEntry]:
        """The fine-tuned models of one succeeded job whose directories exist."""
        outputs = self.manager.workspace(job).output
        owner = job.owner or "org-local"

        def entry(ref: FineTunedRef, path: Path) -> ModelEntry:
            return ModelEntry(ref.name(job.model or "", job.suffix), _mtime(path), owner, path, job, ref)

        if _is_model_dir(outputs.adapter, "adapter_config.json"):
            yield entry(FineTunedRef(job.id), outputs.adapter)
        if _is_model_dir(outputs.merged_model(), "config.json"):
            yield entry(FineTunedRef(job.id, merged=True), outputs.merged_model())
        reserved = TrainingOutputs.reserved_names()
        children = sorted(outputs.root.iterdir()) if outputs.root.is_dir() else []
        for child in children:
            if child.name.startswith(".") or child.name in reserved or not child.is_dir():
                continue
            if _is_model_dir(child, "adapter_config.json"):
                yield entry(FineTunedRef(job.id, child.name), child)
            if _is_model_dir(outputs.merged_model(child.name), "config.json"):
                yield entry(FineTunedRef(job.id, child.name, merged=True), outputs.merged_model(child.name))
        checkpoints = outputs.checkpoints.iterdir() if outputs.checkpoints.is_dir() else []
        steps = sorted(int(m[1]) for c in checkpoints if (m := _STEP_DIR.fullmatch(c.name)))
        for step in steps:
            if _is_model_dir(outputs.checkpoint(step), "adapter_config.json"):
                yield entry(checkpoint_ref(job.id, step), outputs.checkpoint(step))

    def list(self) -> list[ModelEntry]:
        bases: dict[str, int] = {}
        tuned: list[ModelEntry] = []
        for job in self._fine_tunes():
            if job.model and parse_fine_tuned(job.model) is None:  # a fine-tuned base is listed as itself
                bases[job.model] = min(bases.get(job.model, job.created_at), job.created_at)
            if job.status == "succeeded":
                tuned.extend(self._derived(job))
        return [ModelEntry(ref, created, BASE_OWNER) for ref, created in sorted(bases.items())] + tuned + self._shared()

    def _shared(self) -> list[ModelEntry]:
        """Other projects' models shared with the caller's, while they exist."""
        project, found = current_owner(), []
        for permission in self.permissions.of_project(project) if project is not None else []:
            job = self.jobs.get(permission.job_id, kind=FINE_TUNE)
            if job is not None and job.status == "succeeded" and job.owner != project:
                found += [replace(e, shared=True) for e in self._derived(job) if e.id == permission.model]
        return found

    def get(self, model_id: str, param: str = "model") -> ModelEntry:
        missing = NotFoundError(f"The model `{model_id}` does not exist or you do not have access to it.", param=param)
        ref = parse_fine_tuned(model_id)
        if ref is None:
            created = [job.created_at for job in self._fine_tunes() if job.model == model_id]
            if not created:
                raise missing
            return ModelEntry(model_id, min(created), BASE_OWNER)
        job = self.jobs.get(ref.job_id, kind=FINE_TUNE)
        if job is None or job.status != "succeeded":
            raise missing
        shared = not owned_by_caller(job.owner)
        if shared and not self.permissions.allows(model_id, current_owner()):
            raise missing
        # The whole name must match, not only the job id: `ft:other:x:<job>` is not this job's model.
        found = next((e for e in self._derived(job) if e.id == model_id), None)
        if found is None:
            raise missing
        return replace(found, shared=shared)

    def spec(self, model_id: str, param: str = "model") -> ModelSpec:
        """What the engine loads for ``model_id`` (404 naming ``param`` if the caller has no such model)."""
        entry = self.get(model_id, param)
        access = ModelAccess.from_settings(self.settings)
        if entry.job is None:
            return ModelSpec(name=model_id, model=access.check_model(model_id, param))
        job, ref = entry.job, entry.ref
        assert ref is not None and entry.path is not None
        general = job.config.get("General", {})
        tokenizer = general.get("tokenizer_name")
        tokenizer = access.check_model(tokenizer, param) if tokenizer else None
        if ref.merged:  # a merged model is a model of its own (its directory holds the tokenizer too)
            return ModelSpec(model_id, str(entry.path), data_format=self._data_format(job))
        base = ModelAccess.for_stored_models(self.settings).check_model(job.base_model, param)
        sparse = bool(general.get("lora_config", {}).get("sparse_adapter"))  # its sub-adapters too
        return ModelSpec(model_id, base, tokenizer, str(entry.path), self._data_format(job), sparse)

    def job_model(self, model_id: str, param: str = "model") -> BatchModel:
        """``spec(model_id)`` as a job's payload holds it (a batch's or an eval run's models)."""
        spec = self.spec(model_id, param)
        ref = parse_fine_tuned(model_id)
        fields = {k: v for k, v in dataclasses.asdict(spec).items() if k != "name"}
        return BatchModel(**fields, merged=ref is not None and ref.merged)

    def _data_format(self, job: JobRecord) -> str | None:
        """How the job rendered its records: its result says so (jobs since inference came); older jobs'
        training file meta says so while the file exists."""
        if fmt := (job.result or {}).get("data_format"):
            return fmt
        record = self.files.get(job.training_file) if job.training_file else None
        return record.meta.get("format") if record is not None else None

    def _fine_tuned(self, model_id: str, verb: str, code: str) -> ModelEntry:
        """The caller's fine-tuned model ``model_id``; a base model is a 403 (``code``)."""
        entry = self.get(model_id)
        if entry.path is None:
            raise PermissionDeniedError(
                f"`{model_id}` is a base model; only fine-tuned models (ft:…) can be {verb}", param="model", code=code
            )
        return entry

    def model_files(self, model_id: str) -> tuple[ModelEntry, dict[str, Path]]:
        """A fine-tuned model's files (name relative to its directory -> path), for a download.

        Regular files only (no links followed out of the directory), no hidden names (staging, deleted
        copies), and not a sub-adapter's ``merged_model/``, which is a model of its own. A base model is
        a 403: the service serves what it made, not what it was given.
        """
        entry = self._fine_tuned(model_id, "downloaded", "model_not_downloadable")
        assert entry.path is not None
        skip = None if entry.ref is not None and entry.ref.merged else entry.path / MERGED_DIR
        found: dict[str, Path] = {}
        pending = [entry.path]
        while pending:
            folder = pending.pop()
            for child in sorted(folder.iterdir()):
                if child.name.startswith(".") or child.is_symlink() or child == skip:
                    continue
                if child.is_dir():
                    pending.append(child)
                elif child.is_file():
                    found[child.relative_to(entry.path).as_posix()] = child
        return entry, dict(sorted(found.items()))

    # ---------------------------------------------------------------- deleting
    def _check_unused(self, model_id: str, directory: Path) -> None:
        """A fine-tuned model that fine-tunes train on from stays while they need it: an adapter until the
        job that merges it in has ended; a merged model while a job training on it runs, and then while
        an adapter of that job (its own, a checkpoint or a sub-adapter) is left to load on it."""

        def uses(job: JobRecord) -> bool:
            parent = job.config.get("General", {}).get("parent") or {}
            judge = job.config.get("Training", {}).get("rl_judge") or {}  # a reinforcement job's grader
            if str(directory) in (parent.get("adapter"), judge.get("adapter"), judge.get("model")):
                return not job.is_final
            if job.base_model != str(directory) or job.status in ("failed", "cancelled"):
                return False
            return not job.is_final or any(e.ref is not None and not e.ref.merged for e in self._derived(job))

        users = [job.id for job in self._fine_tunes(everyone=True) if uses(job)]  # a sharer's jobs too
        if users:
            raise ConflictError(
                f"`{model_id}` cannot be deleted: fine-tuning job(s) {', '.join(users)} train on from it (or "
                "grade with it); delete their models (or cancel them) first",
                param="model",
                code="model_in_use",
            )
        paths = {str(directory)}
        batches = [
            job.id
            for job in [*self.jobs.active_of_kind("batch"), *self.jobs.active_of_kind("eval_run")]
            if any({m.get("adapter"), m.get("model")} & paths for m in job.config.get("models", {}).values())
        ]
        if batches:
            raise ConflictError(
                f"`{model_id}` cannot be deleted: batch(es) or eval run(s) {', '.join(batches)} answer with it; "
                "delete it once they have ended (or cancel them)",
                param="model",
                code="model_in_use",
            )

    def owned(self, model_id: str, verb: str, done: str, code: str) -> ModelEntry:
        """The caller's own fine-tuned model ``model_id``: a base model, or one another project shared
        with the caller's, is a 403 (``code``); ``verb``/``done``: what was asked ("delete"/"deleted")."""
        entry = self._fine_tuned(model_id, done, code)
        if entry.shared:
            raise PermissionDeniedError(
                f"`{model_id}` is project {entry.owned_by}'s, shared with yours: only {entry.owned_by} can {verb} it",
                param="model",
                code=code,
            )
        return entry

    def delete(self, model_id: str) -> str:
        entry = self.owned(model_id, "delete", "deleted", "model_not_deletable")
        assert entry.path is not None
        merged_inside = entry.path / MERGED_DIR
        self._check_unused(model_id, entry.path)
        if entry.ref is not None and entry.ref.version and not entry.ref.merged and merged_inside.is_dir():
            # A sub-adapter's directory also holds its merged model, a model of its own: remove only the
            # adapter's files, its config first (from then on it is no longer listed).
            (entry.path / "adapter_config.json").unlink()
            for child in entry.path.iterdir():
                if child != merged_inside:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            # Renamed away first, so a reader sees the whole model or none of it, then removed.
            doomed = entry.path.with_name(f".{entry.path.name}.{uuid.uuid4().hex}.deleted")
            entry.path.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        self.permissions.forget_model(model_id)
        if self.on_delete is not None:
            self.on_delete(entry.path)
        return model_id
