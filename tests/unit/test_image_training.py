"""Training on images (``training/images.py``, OpenAI's vision fine-tuning): chat records with ``image_url``
parts are validated with the line named, tokenized as the model's processor tokenizes the conversation,
batched with their pixels, scored exactly as transformers scores them, and trained until the model answers
what only the image tells."""

from __future__ import annotations

import base64
from functools import partial
from pathlib import Path

import pytest
import torch

from sqft_service import auto_hparams
from sqft_service.config import DatasetSection, LoraSection
from sqft_service.evaluation import run_evaluation
from sqft_service.inference.images import MAX_IMAGES, load_processor, read_image
from sqft_service.jobs.kinds import EvalCandidate, EvaluateParams
from sqft_service.training import image_features
from sqft_service.training.batching import Collator
from sqft_service.training.device import device_batch
from sqft_service.training.events import MemorySink
from sqft_service.training.image_features import cache_image_features
from sqft_service.training.images import load_image_inputs
from sqft_service.training.loss import causal_lm_loss
from sqft_service.training.recipe import run_training
from sqft_service.training.records import DataValidationError, inspect_training_file
from sqft_service.training.tokenization import IGNORE_INDEX, tokenize_records
from tests.helpers import write_jsonl
from tests.image_text import (
    COLOURS,
    colour_records,
    colour_url,
    image_data_url,
    image_record,
    save_idefics3_model,
    save_image_text_model,
    save_llava_model,
    save_qwen2_vl_model,
)
from tests.unit.test_recipe import losses, make_cfg, model_dir, sqft_lora  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory, tokenizer_dir):
    return save_image_text_model(tmp_path_factory.mktemp("tiny-vlm"), tokenizer_dir)


def test_image_records_validate_naming_the_line_and_are_counted(tmp_path):
    url = image_data_url(1)
    good = [
        image_record([url], "a picture"),
        image_record([url, url], "two"),
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Say hi"}]},
                {"role": "assistant", "content": "hi"},
            ]
        },
    ]
    stats = inspect_training_file(write_jsonl(tmp_path / "good.jsonl", good))
    assert (stats.format, stats.n_records, stats.n_images) == ("chat", 3, 3)

    def error(record: dict) -> str:
        with pytest.raises(DataValidationError) as caught:
            inspect_training_file(write_jsonl(tmp_path / "bad.jsonl", [good[0], record]))
        assert caught.value.line == 2
        return caught.value.message

    web = image_record(["https://example.com/cat.png"], "a cat")
    assert "messages[0].content[1].image_url.url" in error(web) and "data:" in error(web)
    assert "not an image" in error(image_record(["data:image/png;base64," + base64.b64encode(b"text").decode()], "x"))
    assert "detail must be one of" in error(image_record([url], "x", detail="ultra"))
    assert "over the limit of 16" in error(image_record([url] * (MAX_IMAGES + 1), "x"))
    in_reply = {
        "messages": [
            image_record([url], "x")["messages"][0],
            {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": url}}]},
        ]
    }
    assert "images are taken in user messages, not assistant ones" in error(in_reply)
    odd = {"messages": [{"role": "user", "content": [{"type": "audio", "data": "x"}]}, good[0]["messages"][1]]}
    assert "content[0].type must be 'text' or 'image_url'" in error(odd)
    # Only supervised chat records take images: a reinforcement prompt with one is refused.
    prompt = {"messages": [image_record([url], "x")["messages"][0]]}
    with pytest.raises(DataValidationError, match="images are taken in chat records"):
        inspect_training_file(write_jsonl(tmp_path / "prompts.jsonl", [prompt]))


def test_an_image_record_is_tokenized_as_the_processor_tokenizes_the_conversation(vlm_dir):
    images = load_image_inputs(str(vlm_dir), trust_remote_code=False, token=None)
    processor = images.processor
    urls = [image_data_url(2), image_data_url(3, size=(20, 50))]
    record = image_record(urls, "Two pictures.", text="Compare these:")
    record["messages"].insert(0, {"role": "system", "content": [{"type": "text", "text": "Be brief."}]})
    cfg = DatasetSection()
    (example,) = tokenize_records([record], processor.tokenizer, cfg, images=images).examples

    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Compare these:"}, {"type": "image"}, {"type": "image"}]},
        {"role": "assistant", "content": "Two pictures."},
    ]
    text = processor.apply_chat_template(turns, tokenize=False)
    pictures = [read_image(u).convert("RGB") for u in urls]
    whole = processor(text=text, images=pictures, add_special_tokens=False)
    assert example.input_ids == whole["input_ids"][0][: len(example.input_ids)]
    assert example.image_tokens == whole["token_type_ids"][0][: len(example.input_ids)]
    assert sum(example.image_tokens) == 2 * 4 and example.images == tuple(
        p["image_url"] for p in record["messages"][1]["content"][1:]
    )
    reply = processor.tokenizer("Two pictures.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert [t for t in example.labels if t != IGNORE_INDEX] == reply  # the image tokens take no loss

    # Truncation that would cut into an image drops the record rather than train it half-seen.
    short = DatasetSection(max_source_length=12, max_length=24)
    cut = tokenize_records([record], processor.tokenizer, short, images=images)
    assert (len(cut), cut.n_dropped, cut.n_images_cut) == (0, 1, 1)
    with pytest.raises(DataValidationError, match="reads text only"):
        tokenize_records([record], processor.tokenizer, cfg)


def test_a_batch_with_images_scores_as_transformers_scores_it(vlm_dir):
    from transformers import Gemma3ForConditionalGeneration

    images = load_image_inputs(str(vlm_dir), trust_remote_code=False, token=None)
    tokenizer = images.processor.tokenizer
    records = [
        image_record([colour_url(COLOURS["red"], 1)], "red"),
        image_record([image_data_url(4), image_data_url(5)], "Two different pictures, side by side."),
        {"messages": [{"role": "user", "content": "No picture here."}, {"role": "assistant", "content": "Fine."}]},
    ]
    examples = tokenize_records(records, tokenizer, DatasetSection(), images=images).examples
    batch = Collator.from_config(tokenizer, DatasetSection(), pad_to_multiple_of=None, images=images)(examples)
    assert batch["media"]["pixel_values"].shape == (3, 3, 28, 28)  # the batch's images in order
    model = Gemma3ForConditionalGeneration.from_pretrained(vlm_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = causal_lm_loss(model, batch)
        theirs = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            **batch["media"],
        ).loss
        assert float(ours.loss_sum) / ours.n_labels == pytest.approx(float(theirs), rel=1e-5)
        # As a GPU step takes it (training/device.py): label positions found on the host, and the 2-D mask
        # left for Gemma 3 to build its image blocks from.
        prepared = device_batch(dict(batch), torch.device("cpu"))
        assert prepared["attention_mask"].dim() == 2 and "label_positions" in prepared
        assert float(causal_lm_loss(model, prepared).loss_sum) == pytest.approx(float(ours.loss_sum), rel=1e-6)
        # Features computed once (training/image_features.py) score the batch as its pixels do.
        off = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
        assert cache_image_features(model, images, examples, torch.device("cpu"), off, budget=1).startswith(
            "their features would take"
        )
        assert all(ex.image_features is None for ex in examples)
        assert cache_image_features(model, images, examples, torch.device("cpu"), off) == (3, 3 * 4 * 32 * 4)
        cached = Collator.from_config(tokenizer, DatasetSection(), pad_to_multiple_of=None, images=images)(examples)
        assert set(cached["media"]) == {"image_features", "token_type_ids"}
        assert float(causal_lm_loss(model, cached).loss_sum) == pytest.approx(float(ours.loss_sum), rel=1e-6)
        # The images reach the loss: another picture scores the same text differently.
        other = {**batch["media"], "pixel_values": batch["media"]["pixel_values"].flip(0)}
        moved = causal_lm_loss(model, {**batch, "media": other})
    assert float(moved.loss_sum) != pytest.approx(float(ours.loss_sum), rel=1e-4)


def _answer_logps(model, images, url: str) -> dict[str, float]:
    """The log-probability of each colour's name as the answer to ``url``'s image."""
    tokenizer = images.processor.tokenizer
    out = {}
    for name in COLOURS:
        (example,) = tokenize_records([image_record([url], name)], tokenizer, DatasetSection(), images=images).examples
        batch = Collator.from_config(tokenizer, DatasetSection(), pad_to_multiple_of=None, images=images)([example])
        with torch.no_grad():
            out[name] = -float(causal_lm_loss(model, batch).loss_sum)
    return out


def test_training_on_images_learns_what_only_the_image_tells(vlm_dir, tmp_path):
    """Every record asks the same question; only its picture says red or blue. After training the model
    prefers the right answer for held-out pictures of either colour: the pixels went into training."""
    from peft import PeftModel
    from transformers import Gemma3ForConditionalGeneration

    train = write_jsonl(tmp_path / "colours.jsonl", colour_records(20))
    cfg = make_cfg(vlm_dir, train, lora=LoraSection(r=8, lora_alpha=16, lora_dropout=0.0), epochs=8)
    cfg.Training.learning_rate = 5e-2
    cfg.Dataset.validation_split_percentage = 20  # 4 held out
    sink = MemorySink()
    result = run_training(cfg, tmp_path / "out", sink)
    assert any("images: 20 in the data" in text for _, text, _ in sink.messages)
    assert any("image features of 20 images computed once" in text for _, text, _ in sink.messages)
    curve = losses(sink)
    assert sum(curve[-4:]) < 0.5 * sum(curve[:4]), curve
    accuracy = [row["train_accuracy"] for row in sink.metric_rows if "train_accuracy" in row]
    assert accuracy[0] == 0 and accuracy[-4:] == [1.0] * 4, accuracy  # each answer's tokens, argmax right

    images = load_image_inputs(str(vlm_dir), trust_remote_code=False, token=None)
    base = Gemma3ForConditionalGeneration.from_pretrained(vlm_dir, dtype=torch.float32).eval()
    tuned = PeftModel.from_pretrained(base, result.adapter_dir).eval()  # stock peft loads it
    for seed, name in enumerate(COLOURS, start=100):
        logps = _answer_logps(tuned, images, colour_url(COLOURS[name], seed))
        assert max(logps, key=logps.get) == name, (name, logps)

    # The evaluate job scores and answers the held-out records with their pictures, as served.
    dataset = cfg.Dataset.model_dump(mode="json")
    candidates = [
        EvalCandidate(name="base", model=str(vlm_dir)),
        EvalCandidate(
            name="tuned", model=str(vlm_dir), adapter=result.adapter_dir, data_format="chat", dataset=dataset
        ),
    ]
    split = {"model": str(vlm_dir), "dataset": dataset, "seed": cfg.Training.seed}
    base_row, tuned_row = run_evaluation(
        EvaluateParams(candidates=candidates, split=split, max_new_tokens=2), MemorySink(), None
    )
    assert tuned_row["n_examples"] == 4 and tuned_row["exact_match"] == 1.0 > base_row["exact_match"]
    assert tuned_row["loss"] < base_row["loss"]


def test_images_need_an_image_text_model_and_padded_batches(model_dir, vlm_dir, tmp_path):  # noqa: F811
    train = write_jsonl(tmp_path / "colours.jsonl", colour_records(4))
    with pytest.raises(DataValidationError, match="this model reads text only") as caught:
        run_training(make_cfg(model_dir, train, max_train_steps=1), tmp_path / "llama", MemorySink())
    assert caught.value.param == "training_file"
    cfg = make_cfg(vlm_dir, train, max_train_steps=1)
    cfg.Dataset.packing = True
    with pytest.raises(DataValidationError, match=r"leave `Dataset\.packing` off") as caught:
        run_training(cfg, tmp_path / "packed", MemorySink())
    assert caught.value.param == "Dataset.packing"
    cfg = make_cfg(vlm_dir, train, max_train_steps=1)
    cfg.Dataset.max_source_length, cfg.Dataset.max_length = 8, 16
    sink = MemorySink()
    with pytest.raises(DataValidationError, match="or of their images: raise"):
        run_training(cfg, tmp_path / "short", sink)
    assert any("4 example(s) of colours.jsonl were skipped" in text for _, text, _ in sink.messages)


def test_media_of_a_batch_is_none_without_images(vlm_dir):
    images = load_image_inputs(str(vlm_dir), trust_remote_code=False, token=None)
    record = {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]}
    examples = tokenize_records([record], images.processor.tokenizer, DatasetSection(), images=images).examples
    assert examples[0].images == () and examples[0].image_tokens is None
    assert "media" not in Collator(0, images=images)(examples)


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory, tokenizer_dir):
    return save_qwen2_vl_model(tmp_path_factory.mktemp("tiny-qwen2-vl"), tokenizer_dir)


@pytest.mark.parametrize("family", ["vlm_dir", "qwen2_vl_dir"])
def test_every_sqft_method_trains_on_images(family, tmp_path, request):
    """An NLS super-adapter with SparsePEFT and QA-SparsePEFT at once, on image records (Gemma 3; Qwen2-VL,
    whose q/k/v have biases)."""
    vlm_dir = request.getfixturevalue(family)
    groups = [["q_proj", "k_proj", "v_proj"], ["up_proj"], ["down_proj"]]
    train = write_jsonl(tmp_path / "colours.jsonl", colour_records(16))
    sink = MemorySink()
    cfg = make_cfg(vlm_dir, train, lora=sqft_lora(groups, group_size=32), epochs=2)
    result = run_training(cfg, tmp_path / "out", sink)
    curve = losses(sink)
    assert result.steps == 8 and sum(curve[-2:]) < sum(curve[:2]), curve
    assert (Path(result.adapter_dir) / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(("family", "tower_name"), [("vlm_dir", "vision_tower"), ("qwen2_vl_dir", "visual")])
def test_checkpointed_training_runs_no_backward_through_the_vision_tower(family, tower_name, request):
    """With gradient checkpointing, transformers and peft make every sub-model's input embeddings require
    grad; ``text_input_grads_only`` leaves only the text's, so a batch read from pixels builds no graph in
    the frozen tower, and the adapter's gradients are the same as without checkpointing (Gemma 3, and
    Qwen2-VL, whose tower reads patches, not images)."""
    from sqft_service.adapters.lora import build_peft_model
    from sqft_service.training.images import text_input_grads_only
    from sqft_service.training.models import load_base_model

    vlm_dir = request.getfixturevalue(family)
    images = load_image_inputs(str(vlm_dir), trust_remote_code=False, token=None)
    records = [image_record([colour_url(COLOURS["red"], 1)], "red"), image_record([image_data_url(2)], "noise")]
    examples = tokenize_records(records, images.processor.tokenizer, DatasetSection(), images=images).examples
    batch = Collator(0, images=images)(examples)

    def gradients(checkpointed: bool) -> tuple[dict[str, torch.Tensor], bool]:
        base = load_base_model(str(vlm_dir), trust_remote_code=False, token=None)
        if checkpointed:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(3)  # the adapter's initial weights
        model, _ = build_peft_model(base, LoraSection(r=4, lora_alpha=8, lora_dropout=0.0))
        if checkpointed:
            assert text_input_grads_only(base) >= 1
        tower = []
        getattr(base.model, tower_name).register_forward_hook(lambda m, i, out: tower.append(out[0].requires_grad))
        model.train()
        causal_lm_loss(model, batch).loss_sum.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, tower[0]

    plain, plain_tower = gradients(False)
    checkpointed, checkpointed_tower = gradients(True)
    assert not plain_tower and not checkpointed_tower
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)


def test_a_checkpointed_job_on_images_drops_the_towers_input_grad_hooks(vlm_dir, tmp_path, monkeypatch):
    """The job calls ``text_input_grads_only`` when it checkpoints a model that reads images, and it finds
    the hooks transformers and peft put on the tower's embeddings."""
    from sqft_service.training import recipe
    from sqft_service.training.images import text_input_grads_only

    removed = []
    monkeypatch.setattr(recipe, "text_input_grads_only", lambda model: removed.append(text_input_grads_only(model)))
    monkeypatch.setattr(image_features, "CACHE_BYTES", 0)  # batches read pixels through the tower
    train = write_jsonl(tmp_path / "colours.jsonl", colour_records(4))
    cfg = make_cfg(vlm_dir, train, max_train_steps=1)
    cfg.General.enable_gradient_checkpointing = True
    assert run_training(cfg, tmp_path / "out", MemorySink()).steps == 1
    assert len(removed) == 1 and removed[0] >= 1


# Image-text models AutoModelForCausalLM does not load, and the feature rows the test's four images give:
# LLaVA's tower a 4-token block per image; Idefics3's (SmolVLM's) a row's tiles, 5 blocks of 4 tokens for a
# 28-pixel image (a 2 x 2 split beside the whole), 3 for a 200 x 60 one (1 x 2), 1 at low detail.
# Qwen2-VL's and Qwen2.5-VL's a token per 2 x 2 patches of 14 pixels, images resized to between 56 x 56
# and 112 x 112 in steps of 28: 56 x 56 (4 tokens), 56 x 196 (14) twice, 56 x 84 (6).
QWEN_ROWS = 4 + 2 * 14 + 6
OTHER_FAMILIES = {
    "llava": (save_llava_model, 4 * 4),
    "idefics3": (save_idefics3_model, (5 + 2 * 3 + 1) * 4),
    "smolvlm2": (partial(save_idefics3_model, smolvlm2=True), (5 + 2 * 3 + 1) * 4),  # Idefics3's tiles
    "qwen2_vl": (save_qwen2_vl_model, QWEN_ROWS),
    "qwen2_5_vl": (partial(save_qwen2_vl_model, version="2.5"), QWEN_ROWS),
    "qwen3_vl": (partial(save_qwen2_vl_model, version="3"), 2 * QWEN_ROWS),  # and a deepstack level's
}


@pytest.fixture(scope="module", params=sorted(OTHER_FAMILIES))
def family(request, tmp_path_factory, tokenizer_dir) -> tuple[Path, int]:
    save, rows = OTHER_FAMILIES[request.param]
    return save(tmp_path_factory.mktemp(f"tiny-{request.param}"), tokenizer_dir), rows


def test_other_image_text_families_train_on_images_and_answer_as_transformers(family, tmp_path, monkeypatch):
    """LLaVA, Idefics3/SmolVLM, Qwen2-VL and Qwen2.5-VL (loaded as image-text models; features a block per
    image, or per row of tiles padded across the batch; Qwen's rotary positions from each image's grid, with
    pixels or cached features alike): a batch scores as transformers scores it, from pixels and from cached
    features; the job trains, and the engine's answers with the adapter, and from its merge, are
    transformers' and peft's own; the merge's GGUF is its text decoder."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from sqft_service.api.inference.protocol import Message
    from sqft_service.inference.answer import chat_renderer
    from sqft_service.inference.engine import InferenceEngine
    from sqft_service.inference.spec import ModelSpec, Sampling
    from sqft_service.model_ops import merge

    family_dir, rows = family
    images = load_image_inputs(str(family_dir), trust_remote_code=False, token=None)
    tokenizer = images.processor.tokenizer
    records = [
        image_record([colour_url(COLOURS["red"], 1)], "red"),
        image_record([image_data_url(4, (200, 60))] * 2, "Two."),
        image_record([image_data_url(5)], "Whole.", detail="low"),  # Idefics3: no tiles, the whole only
    ]
    examples = tokenize_records(records, tokenizer, DatasetSection(), images=images).examples
    # The job's length fit counts, per image, at least the tokens the processor writes for the largest.
    alone, _ = images.encode(images.placeholder, [{"url": image_data_url(1, (200, 200))}], {})
    assert auto_hparams.image_tokens(str(family_dir)) >= len(alone)
    collate = Collator.from_config(tokenizer, DatasetSection(), pad_to_multiple_of=None, images=images)
    batch = collate(examples)
    model = AutoModelForImageTextToText.from_pretrained(family_dir, dtype=torch.float32).eval()
    off = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    with torch.no_grad():
        theirs = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}, **batch["media"]).loss
        ours = causal_lm_loss(model, batch)
        assert float(ours.loss_sum) / ours.n_labels == pytest.approx(float(theirs), rel=1e-5)
        # Tower passes of up to 4 blocks: Idefics3's rows of 5, 6 and 1 tiles each a pass, LLaVA's 1+2 and 1.
        monkeypatch.setattr(image_features, "IMAGES_PER_PASS", 4)
        assert cache_image_features(model, images, examples, torch.device("cpu"), off) == (4, rows * 32 * 4)
        cached = collate(examples)
        assert cached["media"]["image_features_as_list"] is True
        assert float(causal_lm_loss(model, cached).loss_sum) == pytest.approx(float(ours.loss_sum), rel=1e-6)

    train = write_jsonl(tmp_path / "colours.jsonl", colour_records(12))
    cfg = make_cfg(family_dir, train, lora=LoraSection(r=8, lora_alpha=16, lora_dropout=0.0), epochs=4)
    sink = MemorySink()
    result = run_training(cfg, tmp_path / "out", sink)
    curve = losses(sink)
    assert sum(curve[-3:]) < sum(curve[:3]), curve

    url = colour_url(COLOURS["blue"], 50)
    content = [{"type": "text", "text": "What colour is this?"}, {"type": "image_url", "image_url": {"url": url}}]
    messages = [Message.model_validate({"role": "user", "content": content}).as_dict()]
    engine = InferenceEngine(threads=1, max_queue=0, max_models=2, model_cache_dir=None, device="cpu")

    def answer(spec: ModelSpec) -> str:
        ids, _ = engine.prepare(spec, chat_renderer(spec, messages))
        return engine.generate(spec, ids, Sampling(4, temperature=0.0))[0].text

    tuned = answer(ModelSpec("ft", str(family_dir), adapter=result.adapter_dir, data_format="chat"))
    processor = load_processor(str(family_dir))  # Qwen's without its video half (torchvision)
    turns = [{"role": "user", "content": [{"type": "text", "text": "What colour is this?"}, {"type": "image"}]}]
    text = processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    inputs = processor(
        text=text, images=[read_image(url).convert("RGB")], add_special_tokens=False, return_tensors="pt"
    )
    peft_model = PeftModel.from_pretrained(model, result.adapter_dir).eval()
    eos = sorted(InferenceEngine._eos_ids(model, tokenizer))  # where the engine stops, transformers stops
    out = peft_model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=eos)
    assert tuned == tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    merged = tmp_path / "merged"
    assert merge(str(family_dir), Path(result.adapter_dir), merged, sparse=False, gguf_type="f32")["gguf"]
    assert answer(ModelSpec("merged", str(merged), data_format="chat")) == tuned
    # Its GGUF is the Llama text decoder: read back by transformers, the same logits as the merged model's.
    from transformers import AutoModelForCausalLM

    text_only = AutoModelForCausalLM.from_pretrained(merged, gguf_file="model.gguf", dtype=torch.float32).eval()
    whole = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer("The sky is blue.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(text_only(ids).logits, whole(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
