"""Preference (DPO) training: records, pairs, the loss against a plain implementation, the recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sqft_service.adapters.lora import build_peft_model
from sqft_service.config import DatasetSection, LoraSection, TrainingSection
from sqft_service.training.batching import Collator
from sqft_service.training.events import MemorySink
from sqft_service.training.packing import PackingCollator
from sqft_service.training.preference import (
    PairCollator,
    dpo_loss,
    preference_losses,
    reply_token_counts,
    sequence_logps,
    tokenize_pairs,
)
from sqft_service.training.recipe import REFERENCE_FILE, TrainingStopped, run_training
from sqft_service.training.records import DataValidationError, inspect_training_file, load_records
from sqft_service.training.tokenization import IGNORE_INDEX
from tests.conftest import make_tiny_llama, randomize_b
from tests.helpers import alpaca_records, preference_records, write_json, write_jsonl
from tests.unit.test_recipe import losses, make_cfg, model_dir, sparse_model_dir, sqft_lora  # noqa: F401
from tests.unit.test_resume import StopAt

pytestmark = pytest.mark.usefixtures("one_thread")


def pref(**changes) -> dict:
    record = preference_records(1)[0]
    record.update(changes)
    return record


# ------------------------------------------------------------------ records
def test_preference_files_are_recognised(tmp_path):
    stats = inspect_training_file(write_jsonl(tmp_path / "p.jsonl", preference_records(5)))
    assert (stats.format, stats.n_records) == ("preference", 5)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (pref(input="hi"), "field 'input' must be an object with 'messages', got string"),
        (pref(input={"messages": []}), "field 'input.messages' must be a non-empty array"),
        (
            pref(input={"messages": [{"role": "assistant", "content": "x"}]}),
            "the last of 'input.messages' must not be the assistant's",
        ),
        (
            pref(input={"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
            "input.tools[0] must be an object with 'function'",
        ),
        (
            {k: v for k, v in pref().items() if k != "non_preferred_output"},
            "missing required field 'non_preferred_output'",
        ),
        (
            pref(preferred_output=[{"role": "user", "content": "x"}]),
            "'preferred_output' must hold exactly one assistant",
        ),
        (
            pref(preferred_output=[{"role": "assistant", "content": "a"}] * 2),
            "'preferred_output' must hold exactly one assistant",
        ),
        (
            pref(non_preferred_output=[{"role": "assistant", "content": 3}]),
            "non_preferred_output[0].content must be a string",
        ),
        (pref(non_preferred_output=pref()["preferred_output"]), "are the same reply"),
    ],
)
def test_bad_preference_records_name_the_line_and_the_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "p.jsonl", [*preference_records(2), record])
    with pytest.raises(DataValidationError) as err:
        inspect_training_file(path)
    assert err.value.line == 3 and message in str(err.value), str(err.value)


def test_a_file_mixing_preference_and_chat_records_is_refused(tmp_path):
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(
        DataValidationError, match="line 2: record is in chat format but earlier records are in preference"
    ):
        inspect_training_file(write_jsonl(tmp_path / "p.jsonl", [*preference_records(1), chat]))


def trl(record: dict, *, strings: bool) -> dict:
    """The same pair in TRL's form: plain strings, or conversational (message lists)."""
    prompt = record["input"]["messages"]
    if strings:
        return {
            "prompt": prompt[-1]["content"],
            "chosen": record["preferred_output"][0]["content"],
            "rejected": record["non_preferred_output"][0]["content"],
        }
    return {"prompt": prompt, "chosen": record["preferred_output"], "rejected": record["non_preferred_output"]}


@pytest.mark.parametrize("strings", [True, False])
def test_trl_preference_records_tokenize_like_openais(tmp_path, tokenizer, strings):
    records = preference_records(4)
    path = write_jsonl(tmp_path / "trl.jsonl", [trl(r, strings=strings) for r in records])
    assert inspect_training_file(path).format == "preference"
    ours, _ = tokenize_pairs(load_records(path), tokenizer, DatasetSection())
    theirs, _ = tokenize_pairs(records, tokenizer, DatasetSection())
    assert [(p.chosen, p.rejected) for p in ours] == [(p.chosen, p.rejected) for p in theirs]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"chosen": "a", "rejected": "b"}, "no 'prompt' (conversations with an implicit prompt are not supported"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string or an array, got number"),
        (
            {"prompt": "q", "chosen": "a", "rejected": [{"role": "user", "content": "b"}]},
            "field 'rejected' must hold exactly one assistant message",
        ),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "'chosen' and 'rejected' are the same reply"),
        (
            {"prompt": [{"role": "assistant", "content": "q"}], "chosen": "a", "rejected": "b"},
            "the last of 'prompt' must not be the assistant's",
        ),
        ({"prompt": "q", "chosen": "a"}, "missing required field 'rejected'"),
    ],
)
def test_bad_trl_records_name_the_line_and_the_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "p.jsonl", [trl(preference_records(1)[0], strings=True), record])
    with pytest.raises(DataValidationError) as err:
        inspect_training_file(path)
    assert err.value.line == 2 and message in str(err.value), str(err.value)


# ------------------------------------------------------------------ pairs
def test_pairs_share_the_prompt_and_train_only_the_reply(tokenizer):
    record = pref(
        input={
            "messages": [
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Earlier turn"},
                {"role": "user", "content": "The sky is red. What color is the sky?"},
            ]
        }
    )
    pairs, dropped = tokenize_pairs([record], tokenizer, DatasetSection())
    assert dropped == 0 and len(pairs) == 1
    chosen, rejected = pairs[0].chosen, pairs[0].rejected

    def target(ex) -> str:
        return tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX])

    assert target(chosen).startswith("red, it is.") and target(rejected).startswith("blue, it is.")
    assert "Earlier turn" not in target(chosen)  # an input's assistant turn is context
    first = chosen.labels.index(next(t for t in chosen.labels if t != IGNORE_INDEX))
    assert chosen.input_ids[:first] == rejected.input_ids[:first]  # the same prompt tokens


def test_a_pair_whose_reply_is_truncated_away_is_dropped(tokenizer):
    long_prompt = pref(input={"messages": [{"role": "user", "content": "word " * 200}]})
    cfg = DatasetSection(max_length=64, max_source_length=64)
    pairs, dropped = tokenize_pairs([long_prompt, *preference_records(2)], tokenizer, cfg)
    assert (len(pairs), dropped) == (2, 1)


# ------------------------------------------------------------------ the loss
def plain_logps(model: torch.nn.Module, examples) -> torch.Tensor:
    """Each sequence on its own, full logits: the sum of its label tokens' log-probabilities."""
    out = []
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        logits = model(input_ids=ids).logits[0, :-1].float()
        labels = torch.tensor(ex.labels[1:])
        keep = labels != IGNORE_INDEX
        out.append(torch.log_softmax(logits[keep], -1).gather(1, labels[keep][:, None]).sum())
    return torch.stack(out)


@pytest.fixture
def adapted(tokenizer):
    torch.manual_seed(0)
    model, _ = build_peft_model(make_tiny_llama(len(tokenizer)), LoraSection(r=4, lora_alpha=8, lora_dropout=0.0))
    randomize_b(model)
    return model


@pytest.mark.parametrize("packed", [False, True])
def test_dpo_loss_and_gradients_equal_the_plain_computation(tokenizer, adapted, packed):
    pairs, _ = tokenize_pairs(preference_records(3), tokenizer, DatasetSection())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    inner = PackingCollator(pad, 512, track_examples=True) if packed else Collator(pad, pad_to_multiple_of=None)
    reference = torch.tensor([[-20.0, -25.0], [-30.0, -29.0], [-15.0, -15.5]])
    for pair, ref in zip(pairs, reference.tolist(), strict=True):
        pair.reference = tuple(ref)
    batch = PairCollator(inner)([pairs[0], pairs[1], pairs[2]])
    assert batch["n_label_tokens"] == batch["n_pairs"] == 3

    beta = 0.5
    out = dpo_loss(adapted, batch, beta)
    out.loss_sum.backward()
    ours = {n: p.grad.clone() for n, p in adapted.named_parameters() if p.grad is not None}
    adapted.zero_grad()

    logps = plain_logps(adapted, [ex for p in pairs for ex in (p.chosen, p.rejected)]).view(-1, 2)
    margins = beta * ((logps[:, 0] - reference[:, 0]) - (logps[:, 1] - reference[:, 1]))
    plain = -F.logsigmoid(margins).sum()
    plain.backward()
    assert out.loss_sum.item() == pytest.approx(plain.item(), rel=1e-5)
    assert out.n_correct.item() == int((margins > 0).sum()) and out.n_labels == 3
    assert ours.keys() == {n for n, p in adapted.named_parameters() if p.grad is not None} and ours
    for name, grad in ours.items():
        torch.testing.assert_close(grad, dict(adapted.named_parameters())[name].grad, rtol=1e-3, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(adapted, batch), logps.detach(), rtol=1e-5, atol=1e-4)


def _log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


@pytest.mark.parametrize(
    ("loss_type", "smoothing", "plain"),
    [
        ("sigmoid", 0.0, lambda z: -_log_sigmoid(z)),
        ("sigmoid", 0.1, lambda z: -0.9 * _log_sigmoid(z) - 0.1 * _log_sigmoid(-z)),  # cDPO
        ("robust", 0.1, lambda z: (-0.9 * _log_sigmoid(z) + 0.1 * _log_sigmoid(-z)) / 0.8),
        ("hinge", 0.0, lambda z: max(0.0, 1 - z)),
    ],
)
def test_preference_losses_are_the_papers_formulas(loss_type, smoothing, plain):
    beta, margins = 0.5, torch.tensor([-3.0, -0.2, 0.0, 0.7, 4.0])
    got = preference_losses(margins, beta, loss_type, smoothing)
    assert got.tolist() == pytest.approx([plain(beta * h) for h in margins.tolist()], rel=1e-6)
    ipo = preference_losses(margins, beta, "ipo", 0.0)  # held to a margin of 1 / (2 beta) = 1
    assert ipo.tolist() == pytest.approx([(h - 1.0) ** 2 for h in margins.tolist()], rel=1e-6)


def test_ipo_compares_per_token_log_ratios(tokenizer, adapted):
    pairs, _ = tokenize_pairs(preference_records(3), tokenizer, DatasetSection())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    reference = torch.tensor([[-20.0, -25.0], [-30.0, -29.0], [-15.0, -15.5]])
    for pair, ref in zip(pairs, reference.tolist(), strict=True):
        pair.reference = tuple(ref)
    batch = PairCollator(Collator(pad, pad_to_multiple_of=None))(pairs)
    lengths = torch.tensor(
        [[sum(t != IGNORE_INDEX for t in ex.labels[1:]) for ex in (p.chosen, p.rejected)] for p in pairs],
        dtype=torch.float32,
    )
    assert reply_token_counts(batch).tolist() == lengths.tolist()
    with torch.no_grad():
        out = dpo_loss(adapted, batch, 0.25, "ipo")
        logps = plain_logps(adapted, [ex for p in pairs for ex in (p.chosen, p.rejected)]).view(-1, 2)
    ratios = (logps - reference) / lengths
    plain = ((ratios[:, 0] - ratios[:, 1]) - 2.0) ** 2  # 1 / (2 * 0.25)
    assert out.loss_sum.item() == pytest.approx(plain.sum().item(), rel=1e-4)


def test_simpo_compares_average_log_probabilities_without_a_reference(tokenizer, adapted):
    pairs, _ = tokenize_pairs(preference_records(3), tokenizer, DatasetSection())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = PairCollator(Collator(pad, pad_to_multiple_of=None))(pairs)
    assert "reference_logps" not in batch  # none computed: SimPO needs none
    out = dpo_loss(adapted, batch, 2.0, "simpo", 0.1, simpo_gamma=0.4)
    out.loss_sum.backward()
    ours = {n: p.grad.clone() for n, p in adapted.named_parameters() if p.grad is not None}
    adapted.zero_grad()
    logps = plain_logps(adapted, [ex for p in pairs for ex in (p.chosen, p.rejected)]).view(-1, 2)
    average = logps / reply_token_counts(batch)
    z = 2.0 * (average[:, 0] - average[:, 1]) - 0.4
    plain = (-0.9 * torch.nn.functional.logsigmoid(z) - 0.1 * torch.nn.functional.logsigmoid(-z)).sum()
    plain.backward()
    assert out.loss_sum.item() == pytest.approx(plain.item(), rel=1e-4)
    assert out.reward_sums.tolist() == pytest.approx((2.0 * average).sum(0).tolist(), rel=1e-4)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, dict(adapted.named_parameters())[name].grad, rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------ the recipe
@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_json(tmp_path_factory.mktemp("pref") / "pairs.json", preference_records(24))


def dpo_cfg(model_dir: Path, pairs_file: Path, **training):  # noqa: F811
    return make_cfg(model_dir, pairs_file, method="dpo", dpo_beta=0.5, learning_rate=2e-2, **training)


def test_ipo_training_prefers_the_preferred_replies(model_dir, pairs_file, tmp_path):  # noqa: F811
    sink = MemorySink()
    cfg = dpo_cfg(model_dir, pairs_file, epochs=6, dpo_loss="ipo")
    run_training(cfg, tmp_path, sink)
    curve = losses(sink)
    # The policy starts as the reference: every margin is 0, so the loss is (0 - 1 / (2 * 0.5))^2 = 1.
    assert curve[0] == pytest.approx(1.0, abs=1e-3)
    assert sum(curve[-10:]) / 10 < 0.5, curve  # the per-token margins moved toward 1
    accuracies = [r["train_accuracy"] for r in sink.metric_rows if "train_accuracy" in r]
    assert sum(accuracies[-10:]) / 10 >= 0.75, accuracies
    assert any("(beta 0.5, loss ipo)" in text for _, text, _ in sink.messages)


def test_dpo_training_prefers_the_preferred_replies(model_dir, pairs_file, tmp_path):  # noqa: F811
    sink = MemorySink()
    cfg = dpo_cfg(model_dir, pairs_file, epochs=6)
    cfg.Dataset.validation_split_percentage = 25
    result = run_training(cfg, tmp_path, sink)
    curve = losses(sink)
    # The policy starts as the reference, so the first step's loss is -log sigmoid(0) = ln 2.
    assert curve[0] == pytest.approx(math.log(2), abs=1e-4)
    # Steps of 4 pairs are noisy: the last 10 steps (two epochs) together.
    assert sum(curve[-10:]) / 10 < 0.6 * math.log(2), curve
    accuracies = [r["train_accuracy"] for r in sink.metric_rows if "train_accuracy" in r]
    margins = [r["train_reward_margin"] for r in sink.metric_rows if "train_reward_margin" in r]
    assert abs(margins[0]) < 1e-4 and sum(margins[-10:]) / 10 > 0.5, margins  # β-scaled, per pair
    # The share of pairs whose preferred reply gained more (at first every margin is 0 up to rounding): most.
    assert sum(accuracies[-10:]) / 10 >= 0.75, accuracies
    valid = [r for r in sink.metric_rows if "valid_loss" in r]
    assert valid[-1]["valid_loss"] < 0.5 * math.log(2) and valid[-1]["valid_mean_token_accuracy"] >= 0.8, valid
    last = valid[-1]  # DPO's implicit rewards beta * (log π - log π_ref), per pair
    assert last["valid_reward_margin"] == pytest.approx(
        last["valid_reward_chosen"] - last["valid_reward_rejected"], abs=1e-5
    )
    # A held-out loss under ln(2) / 2 needs the preferred replies clearly ahead, and further than at first.
    assert last["valid_reward_margin"] > 1.0 and last["valid_reward_margin"] > valid[0]["valid_reward_margin"]
    assert any("DPO reference: log-probabilities of 24 pairs" in text for _, text, _ in sink.messages)
    assert any("18 training and 6 validation preference pairs" in text for _, text, _ in sink.messages)
    reference = load_file(str(tmp_path / REFERENCE_FILE))["logps"]
    assert reference.shape == (24, 2) and bool((reference < 0).all())
    assert json.loads((Path(result.adapter_dir) / "training_config.json").read_text())["Training"]["method"] == "dpo"


def test_simpo_training_prefers_the_preferred_replies_without_a_reference_pass(model_dir, pairs_file, tmp_path):  # noqa: F811
    sink = MemorySink()
    assert TrainingSection(method="dpo", dpo_loss="simpo").dpo_beta == 2.0  # SimPO's beta unless given
    assert TrainingSection(method="dpo", dpo_loss="simpo", dpo_beta=3.0).dpo_beta == 3.0
    for kept in (TrainingSection(), TrainingSection(method="dpo", dpo_loss="simpo")):  # a stored config reloads
        assert TrainingSection.model_validate(kept.model_dump()) == kept
    cfg = make_cfg(model_dir, pairs_file, method="dpo", dpo_loss="simpo", dpo_beta=2.5, learning_rate=2e-2, epochs=6)
    run_training(cfg, tmp_path, sink)
    curve = losses(sink)
    # No reference: the first loss is that of the untrained model's margins (less gamma 0.5), not ln 2.
    assert sum(curve[-10:]) / 10 < 0.6 * curve[0], curve
    accuracies = [r["train_accuracy"] for r in sink.metric_rows if "train_accuracy" in r]
    assert sum(accuracies[-10:]) / 10 >= 0.75, accuracies
    assert not any("DPO reference" in text for _, text, _ in sink.messages)
    assert not (tmp_path / REFERENCE_FILE).exists()


def test_a_stopped_dpo_job_resumes_with_its_reference_to_the_same_adapter(model_dir, pairs_file, tmp_path):  # noqa: F811
    whole = run_training(dpo_cfg(model_dir, pairs_file, epochs=2), tmp_path / "whole", MemorySink())
    first = MemorySink()
    with pytest.raises(TrainingStopped):
        run_training(dpo_cfg(model_dir, pairs_file, epochs=2), tmp_path / "split", first, should_stop=StopAt(first, 5))
    second = MemorySink()
    resumed = run_training(dpo_cfg(model_dir, pairs_file, epochs=2), tmp_path / "split", second)
    assert not any("DPO reference" in text for _, text, _ in second.messages)  # read back, not recomputed
    a = load_file(str(Path(whole.adapter_dir) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed.adapter_dir) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_composes_with_nls_and_qa_sparsepeft_and_the_merge_keeps_sparsity(
    sparse_model_dir,  # noqa: F811
    pairs_file,
    tmp_path,
):
    from sqft_service.model_ops import merge

    lora = sqft_lora()
    sink = MemorySink()
    result = run_training(dpo_cfg(sparse_model_dir, pairs_file, lora=lora, epochs=2), tmp_path / "out", sink)
    curve = losses(sink)
    # The reference is the quantized sparse base every NLS rank starts as: the first loss is ln 2.
    assert curve[0] == pytest.approx(math.log(2), abs=1e-4) and min(curve) < math.log(2)
    report = merge(str(sparse_model_dir), Path(result.adapter_dir), tmp_path / "merged", sparse=True)
    assert report["zeros_preserved"] is True and report["quantization"]["bits"] == 4


def test_a_supervised_file_in_a_dpo_job_is_refused_naming_the_file(model_dir, tmp_path):  # noqa: F811
    train = write_json(tmp_path / "sft.json", alpaca_records(4))
    with pytest.raises(DataValidationError, match="a dpo job needs preference records") as err:
        run_training(dpo_cfg(model_dir, train), tmp_path / "out", MemorySink())
    assert err.value.param == "training_file"
    assert load_records(train)  # the file itself is fine for a supervised job
