"""Device selection and the GPU-shaped parts of the loop, checked on the CPU.

``Training.device`` / ``mixed_precision`` "auto" resolve to what this machine has; "cuda" without a
GPU is refused naming the field; the host-side label positions a GPU batch carries give the very
loss and gradients of the boolean-mask path; and reading losses late (as a GPU job does, at logging
points) logs the same numbers and NLS statistics as reading them after every step.
A GPU-shaped step run here never reads a device value back (what CUDA's sync debug mode checks in
``tests/gpu``), so CI catches a host sync added to the hot path without a GPU.
"""

from __future__ import annotations

import json
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sqft_service.config import FinetuneConfig, LoraSection
from sqft_service.devices import check_device_available, cuda_available, cuda_device_count, gpus_short
from sqft_service.errors import InvalidConfigurationError
from sqft_service.training import precision
from sqft_service.training.batching import Collator
from sqft_service.training.device import (
    MAX_MASK_BYTES,
    attention_mask_4d,
    describe_device,
    device_batch,
    move_batch,
    packed_mask_4d,
    resolve_device,
)
from sqft_service.training.events import MemorySink
from sqft_service.training.loss import causal_lm_loss, label_positions
from sqft_service.training.recipe import FinetuneRecipe
from sqft_service.training.step_totals import StepTotals
from sqft_service.training.tokenization import IGNORE_INDEX, TokenizedExample
from tests.conftest import make_tiny_llama, randomize_b
from tests.helpers import preference_records, write_json
from tests.unit.test_recipe import NLS_GROUPS, make_cfg, model_dir, sparse_model_dir, train_file  # noqa: F401 (fixtures)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_defaults_are_auto():
    t = FinetuneConfig().Training
    assert (t.device, t.mixed_precision) == ("auto", "auto")


def test_auto_picks_cuda_exactly_when_torch_sees_a_gpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
def test_cuda_without_a_gpu_is_refused_naming_the_field():
    with pytest.raises(InvalidConfigurationError) as job_side:
        resolve_device("cuda")
    assert job_side.value.param == "Training.device" and "no CUDA GPU" in job_side.value.message
    # The service's check (a child process asks torch, so the API process stays torch-free).
    assert cuda_available() is False
    with pytest.raises(InvalidConfigurationError) as api_side:
        check_device_available("cuda")
    assert api_side.value.param == "Training.device" and api_side.value.code == "invalid_configuration"
    check_device_available("auto")
    check_device_available("cpu")


def test_the_service_probe_agrees_with_torch():
    assert cuda_available() is torch.cuda.is_available()
    assert cuda_device_count() == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


class _Machine:
    """A runner's answers for a place with ``gpus`` GPUs (what SubprocessRunner answers from the probe)."""

    def __init__(self, gpus: int) -> None:
        self.gpus = gpus

    def check_gpu(self) -> str | None:
        return None if self.gpus else "no CUDA GPU here"

    def check_gpu_workers(self, device: str, workers: int) -> str | None:
        return gpus_short(self.gpus, workers, "this machine")


def test_more_gpu_workers_than_gpus_are_refused_naming_the_workers_field():
    check_device_available("auto", workers=2)  # this CPU machine: the ranks train on its cores
    check_device_available("cuda", runner=_Machine(2), workers=2)
    check_device_available("cpu", runner=_Machine(1), workers=4)  # CPU ranks need no GPU
    for device in ("auto", "cuda"):
        with pytest.raises(InvalidConfigurationError) as err:
            check_device_available(device, runner=_Machine(1), workers=2)
        assert err.value.param == "Training.num_training_workers"
        assert "2 data-parallel workers on GPUs take one GPU each, and this machine has 1" in err.value.message
    with pytest.raises(InvalidConfigurationError) as err:
        check_device_available("cuda", runner=_Machine(0), workers=2)
    assert err.value.param == "Training.device"  # no GPU at all: the device is what's wrong


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, None)])
def test_auto_precision_on_a_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "native_bf16_supported", lambda: native)
    warnings: list[str] = []
    assert precision.autocast_dtype("auto", warnings.append, "cpu") is expected
    assert warnings == []  # "auto" falls back silently; only an explicit "bf16" warns
    assert precision.autocast_dtype("no", warnings.append, "cpu") is None


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, None)])
def test_auto_precision_on_a_gpu_follows_its_bf16_support(monkeypatch, bf16, expected):
    monkeypatch.setattr(precision, "cuda_bf16_supported", lambda: bf16)
    warnings: list[str] = []
    assert precision.autocast_dtype("auto", warnings.append, "cuda") is expected
    assert warnings == []
    assert precision.autocast_dtype("fp16", warnings.append, "cuda") is torch.float16  # every CUDA GPU
    assert precision.autocast_dtype("bf16", warnings.append, "cuda") is expected
    assert bool(warnings) is (not bf16) and all("GPU" in w for w in warnings)


def test_precision_names():
    assert precision.precision_name(torch.bfloat16) == "bf16 autocast"
    assert precision.precision_name(None) == "fp32"


def _batch() -> dict:
    gen = torch.Generator().manual_seed(0)
    examples = []
    for n in (6, 13, 21):
        ids = torch.randint(3, 512, (n,), generator=gen).tolist()
        examples.append(TokenizedExample(input_ids=ids, labels=[IGNORE_INDEX] * (n // 2) + ids[n // 2 :]))
    return Collator(pad_token_id=2)(examples)


def test_host_label_positions_give_the_mask_paths_loss_and_gradients_exactly():
    from sqft_service.adapters.lora import build_peft_model

    model, _ = build_peft_model(make_tiny_llama(512, seed=1), LoraSection(r=4, lora_alpha=8, lora_dropout=0.0))
    randomize_b(model)
    batch = _batch()
    prepared = label_positions(batch)
    assert prepared["label_positions"].numel() == batch["n_label_tokens"] == prepared["label_targets"].numel()
    results = []
    for b in (batch, prepared):
        model.zero_grad()
        out = causal_lm_loss(model, b)
        out.loss_sum.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss_sum.detach(), int(out.n_correct), out.n_labels, grads))
    (loss_a, correct_a, n_a, grads_a), (loss_b, correct_b, n_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and (correct_a, n_a) == (correct_b, n_b)
    assert grads_a and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


def _assert_same_loss_and_grads(model, reference: dict, batch: dict) -> None:
    """``batch`` gives ``reference``'s loss and adapter gradients (finite), up to float noise."""
    results = []
    for b in (reference, batch):
        model.zero_grad()
        out = causal_lm_loss(model, b)
        out.loss_sum.backward()
        results.append(
            (out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    (loss_ref, grads_ref), (loss, grads) = results
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads_ref
    for name, grad in grads_ref.items():
        assert torch.isfinite(grads[name]).all()
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_host_built_4d_mask_gives_the_2d_masks_loss_and_gradients(side):
    from sqft_service.adapters.lora import build_peft_model

    model, _ = build_peft_model(make_tiny_llama(512, seed=2), LoraSection(r=4, lora_alpha=8, lora_dropout=0.0))
    randomize_b(model)
    gen = torch.Generator().manual_seed(1)
    examples = []
    for n in (6, 13, 21):
        ids = torch.randint(3, 512, (n,), generator=gen).tolist()
        examples.append(TokenizedExample(input_ids=ids, labels=[IGNORE_INDEX] * (n // 2) + ids[n // 2 :]))
    batch = Collator(pad_token_id=2, padding_side=side)(examples)
    mask = attention_mask_4d(batch["attention_mask"])
    width = batch["input_ids"].shape[1]
    assert mask.shape == (3, 1, width, width) and mask.any(dim=-1).all()  # no query row is left empty
    _assert_same_loss_and_grads(model, batch, {**batch, "attention_mask": mask})
    full = torch.ones(2, 5, dtype=torch.long)  # no padding: one causal mask for the whole batch
    assert torch.equal(attention_mask_4d(full), torch.ones(5, 5, dtype=torch.bool).tril()[None, None])
    unpadded = Collator(pad_token_id=2, pad_to_multiple_of=None)(examples[:1])
    assert bool(unpadded["attention_mask"].all())
    model.zero_grad()
    plain = causal_lm_loss(model, unpadded).loss_sum
    masked = causal_lm_loss(model, {**unpadded, "attention_mask": attention_mask_4d(unpadded["attention_mask"])})
    torch.testing.assert_close(masked.loss_sum, plain, rtol=1e-5, atol=1e-6)


def test_a_host_built_packed_mask_gives_the_models_own_loss_and_gradients():
    from sqft_service.adapters.lora import build_peft_model
    from sqft_service.training.packing import PackingCollator

    model, _ = build_peft_model(make_tiny_llama(512, seed=3), LoraSection(r=4, lora_alpha=8, lora_dropout=0.0))
    randomize_b(model)
    gen = torch.Generator().manual_seed(2)
    examples = []
    for n in (5, 9, 14, 7):
        ids = torch.randint(3, 512, (n,), generator=gen).tolist()
        examples.append(TokenizedExample(input_ids=ids, labels=[IGNORE_INDEX] * (n // 2) + ids[n // 2 :]))
    batch = PackingCollator(pad_token_id=2, capacity=20)(examples)
    assert batch["attention_mask"] is None and batch["n_rows"] == 2  # two rows, each holding several examples
    mask = packed_mask_4d(batch["position_ids"])
    width = batch["input_ids"].shape[1]
    assert mask.shape == (2, 1, width, width) and mask.diagonal(dim1=-2, dim2=-1).all()
    # A token of the second example in a row sees nothing of the first one.
    start = int((batch["position_ids"][0, 1:] == 0).nonzero()[0]) + 1
    assert not mask[0, 0, start, :start].any() and mask[0, 0, start, start]
    _assert_same_loss_and_grads(model, batch, {**batch, "attention_mask": mask})
    side = int(MAX_MASK_BYTES**0.5) + 1  # too large to build on the host: the model builds it
    assert packed_mask_4d(torch.zeros(1, side, dtype=torch.long)) is None


def test_moving_a_batch_to_the_cpu_is_free():
    batch = _batch()
    assert move_batch(batch, torch.device("cpu")) is batch
    assert describe_device(torch.device("cpu")).startswith("device cpu")


def test_step_totals_add_like_the_loop_always_did():
    values = [1.1, 2.7, 3.3000001]
    totals = StepTotals([torch.tensor(v) for v in values], [torch.tensor(3), torch.tensor(4), torch.tensor(5)])
    expected = 0.0
    for v in values:
        expected += float(torch.tensor(v))
    assert totals.read() == (expected, 12)
    assert totals.read() == (expected, 12)  # read once, then cached


def test_job_events_name_device_and_precision(model_dir, train_file, tmp_path):  # noqa: F811
    cfg = make_cfg(model_dir, train_file, max_train_steps=1)
    cfg.Training.mixed_precision = "auto"
    sink = MemorySink()
    recipe = FinetuneRecipe(cfg, tmp_path, sink)
    recipe.setup()
    data = [d for _, _, d in sink.messages if d and "device" in d]
    assert len(data) == 1
    want = "bf16 autocast" if precision.native_bf16_supported() else "fp32"
    assert data[0] == {"device": "cpu", "device_name": "cpu", "precision": want}
    assert recipe.autocast_dtype is (torch.bfloat16 if want != "fp32" else None)


def _run(model_dir, train_file, out, *, read_every_step: bool) -> tuple[list[dict], dict]:  # noqa: F811
    lora = LoraSection(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        neural_lora_search=True,
        target_module_groups=NLS_GROUPS,
        search_space=["8,6,4", "8,4", "8,2"],
    )
    cfg = make_cfg(model_dir, train_file, lora=lora, max_train_steps=7, logging_steps=3, batch_size=2)
    cfg.General.save_strategy = "steps"
    cfg.General.save_steps = 5
    sink = MemorySink()
    recipe = FinetuneRecipe(cfg, out, sink)
    recipe.setup()
    recipe.read_losses_every_step = read_every_step  # what a GPU job does: read at logging points
    try:
        recipe.train()
        stats = recipe.handles.nls.stats()
    finally:
        recipe.cleanup()
    rows = [json.loads(json.dumps(r)) for r in recipe._metric_rows]
    for row in rows:
        for key in ("tokens_per_s", "step_s", "eta_s", "elapsed_s"):  # timings differ run to run
            row.pop(key, None)
    return rows, stats | {"metrics": sink.metric_rows[:-1], "checkpoint": sink.checkpoints[0][2]}


def test_reading_losses_late_logs_the_same_numbers(model_dir, train_file, tmp_path):  # noqa: F811
    eager_rows, eager = _run(model_dir, train_file, tmp_path / "eager", read_every_step=True)
    late_rows, late = _run(model_dir, train_file, tmp_path / "late", read_every_step=False)
    assert len(eager_rows) == 7 and all(r["train_loss"] is not None for r in late_rows)
    assert late_rows == eager_rows  # every step's loss and accuracy, in metrics.csv and resume state
    assert late["dimensions"] == eager["dimensions"]  # NLS loss per sampled rank
    assert late["checkpoint"] == eager["checkpoint"]
    emitted = [(m["step"], m["train_loss"]) for m in late["metrics"] if "train_loss" in m]
    assert [s for s, _ in emitted] == [1, 3, 6, 7]
    assert emitted == [(m["step"], m["train_loss"]) for m in eager["metrics"] if "train_loss" in m]


class _HostReads(TorchDispatchMode):
    """Records the operators that would make a GPU step wait for the device: a value read back to the
    host (``.item()``, ``float()``, ``bool()``: ``_local_scalar_dense``, ``is_nonzero``, ``equal``) or an
    output whose size depends on the values (``nonzero``, ``masked_select``, a boolean-mask index).

    It sees every operator below autograd, forward and backward, so a CPU run of a GPU-shaped step
    shows what CUDA's sync debug mode would flag (``tests/gpu`` checks that on a GPU). ``host``:
    storages this CPU run reads that a GPU job does not (AdamW's step counters, see the test).
    """

    READS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::nonzero", "aten::masked_select",
             "aten::unique_consecutive", "aten::_unique2", "aten::repeat_interleave"}  # fmt: skip
    INDEXING = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}

    def __init__(self, host: set[int]) -> None:
        super().__init__()
        self.host, self.reads = host, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        on_device = not tensors or tensors[0].untyped_storage().data_ptr() not in self.host
        bool_index = name in self.INDEXING and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ())
        )
        if on_device and (name in self.READS or bool_index):
            frames = [f for f in traceback.extract_stack() if "site-packages/torch/" not in f.filename]
            self.reads.append(f"{name} at " + " < ".join(f"{f.name}:{f.lineno}" for f in reversed(frames[-4:])))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["lora", "nls", "sparsepeft", "lora-packed", "lora-dropout", "dpo", "dpo-packed"])
def test_a_gpu_shaped_step_never_reads_a_value_back(
    model_dir,  # noqa: F811
    sparse_model_dir,  # noqa: F811
    train_file,  # noqa: F811
    tmp_path,
    monkeypatch,
    method,
):
    """The whole optimizer step of a GPU job (NLS draw, forwards, backwards, clipping, update), run on
    the CPU on :func:`device_batch` batches under bf16 autocast: no operator in it may need a device
    value on the host, in our code or in the transformers/peft/torch code it calls."""
    monkeypatch.setattr(precision, "native_bf16_supported", lambda: True)
    dropout = 0.05 if method in ("lora-dropout", "sparsepeft") else 0.0
    lora = LoraSection(r=8, lora_alpha=16, lora_dropout=dropout, sparse_adapter=method == "sparsepeft")
    if method == "nls":
        lora = LoraSection(r=8, lora_alpha=16, lora_dropout=dropout, neural_lora_search=True,
                           target_module_groups=NLS_GROUPS, search_space=["8,6,4", "8,4", "8,2"])  # fmt: skip
    base = sparse_model_dir if method == "sparsepeft" else model_dir
    data = write_json(tmp_path / "pairs.json", preference_records(16)) if method.startswith("dpo") else train_file
    cfg = make_cfg(base, data, lora=lora, max_train_steps=4, batch_size=4, gradient_accumulation_steps=2)
    cfg.Training.mixed_precision, cfg.Training.max_grad_norm = "bf16", 1.0
    cfg.Training.method = "dpo" if method.startswith("dpo") else "supervised"
    cfg.Dataset.packing = method.endswith("-packed")
    recipe = FinetuneRecipe(cfg, tmp_path, MemorySink())
    recipe.setup()
    try:
        if recipe.preference:
            recipe._set_reference()
        assert recipe.autocast_dtype is torch.bfloat16
        shards = recipe._batches(0)
        groups = [[device_batch(recipe.collator([recipe.train_examples[i] for i in idx]), recipe.device)
                   for idx in shards[first : first + 2]] for first in (0, 2)]  # fmt: skip
        assert all(b["attention_mask"].dim() == 4 for g in groups for b in g)

        def step(n: int, group: list[dict]) -> None:
            if recipe.handles.nls is not None:
                recipe.handles.nls.sample(n)
            recipe._train_step(group, sum(b["n_label_tokens"] for b in group), cfg.Training.max_grad_norm)

        step(0, groups[0])  # the optimizer makes its state here
        # AdamW's step counters: this CPU run's foreach AdamW reads them with .item(); a GPU job's fused
        # AdamW (training/recipe.py) keeps them on the device and reads them in its kernel, no sync.
        host = {s["step"].untyped_storage().data_ptr() for s in recipe.optimizer.state.values()}
        with _HostReads(host) as mode:
            step(1, groups[1])
        assert not mode.reads, "host reads in a GPU step:\n" + "\n".join(mode.reads)
    finally:
        recipe.cleanup()


def test_the_inference_device_setting_is_auto_or_cpu():
    from sqft_service.settings import Settings

    assert Settings.from_env({}).inference_device == "auto"
    assert Settings.from_env({"SQFT_INFERENCE_DEVICE": "cpu"}).inference_device == "cpu"
    with pytest.raises(SystemExit, match="SQFT_INFERENCE_DEVICE='gpu' is not `auto` or `cpu`"):
        Settings.from_env({"SQFT_INFERENCE_DEVICE": "gpu"})
