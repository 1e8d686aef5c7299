"""Images in chat prompts to image-text models (``inference/images.py``): the engine answers as
transformers' own ``generate`` does from the model's processor, for every copy of a sampled request and
after a merge or a pruning; a text-only model, or one trained on Alpaca records, refuses images."""

from __future__ import annotations

import base64
import io

import pytest
import torch

from sqft_service.adapters.lora import build_peft_model
from sqft_service.config import LoraSection
from sqft_service.errors import UserError
from sqft_service.inference.answer import chat_renderer
from sqft_service.inference.engine import InferenceEngine
from sqft_service.inference.images import MAX_PIXELS, load_processor, read_image
from sqft_service.inference.spec import ModelSpec, Sampling
from sqft_service.model_ops import merge, sparsify
from tests.image_text import image_data_url, save_idefics3_model, save_image_text_model, save_qwen2_vl_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory, tokenizer_dir):
    return save_image_text_model(tmp_path_factory.mktemp("tiny-vlm"), tokenizer_dir)


@pytest.fixture(scope="module")
def idefics3_dir(tmp_path_factory, tokenizer_dir):
    return save_idefics3_model(tmp_path_factory.mktemp("tiny-idefics3"), tokenizer_dir)


@pytest.fixture(scope="module")
def smolvlm2_dir(tmp_path_factory, tokenizer_dir):
    return save_idefics3_model(tmp_path_factory.mktemp("tiny-smolvlm2"), tokenizer_dir, smolvlm2=True)


@pytest.fixture(scope="module")
def qwen3_vl_dir(tmp_path_factory, tokenizer_dir):
    return save_qwen2_vl_model(tmp_path_factory.mktemp("tiny-qwen3-vl"), tokenizer_dir, version="3")


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory, tokenizer_dir):
    """Images resized to at most 1024 x 1024 pixels: more than OpenAI's low detail reads."""
    return save_qwen2_vl_model(tmp_path_factory.mktemp("tiny-qwen2-vl"), tokenizer_dir, max_pixels=1024 * 1024)


@pytest.fixture(scope="module")
def engine():
    return InferenceEngine(threads=1, max_queue=0, max_models=2, model_cache_dir=None, device="cpu")


def _messages(url: str, text: str = "What is in this picture?") -> list[dict]:
    """A chat request's messages as the API hands them to the renderer (``Message.as_dict``)."""
    from sqft_service.api.inference.protocol import Message

    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return [Message.model_validate({"role": "user", "content": content}).as_dict()]


def _answer(engine, spec, messages, sampling) -> tuple[int, list]:
    ids, _ = engine.prepare(spec, chat_renderer(spec, messages))
    return len(ids), engine.generate(spec, ids, sampling)


def _transformers(model_dir, url: str, max_new_tokens: int, **options) -> tuple[int, str]:
    """The prompt's length and the greedy answer, by transformers alone from the model's processor
    (``options``: the processor's, e.g. ``do_image_splitting``)."""
    from transformers import AutoModelForImageTextToText

    processor = load_processor(str(model_dir))
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    image = read_image(url)
    turns = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, {"type": "image"}]}]
    text = processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    inputs = processor(
        text=text, images=[image.convert("RGB")], add_special_tokens=False, return_tensors="pt", **options
    )
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None)
    n_prompt = inputs["input_ids"].shape[1]
    return n_prompt, processor.tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True)


def test_an_image_prompt_is_answered_as_transformers_answers_it(vlm_dir, engine):
    spec = ModelSpec("vlm", str(vlm_dir))
    answers = []
    for seed in (1, 2):
        url = image_data_url(seed)
        n_prompt, choices = _answer(engine, spec, _messages(url), Sampling(8, temperature=0.0))
        expected_prompt, expected = _transformers(vlm_dir, url, 8)
        assert n_prompt == expected_prompt  # the image's tokens counted as prompt tokens
        assert choices[0].text == expected and choices[0].completion_tokens == 8
        answers.append(expected)
    assert answers[0] != answers[1]  # the image, not only the text, decides the answer


@pytest.mark.parametrize("family", ["vlm_dir", "idefics3_dir", "smolvlm2_dir", "qwen2_vl_dir", "qwen3_vl_dir"])
def test_image_prompts_generated_together_answer_as_each_alone(family, engine, request):
    """A batch's rows (``generate_together``, batch jobs and eval runs): prompts with one image, two images
    or none, of different lengths, left-padded into one generation, each answered as it is alone. Gemma 3
    reads every image as one block; Idefics3 (SmolVLM) splits images of different shapes into different
    numbers of tiles, padded across the rows; Qwen2-VL and Qwen3-VL read each at its own size, their tokens'
    rotary positions their rows' and columns' (left padding shifts none; Qwen3-VL's deepstack features
    added at each row's own image tokens)."""
    spec = ModelSpec("vlm", str(request.getfixturevalue(family)))
    two = _messages(image_data_url(6, (200, 60)), "Compare:")
    two[0]["content"].append(_messages(image_data_url(7))[0]["content"][1])
    conversations = [
        _messages(image_data_url(5)),
        [{"role": "user", "content": "No picture, a longer question than the others have."}],
        two,
        _messages(image_data_url(8, (200, 60)), "Short?"),
    ]
    prompts = [engine.prepare(spec, chat_renderer(spec, m))[0] for m in conversations]
    samplings = [Sampling(6, temperature=0.0) for _ in prompts]
    together = engine.generate_together(spec, prompts, samplings)
    alone = [engine.generate(spec, ids, Sampling(6, temperature=0.0))[0] for ids in prompts]
    assert [c.text for c in together] == [c.text for c in alone]
    assert len({c.text for c in alone}) > 1  # the rows differ: each kept its own image


@pytest.mark.parametrize("family", ["idefics3_dir", "smolvlm2_dir"])
def test_an_idefics3_image_is_read_in_tiles_and_whole_at_low_detail(family, engine, request):
    """Idefics3 (SmolVLM) and SmolVLM2 split an image into tiles beside a downscaled whole; ``detail: low``
    reads the whole only (OpenAI's low detail): each as transformers answers with the processor set so."""
    idefics3_dir = request.getfixturevalue(family)
    spec = ModelSpec("smolvlm", str(idefics3_dir))
    url = image_data_url(9)
    low = _messages(url)
    low[0]["content"][1]["detail"] = "low"  # as the API hands an image part on (Message.as_dict)
    n_tiles, tiled = _answer(engine, spec, _messages(url), Sampling(6, temperature=0.0))
    n_whole, whole = _answer(engine, spec, low, Sampling(6, temperature=0.0))
    assert (n_tiles, tiled[0].text) == _transformers(idefics3_dir, url, 6)
    assert (n_whole, whole[0].text) == _transformers(idefics3_dir, url, 6, do_image_splitting=False)
    assert n_tiles - n_whole >= 4 * 4  # four tiles of 4 image tokens more


def test_a_qwen2_vl_image_is_read_within_512_x_512_pixels_at_low_detail(qwen2_vl_dir, engine):
    """Qwen2-VL reads an image at up to its processor's pixel budget (high detail already: ``high`` is
    taken); ``detail: low`` reads it within 512 x 512 pixels, as OpenAI's low detail does: each as
    transformers answers with the processor set so."""
    spec = ModelSpec("qwen2-vl", str(qwen2_vl_dir))
    url = image_data_url(9, (700, 600))
    low, high = _messages(url), _messages(url)
    low[0]["content"][1]["detail"], high[0]["content"][1]["detail"] = "low", "high"
    n_full, full = _answer(engine, spec, _messages(url), Sampling(6, temperature=0.0))
    n_high, sharp = _answer(engine, spec, high, Sampling(6, temperature=0.0))
    n_low, small = _answer(engine, spec, low, Sampling(6, temperature=0.0))
    assert (n_full, full[0].text) == (n_high, sharp[0].text) == _transformers(qwen2_vl_dir, url, 6)
    budget = {"shortest_edge": 56 * 56, "longest_edge": 512 * 512}
    assert (n_low, small[0].text) == _transformers(qwen2_vl_dir, url, 6, size=budget)
    # 700 x 600 pixels are 25 x 21 merged patches of 28 pixels; within 512 x 512 pixels, 532 x 448: 19 x 16.
    assert n_full - n_low == 25 * 21 - 19 * 16


def test_every_copy_of_a_sampled_request_sees_its_image(vlm_dir, engine):
    """n rows drawn from one image prompt: each row's image inputs are its own copy (a cold temperature
    makes every draw the greedy token, so each row must be the greedy answer)."""
    spec = ModelSpec("vlm", str(vlm_dir))
    messages = _messages(image_data_url(3))
    _, greedy = _answer(engine, spec, messages, Sampling(8, temperature=0.0))
    _, drawn = _answer(engine, spec, messages, Sampling(8, temperature=1e-4, n=3, seed=5))
    assert [c.text for c in drawn] == [greedy[0].text] * 3


def test_text_only_and_alpaca_trained_models_refuse_images(vlm_dir, tiny_model_dir, engine):
    messages = _messages(image_data_url(4))
    with pytest.raises(UserError, match="reads text only") as refused:
        _answer(engine, ModelSpec("tiny", str(tiny_model_dir)), messages, Sampling(4, temperature=0.0))
    assert refused.value.param == "messages"
    alpaca = ModelSpec("ft", str(vlm_dir), data_format="alpaca")
    with pytest.raises(UserError, match="Alpaca records"):
        _answer(engine, alpaca, messages, Sampling(4, temperature=0.0))


def test_a_merged_or_pruned_image_text_model_takes_images_as_its_base(vlm_dir, engine, tmp_path):
    """Merging an adapter and sparsifying save the processor with the weights: the new models answer
    image prompts (as transformers does from their directories)."""
    from transformers import Gemma3ForConditionalGeneration

    base = Gemma3ForConditionalGeneration.from_pretrained(vlm_dir, dtype=torch.float32)
    peft_model, _ = build_peft_model(base, LoraSection(r=4, lora_alpha=8, lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a trained-looking update: the merged answer is not the base's
    peft_model.save_pretrained(tmp_path / "adapter")
    merge(str(vlm_dir), tmp_path / "adapter", tmp_path / "merged", sparse=False)
    sparsify(str(vlm_dir), tmp_path / "pruned", method="magnitude", sparsity=0.5)
    url = image_data_url(5)
    original = Gemma3ForConditionalGeneration.from_pretrained(vlm_dir, dtype=torch.float32).state_dict()
    for name in ("merged", "pruned"):
        assert (tmp_path / name / "processor_config.json").is_file()
        changed = Gemma3ForConditionalGeneration.from_pretrained(tmp_path / name, dtype=torch.float32)
        q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(changed.state_dict()[q_proj], original[q_proj])
        _, choices = _answer(
            engine, ModelSpec(name, str(tmp_path / name)), _messages(url), Sampling(8, temperature=0.0)
        )
        assert choices[0].text == _transformers(tmp_path / name, url, 8)[1]


def _png(size: tuple[int, int], mode: str = "RGB", fmt: str = "PNG", **save) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=fmt, **save)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def _cut_png(n: int) -> str:
    """A PNG's first ``n`` bytes: a header PIL starts reading and then cannot finish."""
    raw = base64.b64decode(_png((4, 4)).split(",")[1])
    return "data:image/png;base64," + base64.b64encode(raw[:n]).decode()


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://example.com/cat.png", "not 'https' URLs"),
        ("data:image/png,rawbytes", "data:image/<format>;base64"),
        ("data:image/png;base64,not*base64", "not valid base64"),
        ("data:image/png;base64," + base64.b64encode(b"plain text, no image").decode(), "not an image"),
        (_png((4, 4), fmt="BMP"), "BMP images are not taken"),
        (_cut_png(20), "could not be read: Truncated File Read"),
        (_png((8000, 6000), mode="1"), f"over the limit of {MAX_PIXELS:,} pixels"),
    ],
)
def test_an_image_that_cannot_be_read_is_refused_saying_why(url, words):
    with pytest.raises(ValueError, match=words):
        read_image(url)


def test_an_animated_gif_is_refused_and_a_still_one_read():
    from PIL import Image

    frames = [Image.new("RGB", (4, 4), color) for color in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match="animated"):
        read_image("data:image/gif;base64," + base64.b64encode(buffer.getvalue()).decode())
    assert read_image(_png((4, 4), fmt="GIF")).size == (4, 4)
