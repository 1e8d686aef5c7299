"""Training.attn_implementation: "auto" takes eager attention exactly where it was measured faster, and
a job trains the same with either implementation."""

from __future__ import annotations

import pytest
import torch

from sqft_service.training.attention import (
    EAGER_ATTENTION_BYTES,
    GROUPED_EAGER,
    choose_attention,
    eager_attention_bytes,
)
from sqft_service.training.events import MemorySink
from sqft_service.training.recipe import run_training
from tests.conftest import make_tiny_llama
from tests.unit.test_recipe import losses, make_cfg, model_dir, train_file  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
CPU, CUDA, BF16 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16


def _sdpa_llama():
    model = make_tiny_llama(64)
    model.set_attn_implementation("sdpa")
    return model


@pytest.mark.parametrize(
    ("requested", "device", "dtype", "seq", "expected"),
    [
        ("auto", CPU, BF16, 64, "eager"),  # a CPU under bf16, short rows: eager
        ("auto", CPU, None, 64, "sdpa"),  # fp32: SDPA
        ("auto", CUDA, BF16, 64, "sdpa"),  # a GPU: its SDPA kernels
        ("auto", CPU, BF16, 100_000, "sdpa"),  # rows whose probabilities would not fit
        ("eager", CPU, None, 100_000, "eager"),  # asked for: taken, whatever it costs
        ("sdpa", CPU, BF16, 64, "sdpa"),
    ],
)
def test_auto_takes_eager_only_on_a_cpu_under_low_precision_while_it_fits(requested, device, dtype, seq, expected):
    model = _sdpa_llama()
    assert choose_attention(model, requested, device, dtype, rows=8, seq=seq) == expected
    assert model.config._attn_implementation == (GROUPED_EAGER if expected == "eager" else expected)


def test_eager_shares_kv_heads_only_for_grouped_heads_of_llamas_signature():
    llama = _sdpa_llama()  # 4 query heads over 2 K/V heads
    assert choose_attention(llama, "eager", CPU, BF16, rows=8, seq=64) == "eager"
    assert llama.config._attn_implementation == GROUPED_EAGER
    no_groups = make_tiny_llama(64, num_key_value_heads=4)  # one K/V head per query head: nothing to share
    assert choose_attention(no_groups, "eager", CPU, BF16, rows=8, seq=64) == "eager"
    assert no_groups.config._attn_implementation == "eager"
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))  # scales inside its eager
    assert choose_attention(gpt2, "eager", CPU, BF16, rows=8, seq=64) == "eager"
    assert gpt2.config._attn_implementation == "eager"


@pytest.mark.parametrize("kv_heads", [1, 2, 4])  # multi-query, grouped, one K/V head per query head
def test_grouped_eager_attention_is_llamas_eager_forward_backward_and_decoding(kv_heads):
    """Logits, every gradient and a cached decoding step match transformers' eager (repeat_kv) attention,
    on left-padded rows (the mask differs per row)."""
    ids = torch.randint(3, 64, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = mask[1, :1] = 0  # left padding
    runs = {}
    for implementation in ("eager", GROUPED_EAGER):
        model = make_tiny_llama(64, num_key_value_heads=kv_heads).train()
        model.set_attn_implementation(implementation)
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.eval()
        with torch.no_grad():
            decoded = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=2
            )
            prefix = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
            step = model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=prefix.past_key_values).logits
        runs[implementation] = (out.logits.detach(), grads, decoded, step)
    (logits, grads, decoded, step), (g_logits, g_grads, g_decoded, g_step) = runs["eager"], runs[GROUPED_EAGER]
    torch.testing.assert_close(g_logits, logits)
    for name, grad in grads.items():
        torch.testing.assert_close(g_grads[name], grad, msg=name)
    assert torch.equal(g_decoded, decoded)
    torch.testing.assert_close(g_step, step)


def test_the_eager_estimate_counts_every_layers_probabilities():
    model = _sdpa_llama()
    heads, layers = model.config.num_attention_heads, model.config.num_hidden_layers
    assert eager_attention_bytes(model, rows=8, seq=100) == 8 * heads * 100 * 100 * 6 * layers
    # SmolLM2-135M (9 heads, 30 layers), batch 8: ARC-E's 114-token rows fit, GSM8K's 467 do not.
    smol = 8 * 9 * 30 * 6
    assert smol * 114**2 <= EAGER_ATTENTION_BYTES < smol * 467**2


def test_a_job_trains_the_same_with_eager_and_sdpa_attention(model_dir, train_file, tmp_path):  # noqa: F811
    runs = {}
    for attention in ("sdpa", "eager"):
        sink = MemorySink()
        run_training(
            make_cfg(model_dir, train_file, max_train_steps=3, attn_implementation=attention),
            tmp_path / attention,
            sink,
        )
        assert any(
            text == f"attention: {attention} (attn_implementation '{attention}')" for _, text, _ in sink.messages
        )
        runs[attention] = losses(sink)
    assert runs["eager"] == pytest.approx(runs["sdpa"], rel=1e-5)
