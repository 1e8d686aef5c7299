"""A tiny image-text model directory as the hub's Gemma 3 4B ones are laid out (weights, tokenizer with
the image tokens, processor, a chat template that places images), and images as ``data:`` URLs."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import torch

# A Gemma 3-like chat template over ChatML turns: a content part ``{"type": "image"}`` is the processor's
# image placeholder (``<start_of_image>``, which it expands to the image's tokens).
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<start_of_image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_TOKENS = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}


def save_image_text_model(
    out: Path,
    tokenizer_dir: Path,
    *,
    seed: int = 0,
    text_shape: dict | None = None,
    vision_shape: dict | None = None,
    image_size: int = 28,
    tokens_per_image: int = 4,
) -> Path:
    """A random ``Gemma3ForConditionalGeneration`` with its processor at ``out``: by default tiny, 28-pixel
    images as 4 tokens; ``text_shape`` / ``vision_shape`` override the two configs' sizes (benchmarks)."""
    from transformers import (
        AutoTokenizer,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, extra_special_tokens=IMAGE_TOKENS)
    tokenizer.chat_template = TEMPLATE
    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = Gemma3Processor(image_processor, tokenizer, chat_template=TEMPLATE, image_seq_length=tokens_per_image)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    text |= dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16)
    text |= dict(sliding_window=64, initializer_range=0.3, max_position_embeddings=512)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    vision |= dict(image_size=image_size, patch_size=14)
    config = Gemma3Config(
        text_config=text | (text_shape or {}),
        vision_config=vision | (vision_shape or {}),
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers initialises the projector to zeros: every image would look alike
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 1.0)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_llava_model(out: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """A random ``LlavaForConditionalGeneration`` (a CLIP tower, a Llama decoder; 28-pixel images as 4
    tokens, ``<image>`` in the template) with its processor at ``out``: an image-text model that
    ``AutoModelForCausalLM`` does not load."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, extra_special_tokens={"image_token": "<image>"})
    template = TEMPLATE.replace("<start_of_image>", "<image>")
    tokenizer.chat_template = template
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=template,
        num_additional_image_tokens=1,  # CLIP's class token, which the "default" strategy drops
    )
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64)
    text |= dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    vision |= dict(num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32)
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).eval().save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_idefics3_model(
    out: Path,
    tokenizer_dir: Path,
    *,
    seed: int = 0,
    text_shape: dict | None = None,
    vision_shape: dict | None = None,
    tile: int = 56,
    longest: int = 112,
    scale_factor: int = 2,
    smolvlm2: bool = False,
) -> Path:
    """A random ``Idefics3ForConditionalGeneration`` (SmolVLM's layout: a SigLIP tower, pixel shuffle, a
    Llama decoder) with its processor at ``out``: an image is resized to ``longest`` pixels on its longer
    side and split into ``tile``-pixel tiles beside a downscaled whole, each ``(tile / 14)² / scale_factor²``
    tokens (by default up to 2 x 2 tiles of 4 tokens), framed by ``<fake_token_around_image>``,
    ``<row_i_col_j>`` and ``<global-img>``; rows' ``pixel_values`` are ``[1, tiles, 3, tile, tile]``.
    ``text_shape`` / ``vision_shape`` override the configs' sizes (benchmarks). ``smolvlm2``: the same as
    ``SmolVLMForConditionalGeneration`` (SmolVLM2's classes), its processor's files written as the hub has
    them (its video half's class needs torchvision)."""
    import json

    from transformers import AutoTokenizer

    if smolvlm2:
        from transformers import SmolVLMConfig as Config
        from transformers import SmolVLMForConditionalGeneration as Model
        from transformers import SmolVLMImageProcessorPil as ImageProcessor
    else:
        from transformers import Idefics3Config as Config
        from transformers import Idefics3ForConditionalGeneration as Model
        from transformers import Idefics3ImageProcessorPil as ImageProcessor
    from transformers import Idefics3Processor

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tiles = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    extra = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *tiles]
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    template = TEMPLATE.replace("<start_of_image>", "<image>")
    tokenizer.chat_template = template
    image_processor = ImageProcessor(
        size={"longest_edge": longest},
        max_image_size={"longest_edge": tile},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14)
    vision |= (vision_shape or {}) | {"image_size": tile}
    per_tile = (tile // vision["patch_size"]) ** 2 // scale_factor**2
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=per_tile, chat_template=template)
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64)
    text |= dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    config = Config(
        text_config=text | (text_shape or {}),
        vision_config=vision,
        image_token_id=processor.image_token_id,
        scale_factor=scale_factor,
    )
    torch.manual_seed(seed)
    Model(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not smolvlm2:
        processor.save_pretrained(out)
        return out
    image_processor.save_pretrained(out)  # SmolVLM2-256M-Video-Instruct's layout
    (out / "processor_config.json").write_text(
        json.dumps({"image_seq_len": per_tile, "processor_class": "SmolVLMProcessor"})
    )
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    video = {"video_processor_type": "SmolVLMVideoProcessor", "num_frames": 64, "fps": 1}
    (out / "video_preprocessor_config.json").write_text(json.dumps(video))
    return out


def image_data_url(seed: int, size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> str:
    """A random RGB image (``size``: width, height) as a base64 ``data:`` URL."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


COLOUR_QUESTION = "What colour is this?"
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def colour_url(rgb: tuple[int, int, int], seed: int) -> str:
    """A ``data:`` URL of a 28 x 28 image of one colour with a little noise (no two alike)."""
    from PIL import Image

    noise = np.random.default_rng(seed).integers(-20, 21, (28, 28, 3))
    pixels = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def image_record(urls: list[str], answer: str, text: str = COLOUR_QUESTION, detail: str | None = None) -> dict:
    parts = [{"type": "text", "text": text}]
    for url in urls:
        parts.append({"type": "image_url", "image_url": {"url": url, **({"detail": detail} if detail else {})}})
    return {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": answer}]}


def colour_records(n: int, seed: int = 0) -> list[dict]:
    names = list(COLOURS)
    return [image_record([colour_url(COLOURS[names[i % 2]], seed + i)], names[i % 2]) for i in range(n)]


def save_qwen2_vl_model(
    out: Path,
    tokenizer_dir: Path,
    *,
    seed: int = 0,
    version: str = "2",
    max_pixels: int = 112 * 112,
    text_shape: dict | None = None,
    vision_shape: dict | None = None,
) -> Path:
    """A random ``Qwen2VLForConditionalGeneration`` (``version="2.5"``: ``Qwen2_5_VL...``, its windowed
    tower; ``"3"``: ``Qwen3VL...``, deepstack features) with its processor at ``out``, saved as the hub's
    are (an image processor, a video processor's config beside it): a ViT over 14-pixel patches, 2 x 2 of
    them merged into one token, images resized to between 56 x 56 pixels and ``max_pixels`` (by default
    112 x 112: 4 to 16 tokens), a decoder with multimodal rotary positions (an image token's position is
    its time, row and column); ``<|vision_start|><|image_pad|><|vision_end|>`` in the template.
    ``text_shape`` / ``vision_shape`` override the configs' sizes (benchmarks)."""
    import json

    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    if version == "2":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model
        from transformers import Qwen2VLProcessor as Processor
    elif version == "2.5":
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        from transformers import Qwen2_5_VLProcessor as Processor
    else:
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model
        from transformers import Qwen3VLProcessor as Processor

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    extra = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    template = TEMPLATE.replace("<start_of_image>", "<|vision_start|><|image_pad|><|vision_end|>")
    tokenizer.chat_template = template
    pixels = dict(min_pixels=56 * 56, max_pixels=max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2)
    image_processor = Qwen2VLImageProcessorPil(**pixels, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    text |= dict(num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    text |= dict(rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, bos_token_id=tokenizer.bos_token_id)
    text |= dict(eos_token_id=tokenizer.eos_token_id)
    vision = dict(depth=2, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2, in_chans=3)
    if version == "2":
        vision |= dict(embed_dim=32, mlp_ratio=2)
    elif version == "2.5":
        vision |= dict(intermediate_size=64, out_hidden_size=32, window_size=56, fullatt_block_indexes=[1])
    else:  # Qwen3-VL: an early block's features also added to the decoder's first layers (deepstack)
        vision |= dict(intermediate_size=64, out_hidden_size=32, num_position_embeddings=64)
        vision |= dict(deepstack_visual_indexes=[0])
        # Qwen3-VL's own head width and rotary sections (transformers' GGUF reader assumes Qwen3's 128).
        rope = {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True}
        text |= dict(head_dim=128, rope_scaling=rope)
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in zip(
            ("vision_start_token_id", "image_token_id", "video_token_id"), extra[0:1] + extra[2:4], strict=True
        )
    }
    config = Config(text_config=text | (text_shape or {}), vision_config=vision | (vision_shape or {}), **ids)
    torch.manual_seed(seed)
    Model(config).eval().save_pretrained(out)
    # The processor's files as the hub has them (its video half's class needs torchvision: written by hand):
    # Qwen2-VL-2B-Instruct's layout (the processor named in preprocessor_config.json, chat_template.json);
    # Qwen2.5-VL's as transformers 5 saves a processor (processor_config.json, chat_template.jinja).
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    video = image_processor.to_dict() | {"video_processor_type": "Qwen2VLVideoProcessor"}
    video.pop("image_processor_type", None)
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    if version == "2":
        reader = json.loads((out / "preprocessor_config.json").read_text())
        reader["processor_class"] = Processor.__name__
        (out / "preprocessor_config.json").write_text(json.dumps(reader, indent=2))
        (out / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    else:
        (out / "processor_config.json").write_text(json.dumps({"processor_class": Processor.__name__}))
        (out / "chat_template.jinja").write_text(template)
    return out
