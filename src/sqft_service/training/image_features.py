"""Image features computed once per job, not once per step (vision fine-tuning, ``training/images.py``).

Adapters train the text decoder; the vision tower and the projector stay frozen. An image's features (the
projector's output, one vector per image token) are then the same at every step, so the job computes them
once, before training, and each batch hands them to the model body as transformers' ``mm_encoder_outputs``
(the hook ``generate`` uses to encode a prompt's images once) instead of pixels: no image is decoded,
resized or run through the tower again, epoch after epoch. They are kept on the host, in the dtype the
tower computes in (Gemma 3 4B: 256 x 2,560 values, 1.3 MB an image in bf16, against 9.2 MB of fp32 pixels),
up to :data:`CACHE_BYTES`; beyond that, or for a model body without the hook, batches read their pixels
as before. ``tests/unit/test_image_training.py`` checks that a batch scores the same either way.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from ..inference.images import stack_inputs
from .loss import causal_lm_of
from .tokenization import TokenizedExample

CACHE_BYTES = 4 * 2**30  # host memory the cached features of a job's examples may take
IMAGES_PER_PASS = 16  # images (or tiles) through the tower at once while caching


def image_body(model: torch.nn.Module) -> Any:
    """The image-text model's body (``Gemma3Model``) when it takes ``mm_encoder_outputs``, else None."""
    body = causal_lm_of(model).base_model
    takes = "mm_encoder_outputs" in inspect.signature(body.forward).parameters
    return body if takes and callable(getattr(body, "get_image_features", None)) else None


def encoder_outputs(features: torch.Tensor, as_list: bool = False) -> dict[str, Any]:
    """Cached features (``[image tokens, hidden]``, in token order; ``[1 + levels, image tokens, hidden]``
    with Qwen3-VL's deepstack levels after the pooled ones) as the model body's ``mm_encoder_outputs``: one
    tensor (Gemma 3), or a one-block list where its tower gives a list (``as_list``: LLaVA, Idefics3 and
    Qwen concatenate the blocks)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    pooled, deep = (features[0], features[1:]) if features.dim() == 3 else (features, None)
    out = BaseModelOutputWithPooling(pooler_output=[pooled] if as_list else pooled)
    if deep is not None:  # a list of levels, each a list of blocks, as Qwen3-VL's tower gives them
        out.deepstack_features = [[level] for level in deep]
    return {"image": out}


@torch.no_grad()
def cache_image_features(
    model: torch.nn.Module,
    images: Any,
    examples: Sequence[TokenizedExample],
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    budget: int | None = None,
) -> tuple[int, int] | str:
    """Give each example with images its ``image_features``; ``(images, bytes)`` cached, or why not
    (``budget``: bytes they may take, by default :data:`CACHE_BYTES`)."""
    budget = CACHE_BYTES if budget is None else budget
    body = image_body(model)
    if body is None or "pixel_values" not in images.media_keys:
        return "this model's body takes no precomputed image features"
    with_images = [ex for ex in examples if ex.images]
    config = causal_lm_of(model).config
    hidden = config.get_text_config().hidden_size
    levels = 1 + len(getattr(getattr(config, "vision_config", None), "deepstack_visual_indexes", None) or ())
    rows = levels * sum(sum(ex.image_tokens or ()) for ex in with_images)
    dtype = torch.get_autocast_dtype(device.type) if _autocast_on(autocast, device) else torch.float32
    size = rows * hidden * torch.finfo(dtype).bits // 8
    if size > budget:
        return f"their features would take {size / 2**30:.1f} GiB, over the {budget / 2**30:.1f} GiB kept"
    was_training = model.training
    model.eval()
    try:
        done = 0
        while done < len(with_images):
            chunk, n = [], 0
            while done + len(chunk) < len(with_images) and (not chunk or n < IMAGES_PER_PASS):
                chunk.append(with_images[done + len(chunk)])
                n += len(chunk[-1].images)
            inputs = images.per_example(chunk)  # decoded side by side (ImageInputs' thread pool)
            for part in _tower_passes(inputs):
                if why := _features(body, images, chunk[part], inputs[part], device, autocast):
                    _forget(with_images)
                    return why
            done += len(chunk)
    finally:
        model.train(was_training)
    return sum(len(ex.images) for ex in with_images), sum(
        ex.image_features.numel() * ex.image_features.element_size() for ex in with_images
    )


def _features(
    body: Any,
    images: Any,
    examples: Sequence[TokenizedExample],
    inputs: list[dict[str, torch.Tensor]],
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
) -> str | None:
    """Give ``examples`` their features from one pass of the tower over their ``inputs``; None, or why not."""
    batch = {key: stack_inputs([x[key] for x in inputs]).to(device) for key in inputs[0]}
    with autocast():
        output = body.get_image_features(**batch)
    features = output.pooler_output
    if isinstance(features, (list, tuple)):  # LLaVA a block per image, Idefics3 per row: a list back
        images.features_as_list = True
    # In image-token order, one row per token, whatever blocks the tower gives them in (Gemma 3 an image's
    # or crop's, LLaVA an image's, Idefics3 a row's tiles): split by the examples' image tokens. Qwen3-VL's
    # deepstack levels (features of earlier blocks, added to the decoder's first layers) go beside them.
    levels = [_flat(features)] + [_flat(level) for level in getattr(output, "deepstack_features", None) or ()]
    need = [sum(ex.image_tokens or ()) for ex in examples]
    if any(level.shape[0] != sum(need) for level in levels):  # laid out otherwise (per patch, merged later)
        return "the tower's features do not match the image tokens one for one"
    stacked = torch.stack(levels) if len(levels) > 1 else levels[0]
    for ex, part, x in zip(examples, stacked.split(need, dim=-2), inputs, strict=True):
        ex.image_features = part.to("cpu", copy=True)
        # What the body still reads beside the features: Qwen2-VL's patch grid an image (rotary positions).
        ex.image_layout = {key: value for key, value in x.items() if key.endswith("_grid_thw")} or None
    return None


def _flat(features: Any) -> torch.Tensor:
    blocks = features if isinstance(features, (list, tuple)) else [features]
    return torch.cat([f.reshape(-1, f.shape[-1]) for f in blocks])


def _tower_passes(inputs: list[dict[str, torch.Tensor]]) -> list[slice]:
    """Consecutive examples whose images the tower sees together: up to :data:`IMAGES_PER_PASS` images
    and crops (``pixel_values`` of ``[n, 3, H, W]``), tiles (Idefics3's ``[1, tiles, 3, H, W]``) or images
    as rows of patches (Qwen2-VL's, an ``image_grid_thw`` row each), and an example with more alone."""
    passes, start, blocks = [], 0, 0
    for end, example in enumerate(inputs):
        grid = example.get("image_grid_thw")
        n = len(grid) if grid is not None else example["pixel_values"].shape[:-3].numel()
        if end > start and blocks + n > IMAGES_PER_PASS:
            passes.append(slice(start, end))
            start, blocks = end, 0
        blocks += n
    return [*passes, slice(start, len(inputs))] if inputs else passes


def _autocast_on(autocast: Callable[[], AbstractContextManager], device: torch.device) -> bool:
    with autocast():
        return torch.is_autocast_enabled(device.type)


def _forget(examples: Sequence[TokenizedExample]) -> None:
    for ex in examples:
        ex.image_features = ex.image_layout = None
