"""``Training.torch_compile``: a compiled job trains like an eager one and saves the same adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sqft_service.config import LoraSection
from sqft_service.errors import InvalidConfigurationError
from sqft_service.training.compiled import compile_decoder_layers
from sqft_service.training.events import MemorySink
from sqft_service.training.recipe import run_training
from tests.unit.test_recipe import NLS_GROUPS, losses, make_cfg, model_dir, sparse_model_dir, train_file  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = LoraSection(r=4, lora_alpha=8, lora_dropout=0.0)
NLS = LoraSection(
    r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    neural_lora_search=True,
    target_module_groups=NLS_GROUPS,
    search_space=["4,3,2"] * len(NLS_GROUPS),
)
SPARSE = LoraSection(r=4, lora_alpha=8, lora_dropout=0.0, sparse_adapter=True)


@pytest.mark.parametrize(
    ("lora", "sparse", "checkpointing"),
    [(LORA, False, False), (NLS, False, False), (SPARSE, True, False), (LORA, False, True)],
    ids=["lora", "nls", "sparsepeft", "gradient-checkpointing"],
)
def test_compiled_job_trains_like_the_eager_one(
    model_dir,  # noqa: F811
    sparse_model_dir,  # noqa: F811
    train_file,  # noqa: F811
    tmp_path,
    lora,
    sparse,
    checkpointing,
):
    base = sparse_model_dir if sparse else model_dir
    runs = {}
    for compiled in (False, True):
        sink = MemorySink()
        cfg = make_cfg(base, train_file, lora=lora.model_copy(), max_train_steps=4, torch_compile=compiled)
        cfg.General.enable_gradient_checkpointing = checkpointing
        result = run_training(cfg, tmp_path / str(compiled), sink)
        runs[compiled] = (sink, load_file(Path(result.adapter_dir) / "adapter_model.safetensors"))
    (eager, eager_weights), (compiled, compiled_weights) = runs[False], runs[True]
    assert any("torch.compile: 2 decoder layers" in text for _, text, _ in compiled.messages)
    # Fused kernels reorder fp32 sums: close, not bit-equal. Four steps at lr 1e-2 move the loss by far more.
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)
    assert abs(losses(eager)[-1] - losses(eager)[0]) > 1e-2
    assert compiled_weights.keys() == eager_weights.keys()
    for key, value in eager_weights.items():
        torch.testing.assert_close(compiled_weights[key], value, rtol=1e-3, atol=1e-5)


def test_a_decoder_without_layers_is_refused():
    class NoLayers(torch.nn.Module):
        def get_decoder(self):
            return torch.nn.Linear(2, 2)

    with pytest.raises(InvalidConfigurationError) as info:
        compile_decoder_layers(NoLayers())
    assert info.value.param == "Training.torch_compile"


@pytest.mark.parametrize(
    ("sparse", "nls"), [(False, False), (True, False), (False, True)], ids=["lora", "sparsepeft", "nls"]
)
def test_a_compiled_layer_is_one_graph_with_dropout_and_autocast(sparse, nls):
    # The eager paths' Python caches (shared input cast, shared dropout mask) step aside inside a
    # compiled graph: a graph break per adapter would leave many small graphs and launches between them.
    from torch._dynamo.utils import counters

    from sqft_service.adapters.lora import build_peft_model
    from sqft_service.adapters.sparsify import sparsify_model
    from sqft_service.training.precision import cast_frozen_linears
    from tests.conftest import make_tiny_llama

    torch._dynamo.reset()
    counters.clear()
    base = make_tiny_llama(128)
    if sparse:
        sparsify_model(base, "magnitude", 0.5)
    lora = LoraSection(r=4, lora_alpha=8, lora_dropout=0.1, sparse_adapter=sparse)
    if nls:
        lora = NLS.model_copy(update={"lora_dropout": 0.1})
    model, handles = build_peft_model(base, lora, seed=0)
    cast_frozen_linears(model, torch.bfloat16)
    compile_decoder_layers(model)
    model.train()
    for step, length in enumerate((9, 13, 11)):
        if nls:  # another sub-adapter each step: new mask values, the same graph
            handles.nls.sample(step)
        ids = torch.randint(0, 128, (2, length))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    # One graph for the first layer (its input needs no gradient) and one for the others.
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    # The eager path's once-per-forward weight casts are not made for compiled layers.
    from sqft_service.adapters.autocast import WEIGHTS_ATTR

    assert all(getattr(m, WEIGHTS_ATTR) == {} for m in model.modules() if hasattr(m, WEIGHTS_ATTR))
