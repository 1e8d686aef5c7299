"""The job configuration: the reference service's three sections plus OpenAI's hyperparameters.

One pydantic model is shared by the API (validation, 400s naming the field), the store (the resolved
configuration is saved with every job) and the job process (which reads it back from ``config.json``).
Nothing here imports FastAPI or torch.

Field names and defaults follow OPEA GenAIComps ``finetuning_sqft`` (``finetune_sqft_config.py``) so
its payloads work verbatim; ``extra="forbid"`` turns a misspelt key into an error that names it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .adapters.peft_utils import check_rank


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelLoadConfig(_Section):
    trust_remote_code: bool = False
    token: str | None = None


class LoraSection(_Section):
    task_type: str = "CAUSAL_LM"
    r: int = Field(8, ge=1, le=1024)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None
    # SQFT: Neural Low-rank Adapter Search (elastic ranks) and SparsePEFT.
    neural_lora_search: bool = False
    target_module_groups: list[list[str]] | None = None
    search_space: list[str] | None = None
    sparse_adapter: bool = False

    @model_validator(mode="after")
    def _check_search(self) -> LoraSection:
        if self.task_type != "CAUSAL_LM":
            raise ValueError("`task_type` must be 'CAUSAL_LM' (instruction tuning of causal LMs)")
        if not self.neural_lora_search:
            return self
        if not self.target_module_groups:
            raise ValueError("`target_module_groups` is required when `neural_lora_search` is true")
        if self.search_space is None or len(self.search_space) != len(self.target_module_groups):
            n_space = 0 if self.search_space is None else len(self.search_space)
            raise ValueError(
                f"`search_space` has {n_space} entries but `target_module_groups` has "
                f"{len(self.target_module_groups)}: give one comma-separated rank list per group"
            )
        for i, group in enumerate(self.target_module_groups):
            if not group:
                raise ValueError(f"`target_module_groups[{i}]` is empty")
        for i, ranks in enumerate(self.parsed_search_space()):
            for rank in ranks:
                check_rank(
                    rank,
                    self.r,
                    f"`search_space[{i}]`",
                    max_name="r",
                    note=" (`r` is the maximal rank of the super-adapter)",
                )
        flat = [m for g in self.target_module_groups for m in g]
        if len(set(flat)) != len(flat):
            raise ValueError("`target_module_groups`: a module appears in more than one group")
        if self.target_modules is not None and sorted(self.target_modules) != sorted(flat):
            raise ValueError("`target_modules` must equal the flattened `target_module_groups` (or be omitted)")
        return self

    def parsed_search_space(self) -> list[list[int]]:
        """Each group's ranks in the order given (``"16,12,8"`` -> ``[16, 12, 8]``)."""
        spaces: list[list[int]] = []
        for i, text in enumerate(self.search_space or []):
            try:
                ranks = [int(tok) for tok in str(text).split(",") if tok.strip()]
            except ValueError:
                raise ValueError(f"`search_space[{i}]` = {text!r} is not a comma-separated list of integers") from None
            if not ranks:
                raise ValueError(f"`search_space[{i}]` is empty")
            if len(set(ranks)) != len(ranks):
                raise ValueError(f"`search_space[{i}]` = {text!r} repeats a rank")
            spaces.append(ranks)
        return spaces

    def resolved_target_modules(self) -> list[str] | None:
        if self.neural_lora_search and self.target_module_groups:
            return [m for g in self.target_module_groups for m in g]
        return self.target_modules


class GeneralSection(_Section):
    base_model: str | None = None
    tokenizer_name: str | None = None
    output_dir: str | None = None
    save_strategy: Literal["no", "steps", "epoch"] = "no"
    save_steps: int = Field(100, ge=1)
    config: ModelLoadConfig = Field(default_factory=ModelLoadConfig)
    lora_config: LoraSection = Field(default_factory=LoraSection)
    enable_gradient_checkpointing: bool = False
    task: Literal["instruction_tuning"] = "instruction_tuning"


class DatasetSection(_Section):
    train_file: str | None = None
    validation_file: str | None = None
    validation_split_percentage: float = Field(5, ge=0, lt=100)
    max_length: int = Field(512, ge=8)
    max_source_length: int = Field(384, ge=1)
    truncation_side: Literal["left", "right"] = "right"
    padding_side: Literal["left", "right"] = "right"
    truncation: bool = True
    padding: bool = True
    mask_input: bool = True
    mask_response: bool = False
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    group_by_length: bool = True
    # Extension: lay each batch's examples end to end in rows of up to max_length tokens, attention
    # kept per example (training/packing.py). Same examples per step, less padding.
    packing: bool = False

    @model_validator(mode="after")
    def _check_lengths(self) -> DatasetSection:
        if self.max_source_length > self.max_length:
            raise ValueError("`max_source_length` must not exceed `max_length`")
        if self.mask_input and self.mask_response:
            raise ValueError("`mask_input` and `mask_response` cannot both be true: nothing would be trained")
        return self


class TrainingSection(_Section):
    optimizer: Literal["adamw_torch", "adamw", "sgd"] = "adamw_torch"
    batch_size: int = Field(2, ge=1, le=4096)
    epochs: int = Field(1, ge=1, le=1000)
    max_train_steps: int | None = Field(None, ge=1)
    learning_rate: float = Field(5e-5, gt=0, le=1.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    # "auto" picks the best device this version trains on (the CPU); "cuda" is refused until GPU
    # training exists rather than accepted and run on the CPU.
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    # Multi-worker (data-parallel) training needs the Ray runner: only 1 is accepted until it exists.
    num_training_workers: int = Field(1, ge=1)
    resources_per_worker: dict[str, Any] | None = None
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_accumulation_steps: int = Field(1, ge=1)
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    seed: int | None = None
    num_threads: int | None = Field(None, ge=1)

    @field_validator("device")
    @classmethod
    def _cpu_only(cls, v: str) -> str:
        if v == "cuda":
            raise ValueError(
                "`device` 'cuda': this version trains on the CPU only; use 'cpu' or 'auto' (GPU training is planned)"
            )
        return v

    @field_validator("num_training_workers")
    @classmethod
    def _one_worker(cls, v: int) -> int:
        if v != 1:
            raise ValueError(
                f"`num_training_workers` {v}: multi-worker training needs the Ray runner, which this version "
                "does not have; use 1 (one process uses every core it is given)"
            )
        return v

    @field_validator("resources_per_worker")
    @classmethod
    def _no_worker_resources(cls, v: dict[str, Any] | None) -> None:
        if v is not None:
            raise ValueError(
                "`resources_per_worker` is only meaningful with the Ray runner, which this version does not have; "
                "leave it out (SQFT_THREADS_PER_JOB sizes a job's CPU share)"
            )
        return v


class FinetuneConfig(_Section):
    """The resolved configuration of one job (what the job process runs)."""

    General: GeneralSection = Field(default_factory=GeneralSection)
    Dataset: DatasetSection = Field(default_factory=DatasetSection)
    Training: TrainingSection = Field(default_factory=TrainingSection)


AutoInt = int | Literal["auto"]
AutoFloat = float | Literal["auto"]


class Hyperparameters(_Section):
    """OpenAI's ``hyperparameters``; "auto" keeps the section's value."""

    n_epochs: AutoInt = "auto"
    batch_size: AutoInt = "auto"
    learning_rate_multiplier: AutoFloat = "auto"

    @field_validator("n_epochs", "batch_size")
    @classmethod
    def _positive_int(cls, v: AutoInt) -> AutoInt:
        if v != "auto" and v < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return v

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _positive_float(cls, v: AutoFloat) -> AutoFloat:
        if v != "auto" and v <= 0:
            raise ValueError("must be > 0 or 'auto'")
        return v


def resolve_config(
    base: FinetuneConfig,
    *,
    model: str,
    training_file_path: str,
    validation_file_path: str | None,
    hyperparameters: Hyperparameters | None,
    seed: int,
) -> FinetuneConfig:
    """Fold the OpenAI fields into the sections; OpenAI values win where both are given.

    ``learning_rate_multiplier`` multiplies ``Training.learning_rate`` (the reference copied it in as
    the absolute rate, which silently trains at a rate of e.g. 2.0).
    """
    cfg = base.model_copy(deep=True)
    cfg.General.base_model = model
    cfg.Dataset.train_file = training_file_path
    if validation_file_path is not None:
        cfg.Dataset.validation_file = validation_file_path
    hp = hyperparameters or Hyperparameters()
    if hp.n_epochs != "auto":
        cfg.Training.epochs = int(hp.n_epochs)
    if hp.batch_size != "auto":
        cfg.Training.batch_size = int(hp.batch_size)
    if hp.learning_rate_multiplier != "auto":
        cfg.Training.learning_rate = cfg.Training.learning_rate * float(hp.learning_rate_multiplier)
    cfg.Training.seed = seed
    return cfg
