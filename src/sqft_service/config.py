"""The job configuration: the reference service's three sections plus OpenAI's hyperparameters.

One pydantic model is shared by the API (validation, 400s naming the field), the store (the resolved
configuration is saved with every job) and the job process (which reads it back from ``config.json``).
Nothing here imports FastAPI or torch.

Field names and defaults follow OPEA GenAIComps ``finetuning_sqft`` (``finetune_sqft_config.py``) so
its payloads work verbatim; ``extra="forbid"`` turns a misspelt key into an error that names it.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .adapters.peft_utils import check_rank
from .errors import InvalidConfigurationError

# Bounds that keep every number of a job inside what SQLite stores (int64) and what a run can mean.
MAX_SEED = 2**31 - 1  # as OpenAI's top-level `seed`; every RNG we seed takes it
MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 4096
MAX_STEPS = 10_000_000  # optimizer steps, warmup, and the logging / eval / save intervals
MAX_TOKENS = 1 << 20  # sequence lengths
MAX_SAMPLES = 2**31 - 1
MAX_PATH_CHARS = 4096  # PATH_MAX: model, tokenizer and file paths
MAX_NAME_CHARS = 256  # module names, rank lists
MAX_LIST_ITEMS = 1024  # target modules, groups, search spaces
MAX_TRAINING_WORKERS = 64  # data-parallel ranks of one job (one process group)
MAX_WORKER_RESOURCES = 16  # resource names per worker ("CPU", "GPU", custom Ray resources)
DPO_BETA = 0.1  # DPO's usual beta (the paper's, TRL's and OpenAI's default)
MAX_DPO_BETA = 100.0  # beyond this the policy can hardly move: a typo, not a choice
SIMPO_BETA = 2.0  # SimPO's beta (Meng et al. 2024 tune 2-10; TRL's SimPO example uses 2)
MAX_SIMPO_GAMMA = 20.0
MAX_RL_GROUP = 64  # answers sampled per prompt in reinforcement fine-tuning
MAX_RL_TOKENS = 4096  # new tokens per sampled answer
MAX_RL_KL_BETA = 10.0  # a KL penalty past this only holds the policy at the base
MAX_RL_UPDATES = 16  # optimizer steps per sampling

Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]


class _Section(BaseModel):
    # allow_inf_nan=False: JSON's `Infinity` / `NaN` (Python's json accepts them) would be stored, shown
    # as null and trained with; every float here must be finite.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class ModelLoadConfig(_Section):
    trust_remote_code: bool = False
    # A secret: the API shows it as "***" and keeps it out of the job's stored config (job_secrets.py).
    token: str | None = Field(None, max_length=MAX_PATH_CHARS)


class LoraSection(_Section):
    task_type: str = "CAUSAL_LM"
    r: int = Field(8, ge=1, le=1024)
    lora_alpha: float = Field(16, gt=0, le=65536)
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[Name] | None = Field(None, max_length=MAX_LIST_ITEMS)
    # SQFT: Neural Low-rank Adapter Search (elastic ranks) and SparsePEFT.
    neural_lora_search: bool = False
    target_module_groups: list[Annotated[list[Name], Field(max_length=MAX_LIST_ITEMS)]] | None = Field(
        None, max_length=MAX_LIST_ITEMS
    )
    search_space: list[Name] | None = Field(None, max_length=MAX_LIST_ITEMS)
    sparse_adapter: bool = False
    # QA-SparsePEFT (SQFT Sec. 3.3): the sparse adapter trained through the base's integer quantizer,
    # merged into one INT model (adapters/qa). Group sizes are multiples of 8 (4-bit codes pack in pairs).
    quantization_aware: bool = False
    quantization_bits: int = Field(4, ge=2, le=8)
    quantization_group_size: int = Field(64, ge=8, le=65536, multiple_of=8)

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

    @model_validator(mode="after")
    def _check_quantization(self) -> LoraSection:
        if not self.quantization_aware:
            for name in ("quantization_bits", "quantization_group_size"):
                # Compared to the default, not to model_fields_set: a stored config re-validated sets them all.
                if getattr(self, name) != type(self).model_fields[name].default:
                    raise ValueError(f"`{name}` applies only with `quantization_aware: true`")
            return self
        if not self.sparse_adapter:
            raise ValueError("`quantization_aware` is QA-SparsePEFT: it needs `sparse_adapter: true`")
        if self.lora_dropout > 0:
            raise ValueError(
                "`lora_dropout` must be 0 with `quantization_aware`: the adapter is trained inside the "
                "quantized weight, where dropout on its input can't be expressed"
            )
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


class ParentModel(_Section):
    """The fine-tuned adapter a job trains on from, merged into its own base first (set by the service)."""

    model: str = Field(max_length=MAX_PATH_CHARS)  # its name, ft:…
    base_model: str = Field(max_length=MAX_PATH_CHARS)  # the base it was trained on
    adapter: str = Field(max_length=MAX_PATH_CHARS)  # its directory
    sparse: bool = False  # SparsePEFT: merged as it trained (masked)


class GeneralSection(_Section):
    base_model: str | None = Field(None, max_length=MAX_PATH_CHARS)
    # Set by the service for a fine-tune of a fine-tuned adapter (`model: "ft:…"`); refused from a client.
    parent: ParentModel | None = None
    tokenizer_name: str | None = Field(None, max_length=MAX_PATH_CHARS)
    output_dir: str | None = Field(None, max_length=MAX_PATH_CHARS)
    save_strategy: Literal["no", "steps", "epoch"] = "no"
    save_steps: int = Field(100, ge=1, le=MAX_STEPS)
    config: ModelLoadConfig = Field(default_factory=ModelLoadConfig)
    lora_config: LoraSection = Field(default_factory=LoraSection)
    enable_gradient_checkpointing: bool = False
    task: Literal["instruction_tuning"] = "instruction_tuning"


class DatasetSection(_Section):
    train_file: str | None = Field(None, max_length=MAX_PATH_CHARS)
    validation_file: str | None = Field(None, max_length=MAX_PATH_CHARS)
    validation_split_percentage: float = Field(5, ge=0, lt=100)
    max_length: int = Field(512, ge=8, le=MAX_TOKENS)
    max_source_length: int = Field(384, ge=1, le=MAX_TOKENS)
    truncation_side: Literal["left", "right"] = "right"
    padding_side: Literal["left", "right"] = "right"
    truncation: bool = True
    padding: bool = True
    mask_input: bool = True
    mask_response: bool = False
    max_train_samples: int | None = Field(None, ge=1, le=MAX_SAMPLES)
    max_eval_samples: int | None = Field(None, ge=1, le=MAX_SAMPLES)
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
    # "dpo": Direct Preference Optimization on preference records (training/preference.py), which is
    # what OpenAI's `method.type: "dpo"` sets; "supervised": next-token loss on the replies.
    # "reinforcement": reinforcement fine-tuning on prompt records (training/reinforcement.py, GRPO), which
    # is what OpenAI's `method.type: "reinforcement"` sets.
    method: Literal["supervised", "dpo", "reinforcement"] = "supervised"
    # DPO's beta: how strongly the policy is held to the reference (larger: closer). Only with "dpo".
    dpo_beta: float = Field(DPO_BETA, gt=0, le=MAX_DPO_BETA)
    # The preference loss (training/preference.py, TRL's names): "sigmoid" (DPO), "ipo" (IPO: the margin
    # of per-token log-ratios held to 1/(2 beta), no saturation), "hinge" (SLiC), "robust" (DPO robust
    # to a share `dpo_label_smoothing` of flipped labels), "simpo" (SimPO: no reference model; the margin of
    # the replies' average token log-probabilities, less `dpo_simpo_gamma`). Only with "dpo".
    dpo_loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo"] = "sigmoid"
    # The share of pairs whose labels may be wrong: "sigmoid" becomes conservative DPO (cDPO), "robust"
    # unbiases for it. Below 0.5 (at 0.5 a pair says nothing).
    dpo_label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    # SimPO's target reward margin gamma (TRL's `simpo_gamma`): the chosen reply's beta-scaled average
    # log-probability must beat the rejected one's by this much. Only with `dpo_loss` "simpo", whose
    # `dpo_beta` is SIMPO_BETA unless given (SimPO's betas are ~20x DPO's: average, not summed, log-probs).
    dpo_simpo_gamma: float = Field(0.5, ge=0.0, le=MAX_SIMPO_GAMMA)
    # Reinforcement fine-tuning (only with "reinforcement"). The grader that scores every sampled answer,
    # as the Evals API takes one (the API checks it); required.
    rl_grader: dict[str, Any] | None = None
    # A label_model / score_model grader's judge as the service resolved its `model` (jobs/kinds.BatchModel's
    # fields): set by the service, refused from a client.
    rl_judge: dict[str, Any] | None = None
    # Answers sampled per prompt: GRPO's group, whose mean and spread make each answer's advantage.
    rl_group_size: int = Field(4, ge=2, le=MAX_RL_GROUP)
    # New tokens per sampled answer at most, and the temperature they are sampled at.
    rl_max_tokens: int = Field(128, ge=1, le=MAX_RL_TOKENS)
    rl_temperature: float = Field(1.0, gt=0, le=2.0)
    # Validation: answers per validation prompt sampled at `rl_temperature` (None: one greedy answer).
    rl_eval_samples: int | None = Field(None, ge=1, le=MAX_RL_GROUP)
    # Chat's `response_format` (`json_object` / `json_schema`, as the API checked it) every sampled answer
    # is held to, token by token (inference/guided.py), as serving holds a request's answer; None: free text.
    rl_response_format: dict[str, Any] | None = None
    # GRPO's KL penalty to the base model (the adapter switched off), beta * KL per answer token (the k3
    # estimator, as TRL computes it); 0: none (TRL's default). Holds the policy near the base it started from.
    rl_kl_beta: float = Field(0.0, ge=0.0, le=MAX_RL_KL_BETA)
    # Optimizer steps per sampling (TRL's num_iterations, mu): each step's sampled answers train this many
    # consecutive steps, PPO's clipped ratio to the sampling policy keeping the later ones close to it.
    rl_updates_per_sample: int = Field(1, ge=1, le=MAX_RL_UPDATES)
    # PPO's clip range of that ratio: [1 - rl_clip_epsilon, 1 + rl_clip_epsilon_high] (None: the same
    # epsilon both ways; a larger high bound is DAPO's "clip-higher").
    rl_clip_epsilon: float = Field(0.2, gt=0.0, lt=1.0)
    rl_clip_epsilon_high: float | None = Field(None, gt=0.0, le=10.0)
    optimizer: Literal["adamw_torch", "adamw", "sgd"] = "adamw_torch"
    batch_size: int = Field(2, ge=1, le=MAX_BATCH_SIZE)
    epochs: int = Field(1, ge=1, le=MAX_EPOCHS)
    max_train_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    learning_rate: float = Field(5e-5, gt=0, le=1.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    # AdamW decays each weight by lr * weight_decay per step; with lr <= 1 a bound of 1 keeps that a decay.
    weight_decay: float = Field(0.0, ge=0, le=1.0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    # "auto": the CUDA GPU when torch sees one, else the CPU. "cuda" on a machine without a GPU is
    # refused when the job is created (devices.py; config.py stays torch-free) and again in the job.
    device: Literal["cpu", "cuda", "auto"] = "auto"
    # Data-parallel ranks (training/distributed.py): the global batch per optimizer step is
    # batch_size x gradient_accumulation_steps x num_training_workers, and learning_rate applies to it.
    num_training_workers: int = Field(1, ge=1, le=MAX_TRAINING_WORKERS)
    # Per worker, Ray's names: {"CPU": k} sets each rank's threads (both runners); "GPU" and custom
    # resources are scheduling requests that only the Ray runner can place.
    resources_per_worker: dict[str, Any] | None = None
    # "auto": bf16 where the device runs it natively (CUDA GPUs with bf16, CPUs with AVX512-BF16/AMX),
    # fp32 elsewhere (training/precision.py).
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # Compile the decoder layers with torch.compile (training/compiled.py): tens of seconds of
    # compilation before the first step, paid back only by long jobs on a GPU (README, "GPU").
    torch_compile: bool = False
    # "auto": eager attention on a CPU under bf16/fp16 while its saved probabilities stay small (a faster
    # backward than SDPA's there), SDPA elsewhere (training/attention.py).
    attn_implementation: Literal["auto", "sdpa", "eager"] = "auto"
    gradient_accumulation_steps: int = Field(1, ge=1, le=MAX_BATCH_SIZE)
    logging_steps: int = Field(10, ge=1, le=MAX_STEPS)
    eval_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    # The same range as the top-level `seed` (it becomes the job's seed column, an SQLite integer).
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_threads: int | None = Field(None, ge=1, le=1024)

    @model_validator(mode="after")
    def _method_fields(self) -> TrainingSection:
        if "method" in self.model_fields_set:  # else OpenAI's `method` may still make it a DPO job
            check_method_fields(self)
        if self.dpo_label_smoothing and self.dpo_loss not in ("sigmoid", "robust", "simpo"):
            raise ValueError(
                f"`dpo_label_smoothing` applies to the 'sigmoid', 'robust' and 'simpo' losses, not '{self.dpo_loss}'"
            )
        gamma_default = TrainingSection.model_fields["dpo_simpo_gamma"].default
        if self.dpo_loss != "simpo" and self.dpo_simpo_gamma != gamma_default:  # a stored config has them all
            raise ValueError(f"`dpo_simpo_gamma` applies to the 'simpo' loss, not '{self.dpo_loss}'")
        if self.dpo_loss == "simpo" and "dpo_beta" not in self.model_fields_set:
            self.dpo_beta = SIMPO_BETA
        return self

    @field_validator("resources_per_worker")
    @classmethod
    def _worker_resources(cls, v: dict[str, Any] | None) -> dict[str, float] | None:
        return None if v is None else check_worker_resources(v)


def check_worker_resources(resources: dict[str, Any]) -> dict[str, float]:
    """``resources_per_worker`` as Ray reads it: resource name -> a positive, finite amount.

    Raises:
        ValueError: an empty or over-long name, a lower-case ``cpu`` / ``gpu`` (Ray's names are
            case-sensitive, so Ray would wait forever for a resource nobody has), or an amount that is
            not a positive number.
    """
    if len(resources) > MAX_WORKER_RESOURCES:
        raise ValueError(f"`resources_per_worker` names {len(resources)} resources; at most {MAX_WORKER_RESOURCES}")
    checked: dict[str, float] = {}
    for name, amount in resources.items():
        if not name or len(name) > MAX_NAME_CHARS:
            raise ValueError(f"`resources_per_worker` has a resource name of {len(name)} characters")
        if name.upper() in ("CPU", "GPU") and name != name.upper():
            raise ValueError(f"`resources_per_worker.{name}`: resource names are case-sensitive; use {name.upper()!r}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount):
            raise ValueError(f"`resources_per_worker.{name}` = {amount!r} is not a number")
        most = {"CPU": 1024, "GPU": 64}.get(name, 2**53)
        if not 0 < amount <= most:
            raise ValueError(f"`resources_per_worker.{name}` = {amount!r} must be > 0 and at most {most}")
        checked[name] = amount
    return checked


METHOD_FIELDS = {
    "dpo": ("preference training", ("dpo_beta", "dpo_loss", "dpo_label_smoothing", "dpo_simpo_gamma")),
    "reinforcement": (
        "reinforcement fine-tuning",
        (
            "rl_grader",
            "rl_judge",
            "rl_group_size",
            "rl_max_tokens",
            "rl_temperature",
            "rl_eval_samples",
            "rl_response_format",
            "rl_kl_beta",
            "rl_updates_per_sample",
            "rl_clip_epsilon",
            "rl_clip_epsilon_high",
        ),
    ),
}


def check_method_fields(training: TrainingSection) -> None:
    """A ValueError naming a DPO or reinforcement setting given to a job of another method."""
    for method, (what, names) in METHOD_FIELDS.items():
        for name in names:
            if training.method != method and getattr(training, name) != TrainingSection.model_fields[name].default:
                raise ValueError(f"`{name}` applies to {what} only: set `method` to '{method}'")


def check_method_complete(training: TrainingSection) -> None:
    """A ValueError for a setting of another method, a reinforcement job without its grader, or one with
    `torch_compile` (once OpenAI's `method` is folded in)."""
    check_method_fields(training)
    if training.method == "reinforcement" and training.rl_grader is None:
        raise ValueError("a reinforcement job needs a grader: `method.reinforcement.grader` (or `rl_grader`)")
    clip = ("rl_clip_epsilon", "rl_clip_epsilon_high")
    changed = [n for n in clip if getattr(training, n) != TrainingSection.model_fields[n].default]
    if changed and training.method == "reinforcement" and training.rl_updates_per_sample == 1:
        # One update per sampling trains the policy that sampled: its ratio is 1 and nothing is clipped.
        raise ValueError(f"`{changed[0]}` applies with `rl_updates_per_sample` above 1 (PPO's clipped ratio)")
    if training.method == "reinforcement" and training.torch_compile:
        # Sampling runs the layers at a new length every token: compiled graphs would only recompile.
        raise ValueError("`torch_compile` does not apply to reinforcement fine-tuning (it samples every step)")


class FinetuneConfig(_Section):
    """The resolved configuration of one job (what the job process runs)."""

    General: GeneralSection = Field(default_factory=GeneralSection)
    Dataset: DatasetSection = Field(default_factory=DatasetSection)
    Training: TrainingSection = Field(default_factory=TrainingSection)

    @model_validator(mode="after")
    def _method_complete(self) -> FinetuneConfig:
        check_method_complete(self.Training)  # the method is final here (OpenAI's `method` folded in)
        return self


AutoInt = int | Literal["auto"]
AutoFloat = float | Literal["auto"]


class Hyperparameters(_Section):
    """OpenAI's ``hyperparameters``; "auto": the section's value if the client sent one, else the auto rule."""

    n_epochs: AutoInt = "auto"
    batch_size: AutoInt = "auto"
    learning_rate_multiplier: AutoFloat = "auto"

    @field_validator("n_epochs", "batch_size", "learning_rate_multiplier", mode="before")
    @classmethod
    def _numbers_in_range(cls, v: Any, info: Any) -> Any:
        # Before the int | "auto" union: past it, Infinity or 1e20 fail both arms and the error would
        # name `n_epochs.int` instead of the field.
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return v
        if not math.isfinite(v):
            raise ValueError("must be a finite number or 'auto'")
        if info.field_name != "learning_rate_multiplier":
            cls._positive_int(v, info)
        return v

    @field_validator("n_epochs", "batch_size")
    @classmethod
    def _positive_int(cls, v: AutoInt, info: Any) -> AutoInt:
        most = MAX_EPOCHS if info.field_name == "n_epochs" else MAX_BATCH_SIZE
        if v != "auto" and not 1 <= v <= most:
            raise ValueError(f"must be between 1 and {most}, or 'auto'")
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
    n_training_records: int | None = None,
) -> FinetuneConfig:
    """Fold the OpenAI fields into the sections; OpenAI values win where both are given.

    ``learning_rate_multiplier`` multiplies ``Training.learning_rate`` (the reference copied it in as
    the absolute rate, which silently trains at a rate of e.g. 2.0). With ``n_training_records`` (the
    training file's record count), what neither the sections nor the OpenAI fields set is chosen by
    the auto rule (auto_hparams.py); ``base`` must be the client's parsed sections, whose
    ``model_fields_set`` tells a sent value from a default.
    """
    from . import auto_hparams  # it reads this module's sections; imported here to avoid a cycle

    explicit = auto_hparams.explicit_fields(base)
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
    if n_training_records is not None:
        explicit |= {
            f"Training.{name}" for (_, name), src in _FROM_HYPERPARAMETERS.items() if getattr(hp, src) != "auto"
        }
        n_examples = auto_hparams.training_examples(n_training_records, cfg.Dataset, validation_file_path is not None)
        cfg = auto_hparams.apply(cfg, n_examples, explicit)
    cfg.Training.seed = seed
    # Attribute assignment skips validation: check the result against the same bounds, so that a
    # multiplier cannot push the rate past 1.0 (nor a file path past its length).
    try:
        return FinetuneConfig.model_validate(cfg.model_dump())
    except ValidationError as exc:
        raise _resolved_error(exc, hp) from None


# Where a resolved value came from when the OpenAI hyperparameter set it.
_FROM_HYPERPARAMETERS = {
    ("Training", "learning_rate"): "learning_rate_multiplier",
    ("Training", "epochs"): "n_epochs",
    ("Training", "batch_size"): "batch_size",
}


def _resolved_error(exc: ValidationError, hp: Hyperparameters) -> InvalidConfigurationError:
    err = exc.errors()[0]
    loc = tuple(str(p) for p in err["loc"])
    name = ".".join(loc)
    source = _FROM_HYPERPARAMETERS.get(loc)  # type: ignore[call-overload]
    if source is not None and getattr(hp, source) != "auto":
        param = f"hyperparameters.{source}"
        value = err.get("input")
        return InvalidConfigurationError(
            f"`{param}` {getattr(hp, source)!r} makes `{name}` {value!r}: {err['msg']}", param=param
        )
    msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
    return InvalidConfigurationError(f"Invalid value for `{name}`: {msg}", param=name)
