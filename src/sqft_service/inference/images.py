"""Images in chat prompts, for image-text models (Gemma 3 4B and up, LLaVA, Idefics3/SmolVLM(2), Qwen2-VL,
Qwen2.5-VL, Qwen3-VL; fine-tuned on text or not): OpenAI's ``image_url`` content parts, read from ``data:`` URLs.

* Only ``data:`` URLs (base64): a self-hosted service that fetched any ``http(s)`` URL a caller named
  would reach, from the host, whatever the host reaches (an SSRF); the caller sends the bytes instead.
* PNG, JPEG, WEBP and non-animated GIF, as OpenAI takes; the header is read when the request is
  validated (a bad image is a 400 naming its part before any model work), the pixels on the engine's
  worker, by the model's own processor (``AutoProcessor``: its resizing, normalisation and image tokens,
  as the model was trained with).
* A prompt with images is its token ids (the processor's image tokens in them, counted as prompt
  tokens, as OpenAI counts image tokens) carrying the processor's other model inputs (``pixel_values``,
  ``token_type_ids``) to ``generate()``: :class:`Prompt`.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

from ..errors import UserError

FORMATS = {"PNG", "JPEG", "WEBP", "GIF"}
MAX_IMAGES = 16  # per request
# Beyond this many pixels an image is refused (a small file can claim a huge canvas): the processor
# resizes to the model's own size (896 x 896 for Gemma 3), so nothing is lost by asking for less.
MAX_PIXELS = 40_000_000
_DATA_URL = re.compile(r"data:(image/[a-zA-Z0-9.+-]+)?(;[^,;]*)*;base64,", re.ASCII)


class Prompt(list):
    """A prompt's token ids, and the other inputs its images give the model (``pixel_values``, ...)."""

    def __init__(self, ids: list[int], media: dict[str, Any]) -> None:
        super().__init__(ids)
        self.media = media


def media_of(ids: list[int]) -> dict[str, Any] | None:
    return getattr(ids, "media", None)


def read_image(url: str) -> Any:
    """The image of a ``data:`` URL (a PIL image, header read), or a ValueError saying what is wrong."""
    from PIL import Image, UnidentifiedImageError

    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else url[:16]
        raise ValueError(
            f"this service takes images as base64 `data:` URLs (data:image/png;base64,...), not {scheme!r} URLs: "
            "it fetches nothing on a caller's behalf"
        )
    header = _DATA_URL.match(url)
    if header is None:
        raise ValueError("a `data:` URL of an image is `data:image/<format>;base64,<data>`")
    try:
        data = base64.b64decode(url[header.end() :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the `data:` URL's data is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(data))
        animated = getattr(image, "is_animated", False)
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise ValueError("the `data:` URL's data is not an image this service reads (PNG, JPEG, WEBP, GIF)") from None
    except Exception as exc:  # a damaged header: PIL raises many kinds (SyntaxError, struct.error, ...)
        raise ValueError(f"the `data:` URL's image could not be read: {exc}") from None
    if image.format not in FORMATS:
        raise ValueError(f"{image.format} images are not taken: send PNG, JPEG, WEBP or non-animated GIF")
    if animated:
        raise ValueError("animated images are not taken: send one frame")
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ValueError(f"the image is {width} x {height} pixels, over the limit of {MAX_PIXELS:,} pixels")
    return image


def stack_inputs(tensors: list[Any]) -> Any:
    """Per-image inputs of several prompts (or training examples) as one batch: concatenated along the first
    dimension. Where their other dimensions differ (Idefics3/SmolVLM: ``pixel_values`` of ``[1, tiles, 3,
    H, W]`` a row, as many tiles as the row's images split into) they are padded with zeros first, as the
    processor pads one call's rows: the model drops all-zero tiles and masks padded pixels
    (``pixel_attention_mask``, False where padded)."""
    import torch

    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    if any(list(t.shape[1:]) != shape for t in tensors):
        padded = []
        for t in tensors:
            out = t.new_zeros((t.shape[0], *shape))
            out[(slice(None), *(slice(0, n) for n in t.shape[1:]))] = t
            padded.append(out)
        tensors = padded
    return torch.cat(tensors)


# What a processor is saved as beside a model's weights (AutoProcessor's files), tokenizer aside.
PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


def load_processor(source: str, **kwargs: Any) -> Any:
    """An image-text model's processor (``AutoProcessor``), or, where transformers builds it only with its
    video half and that needs torchvision (Qwen2-VL, Qwen2.5-VL, SmolVLM2: not installed here, images
    only), the same processor class without it (``without_video``). Errors as ``AutoProcessor`` raises them."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source, **kwargs)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise
        return _without_video(source, exc, **kwargs)


def _without_video(source: str, exc: ImportError, **kwargs: Any) -> Any:
    import inspect
    from pathlib import Path
    from types import SimpleNamespace

    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    from ..auto_hparams import json_object as _json

    root = Path(source)
    saved = _json(root / "processor_config.json")  # transformers 5's; the hub's older ones name it beside
    name = saved.get("processor_class") or _json(root / "preprocessor_config.json").get("processor_class")
    name = name or PROCESSOR_MAPPING_NAMES.get(_json(root / "config.json").get("model_type"))
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None or "video_processor" not in cls.get_attributes():
        raise exc
    video_settings = _json(root / "video_preprocessor_config.json")

    class ImageOnly(cls):  # the class's own tokenization and image tokens; a prompt's videos are refused
        # The video half's saved settings, which some processors read to render any chat (SmolVLM2's
        # frames and fps); nothing here reads a video.
        video_processor = SimpleNamespace(**(saved.get("video_processor") or video_settings))
        without_video = True

        @classmethod
        def get_attributes(klass) -> list[str]:
            return [attribute for attribute in super().get_attributes() if attribute != "video_processor"]

    ImageOnly.__name__ = ImageOnly.__qualname__ = name
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    images = AutoImageProcessor.from_pretrained(source, **kwargs)  # the PIL one without torchvision
    template = _json(root / "chat_template.json").get("chat_template")
    if template is None and (root / "chat_template.jinja").is_file():
        template = (root / "chat_template.jinja").read_text()
    # The processor's own saved settings (SmolVLM's image_seq_len), as AutoProcessor passes them.
    takes = inspect.signature(cls.__init__).parameters
    settings = {k: v for k, v in saved.items() if k in takes and k not in cls.get_attributes() and k != "chat_template"}
    template = template or tokenizer.chat_template
    return ImageOnly(images, tokenizer, video_processor=None, chat_template=template, **settings)


def takes_images(model: Any, processor: Any) -> bool:
    config = getattr(model, "config", None)
    return (
        processor is not None
        and getattr(processor, "image_processor", None) is not None
        and (getattr(config, "vision_config", None) is not None)
    )


NO_HIGH_DETAIL = "`detail: high`: this model's processor has no high-detail mode"
# OpenAI's low detail reads an image within 512 x 512 pixels; so do processors that resize to a pixel budget.
LOW_DETAIL_PIXELS = 512 * 512


def detail_options(processor: Any, details: Any) -> dict[str, Any]:
    """The processor options a prompt's images are read with (``details``: each image's ``detail``), alike
    for serving and training. One processor call reads them all, so one setting holds for all of them:

    * Gemma 3: ``detail: high`` on any one turns on pan-and-scan crops, beside the whole image.
    * Idefics3 (SmolVLM), which splits an image into tiles beside a downscaled whole by default:
      ``detail: low`` on every one reads each as the downscaled whole only (OpenAI's low detail: one
      block of tokens an image).
    * Qwen2-VL, Qwen2.5-VL and Qwen3-VL, which resize an image to a pixel budget (by default up to 12.8 M pixels,
      16,384 tokens) and read it at that resolution (high detail already): ``detail: low`` on every one
      reads each within :data:`LOW_DETAIL_PIXELS` (at most 334 tokens), as OpenAI's low detail does.
    * A ValueError (:data:`NO_HIGH_DETAIL`) for ``high`` where the processor has no high-detail mode."""
    details = list(details)
    reader = processor.image_processor
    budget = _pixel_budget(reader)
    if details and all(detail == "low" for detail in details):
        if getattr(reader, "do_image_splitting", False):
            return {"do_image_splitting": False}
        if budget is not None and budget[1] > LOW_DETAIL_PIXELS:
            low = min(budget[0], LOW_DETAIL_PIXELS)
            return {"size": {"shortest_edge": low, "longest_edge": LOW_DETAIL_PIXELS}}
    if not any(detail == "high" for detail in details):
        return {}
    if hasattr(reader, "do_pan_and_scan"):
        return {"do_pan_and_scan": True}
    if getattr(reader, "do_image_splitting", False) or budget is not None:
        return {}  # tiles, or full resolution, already
    raise ValueError(NO_HIGH_DETAIL)


def _pixel_budget(reader: Any) -> tuple[int, int] | None:
    """``(least, most)`` pixels an image is resized to, for a processor that resizes to a pixel budget
    (Qwen2-VL's: its ``size`` edges are pixel counts, patches merged ``merge_size`` a side); else None."""
    size = getattr(reader, "size", None)
    least, most = (getattr(size, key, None) for key in ("shortest_edge", "longest_edge"))
    if getattr(reader, "merge_size", None) is None or not isinstance(most, int):
        return None
    return (least if isinstance(least, int) else 0), most


def image_prompt(processor: Any, turns: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> Prompt:
    """``turns`` (content parts ``{"type": "text"|"image", ...}``) rendered and tokenized by the processor."""
    import torch

    parts = [part for turn in turns if isinstance(turn["content"], list) for part in turn["content"]]
    images = [part["image"] for part in parts if part["type"] == "image"]
    try:
        options = detail_options(processor, (part.get("detail") for part in parts if part["type"] == "image"))
    except ValueError as exc:
        raise UserError(str(exc), param="messages") from None
    try:
        for image in images:
            image.load()  # the pixels now: a truncated file fails here, not inside the processor
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"an image of `messages` could not be decoded: {exc}", param="messages") from None
    text = processor.apply_chat_template(turns, tools=tools, tokenize=False, add_generation_prompt=True)
    # The template wrote the BOS where the model wants one, as for text prompts (render.py).
    rgb = [image.convert("RGB") for image in images]
    inputs = processor(text=text, images=rgb, add_special_tokens=False, return_tensors="pt", **options)
    ids = inputs.pop("input_ids")[0].tolist()
    inputs.pop("attention_mask", None)
    return Prompt(ids, {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})
