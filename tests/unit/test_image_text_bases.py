"""Image-text bases (Gemma 3 4B and up: ``Gemma3ForConditionalGeneration``) fine-tuned on text: adapters,
pruning and quantization touch the text decoder only; the vision tower and projector, which see no text
training data, come out of training, merging and sparsifying as they went in."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sqft_service.adapters.lora import PROJECTION_NAMES, build_peft_model, default_target_modules
from sqft_service.adapters.peft_utils import language_model_linears, language_model_path
from sqft_service.adapters.sparsify import prunable_linears, sparsify_model
from sqft_service.config import LoraSection
from sqft_service.model_ops import extract, merge, sub_adapter_ranks
from sqft_service.model_sources import export_source
from sqft_service.training.events import MemorySink
from sqft_service.training.recipe import run_training
from tests.unit.test_recipe import losses, make_cfg, sqft_lora, train_file  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
# The image side, in the module tree and as transformers 5 saves it (``vision_tower.*`` at the top).
VISION = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.")


def _tiny_gemma3_image_text(vocab: int):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(vocab_size=vocab + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=3)
    text |= dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32)
    text |= dict(sliding_window=16, initializer_range=0.3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    vision |= dict(image_size=28, patch_size=14)
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=vocab + 1,
        eoi_token_index=vocab + 2,
        image_token_index=vocab + 3,
    )
    torch.manual_seed(0)
    return Gemma3ForConditionalGeneration(config).train()


@pytest.fixture(scope="module")
def image_text_dir(tmp_path_factory, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("tiny-gemma3-image-text")
    model = _tiny_gemma3_image_text(len(tokenizer))
    sparsify_model(model, "magnitude", 0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _vision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(VISION)}


def test_only_the_text_decoder_is_adapted_pruned_and_quantized(tokenizer):
    """The vision tower's q/k/v share the decoder's names: by default, and when named, only the decoder's
    are adapted (PEFT's ``exclude_modules`` keeps LoRA off the rest); pruning leaves the tower dense."""
    model = _tiny_gemma3_image_text(len(tokenizer))
    assert language_model_path(model) == "model.language_model"
    linears = language_model_linears(model)
    assert linears and all(name.startswith("model.language_model.layers.") for name in linears)
    assert default_target_modules(model) == [n for n in PROJECTION_NAMES if n not in ("qkv_proj", "gate_up_proj")]
    assert set(prunable_linears(model)) == set(linears)
    tower = {k: v.clone() for k, v in _vision(model.state_dict()).items()}
    assert any(".self_attn.q_proj." in k for k in tower)  # the names that would collide
    report = sparsify_model(model, "magnitude", 0.5)
    assert report["overall"] == pytest.approx(0.5, abs=0.01) and set(report["layers"]) == set(linears)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tower.items())

    lora = LoraSection(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"], sparse_adapter=True)
    lora.quantization_aware, lora.quantization_group_size = True, 32
    peft_model, handles = build_peft_model(model, lora)
    adapted = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert len(adapted) == 3 and all(".language_model.layers." in n for n in adapted), adapted
    assert len(handles.quant.quantizers()) == 3


def test_every_sqft_method_trains_and_merges_leaving_the_vision_tower_as_it_was(
    image_text_dir,
    tokenizer,
    train_file,  # noqa: F811
    tmp_path,
):
    sink = MemorySink()
    groups = [["q_proj", "k_proj", "v_proj"], ["up_proj"], ["down_proj"]]
    cfg = make_cfg(image_text_dir, train_file, lora=sqft_lora(groups, group_size=32), epochs=2)
    result = run_training(cfg, tmp_path / "out", sink)
    curve = losses(sink)
    assert sum(curve[-3:]) < sum(curve[:3]), curve
    assert export_source(str(image_text_dir)) == image_text_dir
    report = merge(str(image_text_dir), Path(result.adapter_dir), tmp_path / "merged", sparse=True, gguf_type="f32")
    assert report["adapted_modules"] == 3 * 5 and report["zeros_preserved"] is True
    assert report["before"]["overall"] == pytest.approx(0.5, abs=0.01)  # the decoder's, the tower left out
    assert report["quantization"]["bits"] == 4
    before = load_file(image_text_dir / "model.safetensors")
    after = load_file(tmp_path / "merged" / "model.safetensors")
    assert _vision(before).keys() == _vision(after).keys() and _vision(before)
    for key, value in _vision(before).items():
        assert torch.equal(after[key].to(value.dtype), value), key
    changed = [k for k in before if "language_model." in k and not torch.equal(before[k], after[k].to(before[k].dtype))]
    assert len(changed) == 3 * 5, changed
    # A sub-adapter extracted from the super-adapter (stock PEFT, no retraining) merges the same way.
    sub = extract(
        Path(result.adapter_dir), tmp_path / "sub", sub_adapter_ranks(Path(result.adapter_dir), "minimal", None)
    )
    assert merge(str(image_text_dir), Path(sub["path"]), tmp_path / "merged-sub", sparse=True)["adapted_modules"] == 15
    merged_sub = load_file(tmp_path / "merged-sub" / "model.safetensors")
    assert all(torch.equal(merged_sub[k].to(v.dtype), v) for k, v in _vision(before).items())
    # GGUF: the text decoder, as llama.cpp's converter writes one (the image side goes in an mmproj file;
    # the base's own works, the tower being unchanged), every trained layer as its integers.
    exported = report["gguf"]
    assert exported["tensor_types"] == {"F32": 2 + 3 * (2 + 6), "Q4_1": 3 * 5}  # 2 + 5 linears, 6 norms
    assert exported["int_layers"] == exported["exact_int_layers"] == 3 * 5
    reader = gguf.GGUFReader(str(tmp_path / "merged" / "model.gguf"))
    assert reader.get_field("general.architecture").contents() == "gemma3"
    tensors = {t.name: t for t in reader.tensors}
    q_proj = tensors["blk.2.attn_q.weight"]
    decoded = gguf.quants.dequantize(q_proj.data, q_proj.tensor_type).reshape(64 * 2, 32)
    assert np.array_equal(decoded, after["language_model.model.layers.2.self_attn.q_proj.weight"].float().numpy())
    norm = after["language_model.model.layers.2.post_feedforward_layernorm.weight"].float().numpy()
    assert np.array_equal(tensors["blk.2.post_ffw_norm.weight"].data, norm + 1)


def test_the_engine_answers_as_transformers_batched_and_alone(image_text_dir, tokenizer):
    """The inference engine serves an image-text base's text side: greedy answers as transformers' own
    ``generate`` gives them, and the same batched (left-padded rows past the sliding window) as alone."""
    from transformers import AutoModelForCausalLM

    from sqft_service.inference.engine import InferenceEngine
    from sqft_service.inference.spec import ModelSpec, Sampling

    engine = InferenceEngine(threads=1, max_queue=0, max_models=1, model_cache_dir=None, device="cpu")
    spec = ModelSpec("tiny-image-text", str(image_text_dir))
    words = ["red", "green", "blue", "sky", "tree", "water", "fire", "stone", "cloud"]
    prompts = [tokenizer(" ".join(words[i % 4 : 5 + i] * (1 + i // 2)))["input_ids"] for i in range(6)]
    samplings = [Sampling(6, temperature=0.0) for _ in prompts]
    alone = [engine.generate(spec, ids, s)[0] for ids, s in zip(prompts, samplings, strict=True)]
    assert len({c.text for c in alone}) > 2
    assert engine.generate_together(spec, prompts, samplings) == alone
    model = AutoModelForCausalLM.from_pretrained(image_text_dir, dtype=torch.float32).eval()
    for ids, answer in zip(prompts, alone, strict=True):
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None)
        assert tokenizer.decode(out[0, len(ids) :]) == answer.text


def test_wanda_and_gptq_calibrate_on_text_and_quantize_the_decoder_only(image_text_dir, tmp_path):
    """Wanda's calibration and GPTQ's layer-by-layer pass run the image-text model on text; the pruned and
    INT4 layers are the decoder's 21, and the vision tower is saved as it was."""
    from sqft_service.model_ops import sparsify

    result = sparsify(
        str(image_text_dir),
        tmp_path / "gptq",
        method="wanda",
        n_calibration=8,
        max_calibration_tokens=32,
        quantization={"method": "gptq", "bits": 4, "group_size": 32},
    )
    assert len(result["report"]["layers"]) == result["quantization"]["layers"] == 3 * 7
    assert result["quantization"]["output_error"] < result["quantization"]["rtn_output_error"]
    before = load_file(image_text_dir / "model.safetensors")
    after = load_file(tmp_path / "gptq" / "model.safetensors")
    for key, value in _vision(before).items():
        assert torch.equal(after[key].to(value.dtype), value), key
