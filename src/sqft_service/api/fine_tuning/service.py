"""Create, list, retrieve and cancel jobs; read their events and checkpoints."""

from __future__ import annotations

import secrets
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from ... import auto_hparams
from ...config import (
    DatasetSection,
    FinetuneConfig,
    ParentModel,
    TrainingSection,
    check_method_complete,
    resolve_config,
)
from ...devices import check_device_available
from ...errors import InvalidRequestError, NotFoundError
from ...graders import MULTI, judge_models, sub_graders
from ...job_secrets import split_secrets, write_secrets
from ...jobs.kinds import BatchModel
from ...jobs.manager import JobManager
from ...model_access import ModelAccess
from ...model_names import FineTunedRef, checkpoint_ref, parse_fine_tuned
from ...store.events import CheckpointRecord, EventRecord, EventStore
from ...store.files import FileRecord
from ...store.ids import new_id
from ...store.jobs import FINE_TUNE, JobRecord, JobStore
from ...training.records import IMAGES_UNPACKED, inspect_training_file, wrong_format
from ...workspace import PARENT_MERGED_DIR
from ..evals.protocol import GraderOrMulti, check_grader_templates, refuse_unoffered
from ..files.service import FileService
from ..inference.protocol import ResponseFormat
from ..models.service import ModelService
from ..owner import current_owner, owned_by_caller
from .protocol import CreateFineTuningJobRequest, ReinforcementHyperparameters


class FineTuningService:
    """``models`` resolves a fine-tuned model named as a job's ``model`` (None: such names are refused)."""

    def __init__(
        self,
        jobs: JobStore,
        events: EventStore,
        files: FileService,
        manager: JobManager,
        models: ModelService | None = None,
    ) -> None:
        self.jobs = jobs
        self.events = events
        self.files = files
        self.manager = manager
        self.models = models

    def create(self, req: CreateFineTuningJobRequest) -> JobRecord:
        model = req.model or req.General.base_model
        if not model:
            raise InvalidRequestError("`model` is required (or give `General.base_model`)", param="model")
        model_param = "model" if req.model else "General.base_model"
        if req.General.parent is not None:
            raise InvalidRequestError(
                "`General.parent` is set by the service; name the fine-tuned model as `model`", param="General.parent"
            )
        # A fine-tuned model of the caller's: the job trains on from it (a merged model's directory, or an
        # adapter that the job merges into its base first).
        parent_dir, parent = self._fine_tuned_base(model, model_param)
        # Before anything is created: a model outside the roots, a Hub id or remote code is a 400 at once.
        access = ModelAccess.from_settings(self.manager.settings)
        general = req.General
        if parent_dir is None and parent is None:
            trust = general.config.trust_remote_code
            access.check_fine_tune(model, general.tokenizer_name, trust, model_param=model_param)
        else:  # directories the service recorded; the client's own paths stay held to the roots
            stored = ModelAccess.for_stored_models(self.manager.settings)
            for path in [parent_dir] if parent is None else [parent.base_model, parent.adapter]:
                stored.check_model(path or "", model_param)
            if general.tokenizer_name:
                access.check_model(general.tokenizer_name, "General.tokenizer_name")
            access.check_remote_code(general.config.trust_remote_code)
        # A GPU asked for where no job could get one (this machine, or the Ray cluster: the runner says)
        # is a 400 now, not a job that fails once launched.
        check_device_available(
            req.Training.device, runner=self.manager.runner, workers=req.Training.num_training_workers
        )
        # The service fills these with its own paths of the uploaded files; a client's value would be
        # silently replaced, so it is refused, pointing at the fields that take file ids.
        for name, instead in (("train_file", "training_file"), ("validation_file", "validation_file")):
            if getattr(req.Dataset, name) is not None:
                raise InvalidRequestError(
                    f"`Dataset.{name}` is set by the service; give the uploaded file's id as `{instead}`",
                    param=f"Dataset.{name}",
                )
        training = self.files.resolve(req.training_file, "training_file")
        if training.purpose != "fine-tune":
            raise InvalidRequestError(
                f"file {training.id} has purpose '{training.purpose}', expected 'fine-tune'",
                param="training_file",
            )
        validation = None
        validation_ref = req.validation_file
        if validation_ref:
            validation = self.files.resolve(validation_ref, "validation_file")
        hyperparameters = req.hyperparameters
        if req.method is not None and req.method.hyperparameters is not None:
            hyperparameters = req.method.hyperparameters
        training_section = self._with_judge(_with_method(req), via_method=req.method is not None, model=model)
        _check_records(training, validation, training_section.method, req.Dataset)

        job_id = new_id("ftjob")
        workspace = self.manager.new_workspace(job_id)
        if parent is not None:  # the job writes the merged parent here before it trains
            parent_dir = str(workspace.output.root / PARENT_MERGED_DIR)
        base = FinetuneConfig(General=req.General, Dataset=req.Dataset, Training=training_section)
        seed = (
            req.seed
            if req.seed is not None
            else (req.Training.seed if req.Training.seed is not None else secrets.randbelow(2**31))
        )
        cfg = resolve_config(
            base,
            model=model,
            training_file_path=str(training.path),
            validation_file_path=str(validation.path) if validation else None,
            hyperparameters=hyperparameters,
            seed=seed,
            n_training_records=_n_records(training),
        )
        fitted = _fit_images(
            cfg,
            req.Dataset.model_fields_set,
            training,
            validation,
            parent_dir or (parent.base_model if parent else model),
        )
        if parent_dir is not None:
            cfg.General.base_model = parent_dir
            cfg.General.parent = parent
        # Outputs always live under the data dir: a client-chosen absolute path would let any
        # client write anywhere the service can.
        requested_output = cfg.General.output_dir
        cfg.General.output_dir = str(workspace.output.root)
        # The token goes to the workspace's 0600 secrets file, never into the stored config (job_secrets.py).
        config, job_secrets = split_secrets(cfg.model_dump(mode="json"))
        if job_secrets:
            write_secrets(workspace.secrets, job_secrets)
        job = self.manager.create(
            job_id,
            FINE_TUNE,
            config,
            model=model,
            training_file=training.id,
            validation_file=validation.id if validation else None,
            seed=seed,
            suffix=req.suffix,
            metadata=req.metadata,
            owner=current_owner(),
        )
        self.events.add_event(job_id, f"Created fine-tuning job: {job_id}")
        if requested_output:
            self.events.add_event(
                job_id,
                f"General.output_dir {requested_output!r} ignored: outputs are kept in {cfg.General.output_dir}",
                level="warn",
            )
        if fitted:
            self.events.add_event(job_id, fitted)
        self.events.add_event(
            job_id,
            f"Validated training file: {training.filename} ({training.meta.get('n_records', '?')} records"
            + (f", {training.meta['n_images']} images)" if training.meta.get("n_images") else ")"),
        )
        self.manager.enqueue(job)
        return self.get(job_id)

    def _fine_tuned_base(self, model: str, param: str) -> tuple[str | None, ParentModel | None]:
        """For a fine-tuned model id (``ft:…``): the directory to train on, or the adapter to merge first.

        A merged model (``ft:…:merged``) is a model directory of its own: ``(its path, None)``. An adapter
        (a job's, a checkpoint's or a sub-adapter's): ``(None, the parent)``, which the job merges into the
        base it was trained on before it trains. A base model: ``(None, None)``. Another project's model
        is a 404, as it is everywhere.
        """
        if parse_fine_tuned(model) is None:
            return None, None
        if self.models is None:
            raise InvalidRequestError("this service cannot fine-tune a fine-tuned model", param=param)
        entry = self.models.get(model, param)
        assert entry.ref is not None and entry.path is not None and entry.job is not None
        if entry.ref.merged:
            return str(entry.path), None
        sparse = bool(entry.job.config.get("General", {}).get("lora_config", {}).get("sparse_adapter"))
        adapter = str(entry.path)
        return None, ParentModel(model=model, base_model=entry.job.base_model, adapter=adapter, sparse=sparse)

    def get(self, job_id: str) -> JobRecord:
        job = self.jobs.get(job_id, kind=FINE_TUNE)
        # Every route reaches a job through here: another project's job is a 404, like a missing one.
        if job is None or not owned_by_caller(job.owner):
            raise NotFoundError(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
        return job

    def list(
        self, *, after: str | None, limit: int, metadata: dict[str, str] | None = None
    ) -> tuple[list[JobRecord], bool]:
        """A page of the caller's fine-tunes; ``metadata``: only those with all these pairs ({}: none)."""
        return self.jobs.list(kinds=(FINE_TUNE,), after=after, limit=limit, owner=current_owner(), metadata=metadata)

    def cancel(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job.is_final:
            raise InvalidRequestError(
                f"Job {job_id} has already {'been ' if job.status == 'cancelled' else ''}{job.status}; "
                "it cannot be cancelled",
                param="fine_tuning_job_id",
                code="job_not_cancellable",
            )
        return self.manager.cancel(job_id)

    def pause(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job.status not in ("validating_files", "queued", "running"):
            raise InvalidRequestError(
                f"Job {job_id} is {job.status}; only a queued or running job can be paused",
                param="fine_tuning_job_id",
                code="job_not_pausable",
            )
        return self.manager.pause(job_id)

    def resume(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job.status != "paused":
            raise InvalidRequestError(
                f"Job {job_id} is {job.status}; only a paused job can be resumed",
                param="fine_tuning_job_id",
                code="job_not_paused",
            )
        return self.manager.resume(job_id)

    def events_of(self, job_id: str, *, after: str | None, limit: int) -> tuple[list[EventRecord], bool]:
        self.get(job_id)
        return self.events.list_events(job_id, after=after, limit=limit)

    def checkpoints_of(
        self, job_id: str, *, after: str | None, limit: int
    ) -> tuple[list[tuple[CheckpointRecord, str]], bool]:
        """A page of the job's checkpoints, each with its model id (the final one's is the job's model)."""
        job = self.get(job_id)
        records, more = self.events.list_checkpoints(job_id, after=after, limit=limit)

        def model(c: CheckpointRecord) -> str:
            ref = FineTunedRef(job.id) if c.metrics.get("final") else checkpoint_ref(job.id, c.step)
            return ref.name(job.model or "", job.suffix)

        return [(c, model(c)) for c in records], more

    def _with_judge(self, section: TrainingSection, *, via_method: bool, model: str) -> TrainingSection:
        """A model grader's judge resolved as an eval run's is (404 naming the grader's ``model`` for one
        the caller can't use; the job's own base ``model`` is one it can), for the job to load it."""
        grader = section.rl_grader or {}
        names = judge_models(grader) if grader else []
        if not names:
            return section
        key = next(k for k, g in sub_graders(grader).items() if g.get("model") == names[0])
        at = "Training.rl_grader"  # the reference route's field, as it is named there
        if via_method:
            at = "method.reinforcement.grader" + (f".graders.{key}" if grader["type"] == MULTI else "") + ".model"
        if len(names) > 1:  # the job holds one judge beside the model it trains
            raise InvalidRequestError(
                f"a fine-tuning job's model graders share one judge model; these name {', '.join(names[:4])}",
                param=at,
            )
        name = names[0]
        if name == model and parse_fine_tuned(name) is None:  # checked as the job's model already
            judge = BatchModel(model=ModelAccess.from_settings(self.manager.settings).check_model(name, at))
        elif self.models is None:
            raise InvalidRequestError("this service resolves no models for a model grader's judge", param=at)
        else:
            judge = self.models.job_model(name, at)
        copied = section.model_copy(update={"rl_judge": judge.model_dump()})
        copied.model_fields_set.add("rl_judge")
        return copied

    def log_path(self, job_id: str) -> Path:
        return JobManager.workspace(self.get(job_id)).log


def _fit_images(
    cfg: FinetuneConfig, sent: set[str], training: FileRecord, validation: FileRecord | None, model_dir: str
) -> str:
    """Length limits the client left unset (not in ``sent``), raised so that the records' images fit
    (``auto_hparams.fit_images``); what was raised, said for the job's events ("" when nothing was)."""
    most = max(int(r.meta.get("max_images") or 0) for r in (training, validation) if r is not None)
    per_image = auto_hparams.image_tokens(model_dir) if most else None
    if not per_image:
        return ""
    said = auto_hparams.fit_images(cfg.Dataset, most, per_image, sent)
    if not said:
        return ""
    return (
        f"{' and '.join(said)}: the records hold up to {most} image(s) of {per_image} tokens each "
        "(limits left unset are raised to fit them)"
    )


def _n_records(training: FileRecord) -> int:
    """The training file's record count, which sizes the auto hyperparameters (auto_hparams.py).

    Counted at upload; a file stored before the count was kept is read once more.
    """
    n = training.meta.get("n_records")
    return int(n) if n is not None else inspect_training_file(training.path).n_records


def _with_method(req: CreateFineTuningJobRequest) -> TrainingSection:
    """``Training`` with OpenAI's ``method`` folded in: its type, DPO's ``beta`` when not "auto", and a
    reinforcement method's grader and the settings its hyperparameters name."""
    section = req.Training
    if req.method is None:
        return _checked(section)
    if "method" in section.model_fields_set and section.method != req.method.type:
        raise InvalidRequestError(
            f"`Training.method` {section.method!r} contradicts `method.type` {req.method.type!r}; give one",
            param="Training.method",
        )
    hp = req.method.hyperparameters
    beta = getattr(hp, "beta", "auto")
    # model_copy keeps model_fields_set: the method's type counts as sent (auto_hparams reads what was sent).
    update: dict[str, object] = {"method": req.method.type}
    if beta != "auto":
        update["dpo_beta"] = float(beta)
    if (rl := req.method.reinforcement) is not None:
        update["rl_grader"] = rl.grader.model_dump(mode="json", exclude_none=True)
        if rl.response_format is not None and rl.response_format.type != "text":
            update["rl_response_format"] = _format_dump(rl.response_format)
        if isinstance(hp, ReinforcementHyperparameters):
            settings = {
                "rl_group_size": hp.group_size,
                "eval_steps": None if hp.eval_interval == "auto" else int(hp.eval_interval),
                "rl_eval_samples": None if hp.eval_samples == "auto" else int(hp.eval_samples),
            }
            update |= {k: v for k, v in settings.items() if v is not None}
    copied = section.model_copy(update=update)
    copied.model_fields_set.update(update)
    return _checked(copied)


_GRADER = TypeAdapter(GraderOrMulti)


def _format_dump(fmt: ResponseFormat) -> dict:
    return fmt.model_dump(mode="json", by_alias=True, exclude_none=True)


def _checked(section: TrainingSection) -> TrainingSection:
    if section.rl_judge is not None:
        raise InvalidRequestError(
            "`Training.rl_judge` is set by the service from the grader's `model`; leave it out",
            param="Training.rl_judge",
        )
    try:
        check_method_complete(section)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="Training") from None
    if section.rl_grader is not None and "rl_grader" in section.model_fields_set:
        # The reference's route gives `Training.rl_grader` as it is: the checks `method.reinforcement` makes,
        # and the grader kept as that route keeps it.
        try:
            refuse_unoffered(section.rl_grader, "Training.rl_grader")
            grader = _GRADER.validate_python(section.rl_grader)
            check_grader_templates(grader, "Training.rl_grader")
        except ValidationError as exc:
            raise InvalidRequestError(_first_error(exc), param="Training.rl_grader") from None
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="Training.rl_grader") from None
        section.rl_grader = grader.model_dump(mode="json", exclude_none=True)
    if section.rl_response_format is not None and "rl_response_format" in section.model_fields_set:
        try:  # the reference route's own field: chat's checks (an unsupported schema is a 400 here)
            fmt = ResponseFormat.model_validate(section.rl_response_format)
        except ValidationError as exc:
            raise InvalidRequestError(_first_error(exc), param="Training.rl_response_format") from None
        section.rl_response_format = _format_dump(fmt) if fmt.type != "text" else None
    return section


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


def _check_records(training: FileRecord, validation: FileRecord | None, method: str, dataset: DatasetSection) -> None:
    """Each method takes its record formats (``records.METHOD_FORMATS``); a DPO or reinforcement job
    scores the replies only, and a reinforcement job trains on answers it samples (no packing)."""
    for param, record in (("training_file", training), ("validation_file", validation)):
        fmt = record.meta.get("format") if record is not None else None
        if fmt is None:  # files uploaded before formats were recorded: the job checks them
            continue
        if why := wrong_format(method, fmt):
            raise InvalidRequestError(f"file {record.id} {why}", param=param)
    if dataset.packing and any(r is not None and r.meta.get("n_images") for r in (training, validation)):
        raise InvalidRequestError(IMAGES_UNPACKED, param="Dataset.packing")
    if method == "reinforcement" and dataset.packing:
        raise InvalidRequestError(
            "a reinforcement job trains on the answers it samples, unpacked: leave `Dataset.packing` off",
            param="Dataset.packing",
        )
    if method != "supervised" and (not dataset.mask_input or dataset.mask_response):
        name = "mask_input" if not dataset.mask_input else "mask_response"
        raise InvalidRequestError(
            f"a {method} job scores the replies only: `Dataset.{name}` must keep its default", param=f"Dataset.{name}"
        )
