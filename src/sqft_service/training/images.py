"""Training on images (OpenAI's vision fine-tuning): chat records whose user messages hold ``image_url``
parts, for image-text models (Gemma 3 4B and up, LLaVA, Idefics3/SmolVLM, Qwen2-VL, Qwen2.5-VL, Qwen3-VL), read by
the model's own processor as serving reads them (``inference/images.py``).

* Tokenization: a chat template writes an image part as the processor's placeholder (Gemma 3's
  ``<start_of_image>``); the pieces holding placeholders are tokenized by the processor with their images,
  which expands each into the image's tokens (Gemma 3's pan-and-scan crops with ``detail: "high"``,
  Idefics3's tiles unless every image is ``detail: "low"``), so a
  training sequence holds exactly the tokens a served prompt holds. The image tokens take no loss.
* Batches: an example keeps its images' URLs, not their pixels (an 896 x 896 image is 9.6 MB of fp32); the
  collator decodes them and runs the processor's image half per batch (:meth:`ImageInputs.model_inputs`;
  Idefics3's rows of tiles zero-padded to the batch's most, as the processor pads them).
* The model: the batch's image inputs go to the image-text model's body (``base_model``), which puts
  the vision tower's features where the image tokens are and, for Gemma 3, lets an image's tokens see
  each other (``token_type_ids``), for Qwen2-VL gives them rotary positions from their image's patch
  grid (``mm_token_type_ids``, ``image_grid_thw``); adapters train the text decoder only
  (``adapters/lora.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..inference.images import detail_options, read_image, stack_inputs
from .records import DataValidationError

if TYPE_CHECKING:
    import torch

    from .tokenization import TokenizedExample

# A flag per token, 1 on image tokens, as the model bodies that read one name it (Gemma 3, Qwen-VL).
_TOKEN_TYPES = ("token_type_ids", "mm_token_type_ids")
# Per-token inputs the collator builds itself; the processor's other inputs are per image.
_TEXT_INPUTS = {"input_ids", "attention_mask", *_TOKEN_TYPES}


class ImageInputs:
    """A model's processor as training uses it: tokenizing pieces with images, and a batch's image inputs."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.placeholder: str = processor.image_token  # what a chat template writes for an image part
        names = set(getattr(processor, "model_input_names", ()))
        # A flag per token, 1 on image tokens, where the model body reads one: Gemma 3's image tokens see
        # one another (``token_type_ids``, a bidirectional block), Qwen2-VL's take their rotary positions
        # from their image's grid (``mm_token_type_ids``); None: a causal model that finds them by id.
        self.token_types = next((k for k in _TOKEN_TYPES if k in names), None)
        self.media_keys = names - _TEXT_INPUTS - set(getattr(processor, "unused_input_names", ()))
        self.workers = min(8, os.cpu_count() or 1)
        self.features_as_list = False  # the model body takes cached features as a block per image (LLaVA)
        self._pool: ThreadPoolExecutor | None = None

    def encode(
        self, text: str, images: Sequence[dict[str, Any]], options: dict[str, Any]
    ) -> tuple[list[int], list[int]]:
        """``text``'s token ids with its ``images`` (``image_url`` objects) expanded (``options``: the
        record's :meth:`options`), and a flag per token: 1 where an image's features go."""
        pictures = [read_image(image["url"]).convert("RGB") for image in images]
        try:
            out = self.processor(text=text, images=pictures or None, add_special_tokens=False, **options)
        except ValueError as exc:  # e.g. a message that writes the placeholder itself
            raise DataValidationError(f"a message's images could not be placed in its text: {exc}") from None
        ids = list(out["input_ids"][0])
        kinds = next((out[key] for key in _TOKEN_TYPES if out.get(key) is not None), None)
        if kinds is None:
            image_id = getattr(self.processor, "image_token_id", None)
            return ids, [int(i == image_id) for i in ids]
        return ids, [int(k == 1) for k in kinds[0]]

    def options(self, images: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """What a record's images are read with, as serving reads a prompt's (``images.detail_options``)."""
        try:
            return detail_options(self.processor, (image.get("detail") for image in images))
        except ValueError as exc:
            raise DataValidationError(str(exc)) from None

    def model_inputs(self, examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
        """The image inputs of a batch's examples (their images in order), e.g. ``pixel_values``."""
        outputs = self.per_example(examples)
        keys = outputs[0].keys() if outputs else ()
        return {key: stack_inputs([out[key] for out in outputs]) for key in keys}

    def per_example(self, examples: Sequence[TokenizedExample]) -> list[dict[str, torch.Tensor]]:
        """The image inputs of each example that has images, in order."""

        def process(ex: TokenizedExample) -> dict[str, Any]:
            pictures = [read_image(image["url"]).convert("RGB") for image in ex.images]
            out = self.processor.image_processor(pictures, return_tensors="pt", **ex.image_options)
            return {key: out[key] for key in self.media_keys & set(out)}

        with_images = [ex for ex in examples if ex.images]
        # Decoding and resizing release the GIL (PIL, numpy): the examples' images are read side by side.
        if len(with_images) > 1 and self.workers > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sqft-images")
            return list(self._pool.map(process, with_images))
        return [process(ex) for ex in with_images]


def text_input_grads_only(model: torch.nn.Module) -> int:
    """Drop the hooks that make an image-text model's vision tower's input embeddings require grad; the
    hooks removed. Gradient checkpointing needs the text embeddings' output to require grad, and
    transformers (``gradient_checkpointing_enable``) and peft (for a checkpointed base) hook every
    sub-model's embeddings for it, the tower's too: a batch that reads pixels then ran backward through
    the frozen tower (and recomputed it), though no weight there trains. Their
    ``disable_input_require_grads`` forgets the handles of earlier calls, so the hooks are found by name."""
    from transformers import PreTrainedModel

    text = model.get_input_embeddings()
    removed = 0
    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        try:
            embeddings = module.get_input_embeddings()
        except NotImplementedError:
            continue
        if embeddings is None or embeddings is text:
            continue
        for key, hook in list(embeddings._forward_hooks.items()):
            if getattr(hook, "__name__", "").startswith("make_inputs_require_grad"):
                del embeddings._forward_hooks[key]
                removed += 1
    return removed


def load_image_inputs(model_dir: str, *, trust_remote_code: bool, token: str | None) -> ImageInputs:
    """The processor of an image-text model's directory; a DataValidationError when it reads text only."""
    from transformers import AutoConfig

    from ..inference.images import load_processor

    why = "reads text only"
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code, token=token)
        if getattr(config, "vision_config", None) is not None:
            processor = load_processor(model_dir, trust_remote_code=trust_remote_code, token=token)
            if getattr(processor, "image_processor", None) is not None and hasattr(processor, "image_token"):
                return ImageInputs(processor)
            why = "has no image processor saved beside its weights"
    except (OSError, ValueError, TypeError, ImportError) as exc:
        why = f"has no image processor ({exc})"
    raise DataValidationError(
        f"the training data has images, and this model {why}: train an image-text model (such as Gemma 3 4B) "
        "on it, or send text",
        param="training_file",
    )
