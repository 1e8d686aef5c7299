"""FusedLoraLinear computes exactly what stock peft's lora.Linear does (forward, grads, merge, save)."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import layer as lora_layer
from torch.utils._python_dispatch import TorchDispatchMode

from sqft_service.adapters.autocast import SharedInputCast, adapter_weights
from sqft_service.adapters.fused_lora import FusedLoraLinear, fuse_lora_layers
from sqft_service.training.precision import cast_frozen_linears
from tests.conftest import make_tiny_llama


def _pair():
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    stock = get_peft_model(make_tiny_llama(64), cfg)
    for name, p in stock.named_parameters():  # non-zero B so the adapter matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    fused = copy.deepcopy(stock)
    assert fuse_lora_layers(fused) == 2 * 4
    return stock, fused


def test_forward_and_grads_match_stock_peft():
    stock, fused = _pair()
    ids = torch.randint(0, 64, (3, 9))
    for model in (stock, fused):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(fused(input_ids=ids).logits, stock(input_ids=ids).logits, atol=1e-6, rtol=1e-5)
    grads = {n: p.grad for n, p in stock.named_parameters() if p.requires_grad}
    for n, p in fused.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)


def test_disabled_merged_and_saved_behave_like_stock(tmp_path):
    stock, fused = _pair()
    ids = torch.randint(0, 64, (2, 7))
    with fused.disable_adapter():
        base_logits = fused(input_ids=ids).logits
    assert not torch.allclose(base_logits, fused(input_ids=ids).logits)
    fused.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_tiny_llama(64), tmp_path)
    assert all(type(m) is not FusedLoraLinear for m in reloaded.modules())
    assert any(isinstance(m, lora_layer.Linear) for m in reloaded.modules())
    torch.testing.assert_close(reloaded(input_ids=ids).logits, stock(input_ids=ids).logits, atol=1e-6, rtol=1e-5)
    merged = fused.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, stock(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


class _CountCasts(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.casts += func.overloadpacket is torch.ops.aten._to_copy
        return func(*args, **(kwargs or {}))


def _train_step_under_autocast(model, ids) -> tuple[torch.Tensor, int]:
    model.train()
    with _CountCasts() as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.detach(), counter.casts


def test_under_autocast_it_matches_stock_peft_with_fewer_casts():
    stock, fused = _pair()
    for model in (stock, fused):  # the frozen base in bf16, as a bf16 job stores it
        cast_frozen_linears(model, torch.bfloat16)
    ids = torch.randint(0, 64, (3, 9))
    stock_loss, stock_casts = _train_step_under_autocast(stock, ids)
    fused_loss, fused_casts = _train_step_under_autocast(fused, ids)
    # Same bf16 matmuls; only where rounding happens differs (one cast of x instead of one per reader).
    torch.testing.assert_close(fused_loss, stock_loss, atol=2e-2, rtol=1e-2)
    for (name, p), (_, q) in zip(stock.named_parameters(), fused.named_parameters(), strict=True):
        if p.requires_grad and "lora_A" in name:
            assert p.grad.dtype == q.grad.dtype == torch.float32
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
            assert cos > 0.99, name
    # Per adapter (8 here), forward and backward together: no fp32 round trip of x or of the base's
    # output (two kernels or more), and A and B cast with all the others in one kernel, not one each
    # way (four); q and v share one cast of their input.
    assert fused_casts <= stock_casts - 6 * 8, (fused_casts, stock_casts)


def test_shared_input_cast_serves_the_same_activation_only():
    cast = SharedInputCast()
    x = torch.randn(4, 8)
    a = cast(x, torch.bfloat16)
    assert a.dtype == torch.bfloat16 and cast(x, torch.bfloat16) is a
    assert cast(x.clone(), torch.bfloat16) is not a  # another tensor, even with equal values
    b = cast(x, torch.bfloat16)
    x.mul_(2.0)  # changed in place: a new version, a new cast
    c = cast(x, torch.bfloat16)
    assert c is not b and torch.equal(c, (x * 1).to(torch.bfloat16))
    with torch.no_grad():  # a cast made without a graph never serves a forward that needs one
        assert cast(x, torch.bfloat16) is not c


def test_adapter_weights_are_cast_once_per_decoder_forward_and_checkpointing_agrees():
    _, fused = _pair()
    cast_frozen_linears(fused, torch.bfloat16)
    layer = fused.base_model.model.model.layers[0].self_attn.q_proj
    used = []
    layer.register_forward_hook(lambda m, a, o: used.append(adapter_weights(m, "default")))
    ids = torch.randint(0, 64, (3, 9))

    def step(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fused.train()
    loss, grads = step(fused)
    assert used[-1] is not None and used[-1].a.dtype == torch.bfloat16 and not used[-1].masked
    # An optimizer step changes the weights in place: the casts are stale, a layer casts its own.
    with torch.no_grad():
        layer.lora_A["default"].weight.add_(0.0)
    assert adapter_weights(layer, "default") is None
    # Gradient checkpointing recomputes each layer in the backward with the forward's casts: the same
    # arithmetic, so the same loss and gradients to the bit.
    fused.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_ckpt, grads_ckpt = step(fused)
    assert torch.equal(loss_ckpt, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=0, msg=name)


def _nls_pair():
    """Two equal NLS models under a bf16 frozen base; the second without the decoder's cast hook (the
    reference: masks applied on h)."""
    from sqft_service.adapters.lora import build_peft_model
    from sqft_service.config import LoraSection

    groups = [["q_proj", "v_proj"], ["up_proj"]]
    lora = LoraSection(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        neural_lora_search=True,
        target_module_groups=groups,
        search_space=["4,2", "4,3,1"],
    )
    models = []
    for _ in range(2):
        torch.manual_seed(0)  # the same A initialisation in both
        model, handles = build_peft_model(make_tiny_llama(64), lora, seed=0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
        cast_frozen_linears(model, torch.bfloat16)
        handles.nls.activate([2, 4, 3, 1])
        models.append((model.train(), handles))  # the handles hold the controller (layers refer to it weakly)
    models[1][0].base_model.model.model._forward_pre_hooks.clear()
    return models


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_nls_masks_ride_on_the_cast_b_with_the_same_result():
    models = _nls_pair()
    ids = torch.randint(0, 64, (3, 9))
    results = [_loss_and_grads(model, ids) for model, _ in models]
    layer = models[0][0].base_model.model.model.layers[0].self_attn.q_proj
    assert adapter_weights(layer, "default").masked
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, rtol=0, atol=0, msg=name)
    # Rank 2 of 4 in layer 0's q/v group: the masked half of A and B gets no gradient.
    grad_a = results[0][1]["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert grad_a[2:].abs().max() == 0 and grad_a[:2].abs().max() > 0


def test_nls_masks_are_stacked_once_per_draw_and_follow_the_next_draw():
    """The stacked B masks serve every forward of one sub-adapter (accumulation passes) and are built
    again when another is drawn: the second draw's loss and grads are the unhooked reference's."""
    models = _nls_pair()
    decoder = models[0][0].base_model.model.model
    (hook,) = decoder._forward_pre_hooks.values()
    ids = torch.randint(0, 64, (3, 9))
    _loss_and_grads(models[0][0], ids)
    first = hook.b_mask
    _loss_and_grads(models[0][0], ids)
    assert hook.b_mask is first  # the same draw: not rebuilt
    for _, handles in models:
        handles.nls.activate([4, 2, 1, 3])
    results = [_loss_and_grads(model, ids) for model, _ in models]
    assert hook.b_mask is not first
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, rtol=0, atol=0, msg=name)
    grad_a = results[0][1]["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert grad_a.abs().max() > 0 and grad_a.ne(0).any(dim=1).all()  # rank 4 of 4: every row learns


def test_the_casts_follow_a_switch_of_the_active_adapter():
    """The decoder hook keeps its (layer, adapter) list until the active adapters change; after
    ``set_adapter`` it casts the new adapter's weights, and the output is stock peft's for that adapter."""
    stock, fused = _pair()
    other = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    for model in (stock, fused):
        model.add_adapter("other", other)
        for name, p in model.named_parameters():
            if ".other." in name:  # the same A and B in both models
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    layer = fused.base_model.model.model.layers[0].self_attn.q_proj
    ids = torch.randint(0, 64, (2, 7))

    def logits(model) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=ids).logits

    def cast_of(adapter: str):  # read without autograd, like the forwards that made them
        with torch.no_grad():
            return adapter_weights(layer, adapter)

    logits(fused)
    assert cast_of("default") is not None and cast_of("other") is None
    for model in (stock, fused):
        model.set_adapter("other")
    out = logits(fused)
    cast = cast_of("other")
    assert cast is not None and torch.equal(cast.b, layer.lora_B["other"].weight.to(torch.bfloat16))
    torch.testing.assert_close(out, logits(stock), atol=2e-2, rtol=2e-2)
    fused.set_adapter("default")
    assert not torch.allclose(out, logits(fused), atol=1e-3)
