"""The ``evaluate`` job: score candidate models on the same records (job process only: imports torch).

Each distinct base model is loaded once; fine-tuned adapters are attached to it with stock peft and
switched with ``set_adapter`` (a base candidate runs inside ``disable_adapter()``), as the inference
engine does. Per candidate:

* the loss over response tokens, tokenized as the candidate's job trained (``tokenize_records`` with
  its ``Dataset`` section; a base model: the section's defaults), its exp (perplexity) and the share of
  label tokens the argmax predicts (token accuracy);
* with ``generate``: a greedy answer to each prompt, rendered as the candidate trained (Alpaca template
  or chat template, as ``inference/render.py``), compared with the reference: exact match (both
  stripped) and contains match (the stripped reference inside the answer), plus three samples. The
  prompts are generated in left-padded batches, with the answers of one-at-a-time decoding.

A SparsePEFT adapter (``sparse``) is not attached but merged into a fresh copy of its base with its
mask (``adapters.merge.masked_merge``), as the inference engine serves it: stock peft would apply the
unmasked update, a model other than the one trained.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TypeVar

from .errors import UserError
from .jobs.kinds import EvalCandidate, EvaluateParams
from .training.events import EventSink

T = TypeVar("T")
BATCH_SIZE = 8
GENERATION_BATCH_SIZE = 8  # bench/evaluation.py measured the gain over one prompt at a time
N_SAMPLES = 3


def _served(message: dict[str, Any]) -> dict[str, Any]:
    """A record's message as the chat route hands a request's to the renderer (``Message.as_dict``): text
    parts joined, and a message with images as parts with the images read."""
    from .inference.images import read_image
    from .training.records import text_of

    content = message.get("content")
    if not isinstance(content, list):
        return message
    if not any(part["type"] == "image_url" for part in content):
        return {**message, "content": text_of(content)}
    parts = [
        {"type": "text", "text": part["text"]}
        if part["type"] == "text"
        else {"type": "image", "image": read_image(part["image_url"]["url"]), "detail": part["image_url"].get("detail")}
        for part in content
    ]
    return {**message, "content": parts}


def _prompt(
    tokenizer: Any, record: dict[str, Any], data_format: str | None, processor: Any = None
) -> tuple[list[int], str]:
    """The prompt's token ids as the candidate saw prompts in training, and the reference answer
    (``processor``: an image-text model's, for records with images)."""
    from .inference.render import chat_ids
    from .tool_calls import assistant_text
    from .training.prompts import alpaca_prompt
    from .training.records import text_of
    from .training.tokenization import _adds_bos

    if "messages" in record:
        messages = record["messages"]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise UserError("a chat record has no assistant message to compare against", param="file")
        # A turn of calls is compared as the model writes it (``tool_calls.assistant_text``).
        context, reference = [_served(m) for m in messages[:last]], assistant_text(messages[last])
        if data_format == "alpaca":  # a model trained on Alpaca: the last user turn as the instruction
            users = [m for m in context if m.get("role") == "user"]
            if users and isinstance(users[-1]["content"], list):
                raise UserError(
                    "a model fine-tuned on Alpaca records reads text: its records have images", param="file"
                )
            record = {"instruction": text_of(users[-1]["content"]) if users else ""}
        else:
            return chat_ids(tokenizer, context, "chat", record.get("tools"), processor), reference
    else:
        reference = record["output"]
        if data_format == "chat":  # a model trained on chat: the instruction (and input) as one user turn
            content = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
            return chat_ids(tokenizer, [{"role": "user", "content": content}], "chat"), reference
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    return bos + tokenizer(alpaca_prompt(record), add_special_tokens=False)["input_ids"], reference


def _scores(
    model: Any, tokenizer: Any, records: list[dict[str, Any]], c: EvalCandidate, images: Any = None
) -> dict[str, Any]:
    import torch

    from .config import DatasetSection
    from .training.batching import Collator
    from .training.device import model_device, move_batch
    from .training.loss import causal_lm_loss
    from .training.memory import in_fitting_batches
    from .training.tokenization import tokenize_records

    cfg = DatasetSection.model_validate(c.dataset)
    examples = tokenize_records(records, tokenizer, cfg, images=images).examples
    collator = Collator.from_config(tokenizer, cfg, pad_to_multiple_of=None, images=images)
    device = model_device(model)

    def score(chunk: Sequence[Any]) -> tuple[float, int, int]:
        batch = collator(list(chunk))
        for key in ("n_real_tokens", "n_label_tokens", "n_padded_tokens"):
            batch.pop(key)
        with torch.inference_mode():
            out = causal_lm_loss(model, move_batch(batch, device))
        return float(out.loss_sum), int(out.n_correct), out.n_labels

    totals = in_fitting_batches(examples, BATCH_SIZE, score, device)  # a batch that does not fit is halved
    loss_sum = sum(t[0] for t in totals)
    n_correct = sum(t[1] for t in totals)
    n_labels = sum(t[2] for t in totals)
    if not n_labels:
        return {"loss": None, "perplexity": None, "token_accuracy": None, "n_label_tokens": 0}
    loss = loss_sum / n_labels
    perplexity = math.exp(loss) if loss < 700 else None  # JSON has no infinity
    return {"loss": loss, "perplexity": perplexity, "token_accuracy": n_correct / n_labels, "n_label_tokens": n_labels}


def greedy_answers(model: Any, tokenizer: Any, prompts: list[list[int]], max_new: int, batch_size: int) -> list[str]:
    """The greedy answer to each prompt, generated ``batch_size`` prompts at a time
    (``inference/greedy.py``), each cut at its first end-of-sequence id as a prompt generated alone stops
    there: the answers of one-at-a-time greedy decoding (tests/unit/test_evaluation_generation.py)."""
    from .inference.engine import InferenceEngine
    from .inference.greedy import greedy_tokens

    eos = InferenceEngine._eos_ids(model, tokenizer)
    rows = greedy_tokens(model, prompts, [max_new] * len(prompts), batch_size, pad=tokenizer.pad_token_id, eos=eos)
    answers = []
    for row in rows:
        end = next((k + 1 for k, token in enumerate(row) if token in eos), len(row))
        answers.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return answers


def preferred_conversation(record: dict[str, Any]) -> dict[str, Any]:
    """A preference record as the chat record of its preferred reply (what loss and generation score)."""
    from .training.records import as_openai_preference

    record = as_openai_preference(record)
    return {
        "messages": [*record["input"]["messages"], record["preferred_output"][0]],
        "tools": record["input"].get("tools"),
    }


def _preference_scores(model: Any, tokenizer: Any, records: list[dict[str, Any]], c: EvalCandidate) -> dict[str, Any]:
    """How often the candidate gives the preferred reply the higher log-probability, and by how much."""
    import torch

    from .config import DatasetSection
    from .training.batching import Collator
    from .training.device import model_device, move_batch
    from .training.memory import in_fitting_batches
    from .training.preference import PairCollator, sequence_logps, tokenize_pairs

    cfg = DatasetSection.model_validate(c.dataset)
    pairs, _ = tokenize_pairs(records, tokenizer, cfg)
    collator = PairCollator(Collator.from_config(tokenizer, cfg, pad_to_multiple_of=None))
    device = model_device(model)

    def score(chunk: Sequence[Any]) -> tuple[int, float]:
        with torch.inference_mode():
            logps = sequence_logps(model, move_batch(collator(list(chunk)), device))
        margins = logps[:, 0] - logps[:, 1]
        return int((margins > 0).sum()), float(margins.sum())

    totals = in_fitting_batches(pairs, BATCH_SIZE, score, device)
    if not pairs:
        return {"preference_accuracy": None, "preference_margin": None}
    return {
        "preference_accuracy": sum(t[0] for t in totals) / len(pairs),
        "preference_margin": sum(t[1] for t in totals) / len(pairs),
    }


def _generations(
    model: Any, tokenizer: Any, records: list[dict[str, Any]], c: EvalCandidate, max_new: int, images: Any = None
):
    processor = images.processor if images is not None else None
    prompts, references = zip(*(_prompt(tokenizer, r, c.data_format, processor) for r in records), strict=True)
    outputs = greedy_answers(model, tokenizer, list(prompts), max_new, GENERATION_BATCH_SIZE)
    exact = sum(o.strip() == ref.strip() for o, ref in zip(outputs, references, strict=True))
    contains = sum(ref.strip() in o for o, ref in zip(outputs, references, strict=True))
    samples = [
        {"prompt": tokenizer.decode(ids, skip_special_tokens=True), "reference": ref, "output": o}
        for ids, ref, o in list(zip(prompts, references, outputs, strict=True))[:N_SAMPLES]
    ]
    n = len(records)
    return {
        "exact_match": exact / n,
        "contains_match": contains / n,
        **_call_match(records, outputs),
        "samples": samples,
    }


def _call_match(records: list[dict[str, Any]], outputs: list[str]) -> dict[str, Any]:
    """For records whose answer is calls: how often the output makes the same calls (names and arguments
    as JSON values, whatever their spacing or key order), read as serving reads them."""
    from .tool_calls import CallParser

    matched = total = 0
    for record, output in zip(records, outputs, strict=True):
        last = record.get("messages", [{}])[-1]
        if not last.get("tool_calls"):
            continue
        total += 1
        parser = CallParser(frozenset(t["function"]["name"] for t in record.get("tools") or ()))
        made = [(c["name"], json.loads(c["arguments"])) for c in parser.split(output)[1]]
        wanted = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in last["tool_calls"]]
        matched += made == wanted
    return {"tool_call_accuracy": matched / total, "n_tool_call_records": total} if total else {}


def _validation_records(split: dict[str, Any], model_cache_dir: Path | None) -> list[dict[str, Any]]:
    """The records of a fine-tune's validation examples, held out exactly as ``FinetuneRecipe._load_data``
    did: records left without a label token by its tokenization dropped, then ``split_train_eval`` with
    its seed (or its ``validation_file``), then ``max_eval_samples``."""
    from .config import DatasetSection
    from .training.models import load_tokenizer, resolve_model_dir
    from .training.preference import tokenize_pairs
    from .training.records import is_preference_record, load_records
    from .training.tokenization import split_train_eval, tokenize_records

    cfg = DatasetSection.model_validate(split["dataset"])
    model_dir = resolve_model_dir(split["model"], model_cache_dir)
    tokenizer = load_tokenizer(model_dir, split.get("tokenizer"))

    def kept(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Each record is tokenized on its own exactly as within the whole list (a DPO job's as pairs).
        if records and is_preference_record(records[0]):
            return [r for r in records if tokenize_pairs([r], tokenizer, cfg)[0]]
        images = _image_inputs(records, str(model_dir), "fine_tuning_job_id")
        return [r for r in records if tokenize_records([r], tokenizer, cfg, images=images).examples]

    if cfg.validation_file:
        evals = kept(load_records(cfg.validation_file))
    else:
        train = load_records(cfg.train_file or "")
        if cfg.max_train_samples is not None:
            train = train[: cfg.max_train_samples]
        seed = split.get("seed")
        _, evals = split_train_eval(kept(train), cfg.validation_split_percentage, 42 if seed is None else seed)
    if cfg.max_eval_samples is not None:
        evals = evals[: cfg.max_eval_samples]
    return evals


def trained_sparse(adapter_dir: str | Path) -> bool:
    """Whether the ``training_config.json`` a fine-tune saves beside its adapter (and an extracted
    sub-adapter copies) says SparsePEFT trained it; False when there is none."""
    try:
        config = json.loads((Path(adapter_dir) / "training_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("General", {}).get("lora_config", {}).get("sparse_adapter"))


def _image_inputs(records: list[dict[str, Any]], model_dir: str, param: str) -> Any:
    """The model's processor when ``records`` have images (``training/images.py``), else None."""
    from .training.images import load_image_inputs
    from .training.records import DataValidationError, record_images

    if not any(record_images(r) for r in records):
        return None
    try:
        return load_image_inputs(model_dir, trust_remote_code=False, token=None)
    except DataValidationError as exc:
        raise UserError(exc.message.replace("training data", "data"), param=param) from None


def _loading_adapter(c: EvalCandidate, load: Callable[[], T]) -> T:
    from .training.models import ModelLoadError

    try:
        return load()
    except Exception as exc:  # a damaged or foreign adapter directory: the job's error names the candidate
        raise ModelLoadError(f"could not load the adapter of {c.name}: {exc}".splitlines()[0]) from exc


def _candidate_model(c: EvalCandidate, name: str, model_dir: str, models: dict[str, Any]) -> tuple[Any, Any]:
    """The model to score ``c`` with, and the context to score it in (``models``: the loaded bases)."""
    from peft import PeftModel

    from .adapters.merge import masked_merge
    from .training.device import operation_device
    from .training.models import load_base_model

    def load() -> Any:
        # Frozen, as peft leaves a base it wraps: every candidate then takes the same loss path
        # (causal_lm_loss's chunked cross-entropy needs a frozen head), whatever was loaded before it.
        # On the GPU when it fits, in the dtype it was loaded in (the candidates' figures stay comparable
        # with a CPU run's); adapters attached later follow it (peft).
        model = load_base_model(model_dir).eval().requires_grad_(False)
        return model.to(operation_device(model))

    adapter = c.adapter
    if adapter is not None and c.sparse:  # its own model, freed after the candidate
        return _loading_adapter(c, lambda: masked_merge(load(), adapter)).eval(), nullcontext()
    if model_dir not in models:
        models[model_dir] = load()
    model = models[model_dir]
    if adapter is None:
        return model, model.disable_adapter() if isinstance(model, PeftModel) else nullcontext()
    if isinstance(model, PeftModel):
        _loading_adapter(c, lambda: model.load_adapter(adapter, adapter_name=name, is_trainable=False))
    else:
        model = models[model_dir] = _loading_adapter(
            c, lambda: PeftModel.from_pretrained(model, adapter, adapter_name=name)
        )
    model.eval()
    model.set_adapter(name)
    return model, nullcontext()


def run_evaluation(p: EvaluateParams, sink: EventSink, model_cache_dir: Path | None) -> list[dict[str, Any]]:
    from .threads import configure_torch_threads
    from .training.device import model_device
    from .training.models import load_tokenizer, resolve_model_dir
    from .training.records import is_preference_record, is_prompt_record, load_records

    configure_torch_threads()
    if p.split is not None:
        records = _validation_records(p.split, model_cache_dir)[: p.max_samples]
        source, param = f"job {p.fine_tuning_job_id}'s validation split", "fine_tuning_job_id"
    else:
        records = load_records(p.data_path or "")[: p.max_samples]
        source, param = f"file {p.file}", "file"
    if not records:
        raise UserError(f"{source} holds no records to evaluate on", param=param)
    if is_prompt_record(records[0]):  # a file uploaded before formats were recorded (the API refuses others)
        raise UserError(f"{source} holds prompt records: no reference replies to score", param=param)
    sink.message(f"evaluating {len(p.candidates)} candidate(s) on {len(records)} record(s) of {source}")
    # Preference records: scored as their preferred replies, and by which reply each candidate prefers.
    pairs = records if is_preference_record(records[0]) else None
    if pairs is not None:
        records = [preferred_conversation(r) for r in pairs]
    models: dict[str, Any] = {}  # model directory → the loaded model (a PeftModel once an adapter is on)
    rows = []
    for i, c in enumerate(p.candidates):
        model_dir = resolve_model_dir(c.model, model_cache_dir)
        tokenizer = load_tokenizer(model_dir, c.tokenizer)
        images = _image_inputs(records, str(model_dir), param)
        model, context = _candidate_model(c, f"c{i}", model_dir, models)
        sink.message(f"candidate {i + 1}/{len(p.candidates)}: {c.name} (on {model_device(model)})")
        with context:
            row: dict[str, Any] = {"candidate": c.name, "n_examples": len(records)}
            row.update(exact_match=None, contains_match=None, samples=[])
            row.update(_scores(model, tokenizer, records, c, images))
            if pairs is not None:
                row.update(_preference_scores(model, tokenizer, pairs, c))
            if p.generate:
                row.update(_generations(model, tokenizer, records, c, p.max_new_tokens, images))
        sink.message(
            f"{c.name}: loss {row['loss']}, token accuracy {row['token_accuracy']}"
            + (f", exact match {row['exact_match']:.3f}" if p.generate else "")
            + (f", preference accuracy {row['preference_accuracy']}" if pairs is not None else ""),
            data={"candidate": c.name, "loss": row["loss"]},
        )
        rows.append(row)
    return rows
