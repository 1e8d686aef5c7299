"""Reinforcement fine-tuning (GRPO): prompts, advantages, the loss against a plain computation, the recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sqft_service.adapters.lora import build_peft_model
from sqft_service.config import FinetuneConfig, LoraSection
from sqft_service.training.events import MemorySink
from sqft_service.training.loss import label_positions
from sqft_service.training.recipe import TrainingStopped, run_training
from sqft_service.training.records import DataValidationError
from sqft_service.training.reinforcement import (
    Rollout,
    grade_answers,
    group_advantages,
    policy_gradient_loss,
    rollout_batch,
    score_answers,
    token_logps,
    tokenize_prompts,
)
from sqft_service.training.sampling import sample_answers
from tests.conftest import make_tiny_llama, randomize_b
from tests.helpers import write_jsonl
from tests.unit.test_recipe import make_cfg, model_dir, sparse_model_dir, sqft_lora  # noqa: F401
from tests.unit.test_resume import StopAt

pytestmark = pytest.mark.usefixtures("one_thread")

SIMILARITY = {
    "type": "text_similarity",
    "name": "close",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "evaluation_metric": "fuzzy_match",
    "pass_threshold": 0.5,
}


def prompt_records(n: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"Name colour number {i}."}], "answer": ["red", "green"][i % 2]}
        for i in range(n)
    ]


def test_group_advantages_are_centred_and_scaled_per_group():
    scores = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.2, 0.4, 0.6]])
    adv = group_advantages(scores)
    assert torch.allclose(adv.mean(1), torch.zeros(3), atol=1e-6)
    assert torch.equal(adv[1], torch.zeros(4))  # one score for all: no signal
    expected = (scores[2] - 0.3) / (scores[2].std() + 1e-4)
    assert torch.allclose(adv[2], expected)
    assert adv[0, 0] > 0 > adv[0, 1]


def test_prompts_render_as_serving_does_and_check_the_graders_fields(tokenizer):
    records = [
        {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "answer": "x"}
    ]
    prompts, dropped = tokenize_prompts(records, tokenizer, SIMILARITY, 512)
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert tokenizer.decode(prompts[0].ids) == expected and dropped == 0
    assert prompts[0].item == records[0]  # the whole line: the grader may read `item.messages` too
    assert tokenize_prompts(records, tokenizer, SIMILARITY, 5) == ([], 1)  # no room left to answer
    with pytest.raises(DataValidationError, match=r"record 2: the grader's `reference` template can't read it"):
        tokenize_prompts([*records, {"messages": [{"role": "user", "content": "?"}]}], tokenizer, SIMILARITY, 512)


def test_sampled_answers_stop_after_their_end_token(tokenizer):
    torch.manual_seed(0)
    model = make_tiny_llama(len(tokenizer))
    eos = tokenizer.eos_token_id
    prompts = [[1, 2, 3], [4, 5]]
    answers = sample_answers(model, prompts, 3, max_tokens=6, temperature=1.0, pad_id=eos, eos_ids=[eos])
    assert len(answers) == 6 and all(1 <= len(a) <= 6 for a in answers)
    assert all(eos not in a[:-1] for a in answers)
    greedy = sample_answers(model, prompts, 1, max_tokens=6, temperature=None, pad_id=eos, eos_ids=[eos])
    again = sample_answers(model, prompts, 1, max_tokens=6, temperature=None, pad_id=eos, eos_ids=[eos])
    assert greedy == again  # greedy: no draw
    # Left padding changes nothing: the short prompt alone gives the same greedy answer.
    assert sample_answers(model, [[4, 5]], 1, max_tokens=6, temperature=None, pad_id=eos, eos_ids=[eos]) == greedy[1:]


def test_a_group_shares_its_prompts_cache_and_decodes_as_each_prompt_alone(tokenizer):
    """group > 1 reads each prompt once and repeats its cache: at a temperature near 0 every row of every
    group is the prompt's own greedy answer, the shorter (left-padded) prompt's too."""
    model = make_tiny_llama(len(tokenizer), seed=1)
    eos = tokenizer.eos_token_id
    prompts = [[1, 7, 9, 3, 11], [4, 5], [6]]
    alone = [
        sample_answers(model, [p], 1, max_tokens=8, temperature=None, pad_id=eos, eos_ids=[eos])[0] for p in prompts
    ]
    torch.manual_seed(0)
    grouped = sample_answers(model, prompts, 3, max_tokens=8, temperature=1e-6, pad_id=eos, eos_ids=[eos])
    assert grouped == [a for a in alone for _ in range(3)]


@pytest.mark.parametrize("device_path", [False, True])
def test_policy_gradient_loss_and_gradients_equal_the_plain_computation(tokenizer, device_path):
    torch.manual_seed(0)
    model, _ = build_peft_model(make_tiny_llama(len(tokenizer)), LoraSection(r=4, lora_alpha=8, lora_dropout=0.0))
    randomize_b(model)
    rollouts = [
        Rollout([5, 6, 7], [8, 9], 1.5),
        Rollout([5, 6], [10, 11, 12], -0.5),
        Rollout([4], [13], 0.25),
    ]
    batch = rollout_batch(rollouts, pad_id=0)
    assert batch["n_label_tokens"] == 6 and batch["n_real_tokens"] == 12 and batch["n_padded_tokens"] == 15
    out = policy_gradient_loss(model, label_positions(batch) if device_path else batch)
    out.loss_sum.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    plain = torch.zeros(())
    for r in rollouts:  # -A * log p(answer token), one sequence at a time, from the full logits
        ids = torch.tensor([r.prompt + r.answer])
        logps = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        picked = logps.gather(1, targets[:, None]).squeeze(1)[len(r.prompt) - 1 :]
        plain = plain - r.advantage * picked.sum()
    plain.backward()
    assert out.loss_sum.item() == pytest.approx(plain.item(), rel=1e-5)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-6)


def test_one_step_raises_the_better_answers_probability(tokenizer):
    """The direction of the update: the answer with the positive advantage gains, the other loses."""
    torch.manual_seed(0)
    model, _ = build_peft_model(make_tiny_llama(len(tokenizer)), LoraSection(r=4, lora_alpha=8, lora_dropout=0.0))
    good, bad = Rollout([5, 6, 7], [20, 21, 22], 1.0), Rollout([5, 6, 7], [30, 31, 32], -1.0)

    def logp(r: Rollout) -> float:
        with torch.no_grad():
            return -policy_gradient_loss(model, rollout_batch([Rollout(r.prompt, r.answer, 1.0)], 0)).loss_sum.item()

    before = logp(good), logp(bad)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = rollout_batch([good, bad], pad_id=0)
    (policy_gradient_loss(model, batch).loss_sum / batch["n_label_tokens"]).backward()
    optimizer.step()
    after = logp(good), logp(bad)
    assert after[0] > before[0] and after[1] < before[1], (before, after)


# ------------------------------------------------------------------ the recipe
@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("rl") / "prompts.jsonl", prompt_records(12))


def rl_cfg(model_dir: Path, prompts_file: Path, lora: LoraSection | None = None, **training) -> FinetuneConfig:  # noqa: F811
    training = {"epochs": 1, "rl_max_tokens": 6, "rl_group_size": 3, "rl_grader": SIMILARITY, **training}
    cfg = make_cfg(model_dir, prompts_file, lora=lora, method="reinforcement", **training)
    cfg.Training.batch_size = 2
    cfg.Dataset.max_length = 64
    return cfg


def test_a_reinforcement_job_samples_grades_and_saves_an_adapter(model_dir, prompts_file, tmp_path):  # noqa: F811
    sink = MemorySink()
    cfg = rl_cfg(model_dir, prompts_file, eval_steps=2)
    cfg.Dataset.validation_split_percentage = 25
    result = run_training(cfg, tmp_path, sink)
    assert result.steps == 5  # 9 training prompts, 2 a step
    rewards = {r["step"]: r["train_reward_mean"] for r in sink.metric_rows if "train_reward_mean" in r}
    assert sorted(rewards) == [1, 2, 3, 4, 5]  # every step's row (evaluations emit a row again)
    assert all(0.0 <= r <= 1.0 for r in rewards.values()) and any(r > 0 for r in rewards.values())
    # A step's time (and so the ETA) includes its sampling.
    first = next(r for r in sink.metric_rows if r["step"] == 1)
    assert 0 < first["rollout_s"] <= first["step_s"]
    valid = [r["valid_reward_mean"] for r in sink.metric_rows if "valid_reward_mean" in r]
    assert len(valid) >= 2 and all(0.0 <= v <= 1.0 for v in valid)
    lengths = [r[k] for r in sink.metric_rows for k in ("train_answer_tokens", "valid_answer_tokens") if k in r]
    assert len(lengths) >= 7 and all(1.0 <= n <= 6.0 for n in lengths)  # rl_max_tokens 6
    assert any("9 training and 3 validation prompts" in text for _, text, _ in sink.messages)
    assert any("step 1: sampled 6 answers" in text for _, text, _ in sink.messages)
    weights = load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())  # it moved
    saved = json.loads((Path(result.adapter_dir) / "training_config.json").read_text())["Training"]
    assert saved["method"] == "reinforcement" and saved["rl_grader"] == SIMILARITY


def test_a_stopped_reinforcement_job_resumes_to_the_same_adapter(model_dir, prompts_file, tmp_path):  # noqa: F811
    whole = run_training(rl_cfg(model_dir, prompts_file, epochs=2), tmp_path / "whole", MemorySink())
    first = MemorySink()
    with pytest.raises(TrainingStopped):
        run_training(rl_cfg(model_dir, prompts_file, epochs=2), tmp_path / "split", first, should_stop=StopAt(first, 4))
    resumed = run_training(rl_cfg(model_dir, prompts_file, epochs=2), tmp_path / "split", MemorySink())
    a = load_file(str(Path(whole.adapter_dir) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed.adapter_dir) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_reinforcement_job_refuses_supervised_records(model_dir, tmp_path):  # noqa: F811
    chat = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "answer": "b"}]
    cfg = rl_cfg(model_dir, write_jsonl(tmp_path / "chat.jsonl", chat))
    with pytest.raises(DataValidationError, match="this file holds chat records; a reinforcement job needs prompt"):
        run_training(cfg, tmp_path / "out", MemorySink())


def test_answers_the_grader_cannot_grade_score_zero_and_records_are_checked_for_their_own_fields(tokenizer):
    json_grader = {**SIMILARITY, "input": "{{ sample.output_json.colour }}"}
    records = prompt_records(2)
    # The sample's fields can't be known before sampling: only the record's own are checked.
    prompts, _ = tokenize_prompts(records, tokenizer, json_grader, 512)
    assert len(prompts) == 2
    items, texts = [p.item for p in prompts], ['{"colour": "red"}', "red"]
    assert grade_answers(json_grader, items, texts) == [1.0, None]  # the second is not JSON: no `colour`
    scores, failed = score_answers(json_grader, items, texts, judge=lambda: None)
    assert scores == [1.0, 0.0] and failed == 1


JUDGE = {
    "type": "score_model",
    "name": "judge",
    "model": "judge",
    "input": [
        {"role": "system", "content": "Score from 0 to 1 how close the answer is to {{ item.answer }}."},
        {"role": "user", "content": "{{ sample.output_text }}"},
    ],
    "range": [0, 1],
}


def test_a_model_grader_judges_every_answer_on_an_engine_of_the_job(model_dir, prompts_file, tmp_path):  # noqa: F811
    from sqft_service.inference.spec import ModelSpec

    sink = MemorySink()
    cfg = rl_cfg(model_dir, prompts_file, max_train_steps=2, rl_grader=JUDGE)
    result = run_training(cfg, tmp_path, sink, judges={"judge": ModelSpec("judge", str(model_dir))})
    assert result.steps == 2
    sampled = [text for _, text, _ in sink.messages if text.startswith("step ")]
    assert len(sampled) == 2 and all("sampled 6 answers" in text for text in sampled), sampled
    rewards = [r["train_reward_mean"] for r in sink.metric_rows if "train_reward_mean" in r]
    assert rewards and all(0.0 <= r <= 1.0 for r in rewards)  # the judge's answers are held to [0, 1]


def test_judged_scores_are_the_judges_verdicts(model_dir):  # noqa: F811
    from sqft_service.inference.engine import InferenceEngine
    from sqft_service.inference.spec import ModelSpec
    from sqft_service.jobs.batch import Answerer
    from sqft_service.training.reinforcement import judge_answers

    engine = InferenceEngine(threads=1, max_queue=0, max_models=1, model_cache_dir=None)
    answerer = Answerer(engine, {"judge": ModelSpec("judge", str(model_dir))})
    label = {**JUDGE, "type": "label_model", "labels": ["close", "far"], "passing_labels": ["close"]}
    label.pop("range")
    items = [{"answer": "red"}, {"answer": "green"}, {"answer": "red"}]
    scores = judge_answers(answerer, label, items, ["red", "blue", "crimson"])
    # A label judge's answer is one of its labels (held by the schema): 1 for a passing label, else 0.
    assert len(scores) == 3 and set(scores) <= {0.0, 1.0}
    bad = {**JUDGE, "sampling_params": {"max_completions_tokens": 2}}  # too few tokens for a verdict
    assert judge_answers(answerer, bad, items, ["red", "blue", "crimson"]) == [None, None, None]
    json_judge = {**JUDGE, "input": [{"role": "user", "content": "{{ sample.output_json.colour }}"}]}
    # No answer is JSON: none could be put to the judge.
    assert judge_answers(answerer, json_judge, items, ["red", "blue", "crimson"]) == [None, None, None]


def test_every_step_samples_anew_even_when_its_prompts_repeat(model_dir, tmp_path):  # noqa: F811
    """Two prompts, a batch of two, three epochs: the same prompts every step, new answers every step."""
    cfg = rl_cfg(model_dir, write_jsonl(tmp_path / "two.jsonl", prompt_records(2)), epochs=3)
    sink = MemorySink()
    run_training(cfg, tmp_path / "out", sink)
    sampled = [text.split(":")[0] for _, text, _ in sink.messages if text.startswith("step ")]
    assert sampled == ["step 1", "step 2", "step 3"]


def test_out_of_memory_retrains_the_same_answers_in_smaller_passes(model_dir, prompts_file, tmp_path):  # noqa: F811
    from sqft_service.training.rl_recipe import ReinforcementRecipe

    def train(out: Path, holds: int | None) -> tuple[MemorySink, dict]:
        sink = MemorySink()
        recipe = ReinforcementRecipe(rl_cfg(model_dir, prompts_file, max_train_steps=3), out, sink)
        recipe.setup()

        def device_limit(_module, args):  # training passes only: sampling runs without gradients
            if holds is not None and torch.is_grad_enabled() and args[0].shape[0] > holds:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

        recipe.model.get_base_model().model.layers[-1].register_forward_pre_hook(device_limit)
        recipe.train()
        recipe.cleanup()
        return sink, load_file(str(out / "adapter" / "adapter_model.safetensors"))

    fits_sink, fits = train(tmp_path / "fits", None)
    tight_sink, tight = train(tmp_path / "tight", 3)  # a step's 2 prompts x 3 answers: one prompt a pass
    assert any("out of memory in step" in text for level, text, _ in tight_sink.messages if level == "warn")
    sampled = [text.split(":")[0] for _, text, _ in tight_sink.messages if text.startswith("step ")]
    assert sampled == ["step 1", "step 2", "step 3"]  # the retry trained the step's answers, not new ones
    rewards = [r["train_reward_mean"] for r in fits_sink.metric_rows if "train_reward_mean" in r]
    assert rewards == [r["train_reward_mean"] for r in tight_sink.metric_rows if "train_reward_mean" in r]
    for key in fits:
        torch.testing.assert_close(tight[key], fits[key], rtol=1e-4, atol=1e-6, msg=key)


def test_sqft_adapters_train_by_reinforcement_and_merge_keeping_sparsity_and_the_int4_grid(
    sparse_model_dir,  # noqa: F811
    prompts_file,
    tmp_path,
):
    from sqft_service.model_ops import merge

    lora = sqft_lora()
    sink = MemorySink()
    # Two updates per sampling and a KL penalty: the base's log-probabilities with the SQFT adapter off.
    extra = {"rl_updates_per_sample": 2, "rl_kl_beta": 0.05}
    cfg = rl_cfg(sparse_model_dir, prompts_file, lora=lora, max_train_steps=3, **extra)
    result = run_training(cfg, tmp_path / "out", sink)
    assert result.steps == 3 and any("nls_stats" in r for r in sink.metric_rows)
    report = merge(str(sparse_model_dir), Path(result.adapter_dir), tmp_path / "merged", sparse=True)
    assert report["zeros_preserved"] is True and report["quantization"]["bits"] == 4


def test_a_model_grader_without_its_judge_fails_before_training(model_dir, prompts_file, tmp_path):  # noqa: F811
    with pytest.raises(DataValidationError, match="the grader's judge `judge` was not resolved for this job"):
        run_training(rl_cfg(model_dir, prompts_file, rl_grader=JUDGE), tmp_path, MemorySink())


EXACT = {"type": "string_check", "name": "e", "input": "{{ sample.output_text }}", "reference": "{{ item.answer }}"}
EXACT["operation"] = "eq"


def test_a_multi_grader_scores_each_answer_by_its_formula_and_an_ungradable_part_scores_zero(tokenizer):
    multi = {
        "type": "multi",
        "name": "both",
        "graders": {"exact": EXACT, "json": {**EXACT, "input": "{{ sample.output_json.colour }}"}},
        "calculate_output": "0.25 * exact + 0.75 * json",
    }
    items = [{"answer": "red"}] * 3
    texts = ["red", '{"colour": "red"}', "blue"]
    scores, failed = score_answers(multi, items, texts, judge=lambda: None)
    # "red": exact 1, but not JSON (json can't grade it): 0, counted; the JSON one: exact 0, json 1; "blue": 0.
    assert scores == [0.0, 0.75, 0.0] and failed == 2
    divided = {**multi, "calculate_output": "exact / json"}
    json_only = ['{"colour": "blue"}']
    assert score_answers(divided, items[:1], json_only, judge=lambda: None) == ([0.0], 1)  # 0 / 0: no value


def test_a_multi_grader_with_a_judge_trains(model_dir, prompts_file, tmp_path):  # noqa: F811
    from sqft_service.inference.spec import ModelSpec

    multi = {
        "type": "multi",
        "name": "blend",
        "graders": {"close": SIMILARITY, "judge": {**JUDGE, "range": [0, 1]}},
        "calculate_output": "max(close, judge) - 0.5 * min(close, judge)",
    }
    sink = MemorySink()
    cfg = rl_cfg(model_dir, prompts_file, max_train_steps=2, rl_grader=multi)
    with pytest.raises(DataValidationError, match="the grader's judge `judge` was not resolved"):
        run_training(cfg, tmp_path / "no-judge", MemorySink())
    result = run_training(cfg, tmp_path, sink, judges={"judge": ModelSpec("judge", str(model_dir))})
    assert result.steps == 2
    rewards = [r["train_reward_mean"] for r in sink.metric_rows if "train_reward_mean" in r]
    assert len(rewards) == 2 and all(0.0 <= r <= 1.0 for r in rewards)  # max - min/2 of two scores in [0, 1]


@pytest.mark.parametrize("device_path", [False, True])
def test_the_clipped_ratio_and_kl_loss_equal_the_plain_computation(tokenizer, device_path):
    """GRPO's loss with kept log-probabilities against a per-sequence computation from the full logits:
    ``-min(r A, clip(r) A) + beta (exp(ref - logp) - (ref - logp) - 1)``, ``r = exp(logp - old)``."""
    torch.manual_seed(0)
    model, _ = build_peft_model(make_tiny_llama(len(tokenizer)), LoraSection(r=4, lora_alpha=8, lora_dropout=0.0))
    randomize_b(model)
    # Old log-probabilities far enough from the model's that some ratios leave [0.8, 1.3] both ways.
    shifts = [[0.5, -0.4], [-0.3, 0.02, 0.6], [0.0]]
    rollouts = []
    for (prompt, answer, adv), shift in zip(
        [([5, 6, 7], [8, 9], 1.5), ([5, 6], [10, 11, 12], -0.5), ([4], [13], 0.25)], shifts, strict=True
    ):
        r = Rollout(prompt, answer, adv)
        (now,) = token_logps(model, [r], 0, torch.device("cpu"))
        r.old_logps = [v + s for v, s in zip(now, shift, strict=True)]
        r.ref_logps = [v - 0.7 * s for v, s in zip(now, shift, strict=True)]
        rollouts.append(r)
    batch = rollout_batch(rollouts, pad_id=0)
    beta, clip = 0.3, (0.2, 0.3)
    out = policy_gradient_loss(model, label_positions(batch) if device_path else batch, clip=clip, kl_beta=beta)
    out.loss_sum.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    plain = torch.zeros(())
    clipped_somewhere = set()
    for r in rollouts:
        ids = torch.tensor([r.prompt + r.answer])
        logps = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        picked = logps.gather(1, ids[0, 1:, None]).squeeze(1)[len(r.prompt) - 1 :]
        ratio = torch.exp(picked - torch.tensor(r.old_logps))
        clipped_somewhere |= {"low" for v in ratio if v < 1 - clip[0]} | {"high" for v in ratio if v > 1 + clip[1]}
        surrogate = torch.minimum(ratio * r.advantage, ratio.clamp(1 - clip[0], 1 + clip[1]) * r.advantage)
        gap = torch.tensor(r.ref_logps) - picked
        plain = plain + (-surrogate + beta * (torch.exp(gap) - gap - 1)).sum()
    plain.backward()
    assert clipped_somewhere == {"low", "high"}  # the case exercises both bounds
    assert out.loss_sum.item() == pytest.approx(plain.item(), rel=1e-5)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-6)


def test_several_updates_per_sampling_train_its_answers_again_and_resume_exactly(model_dir, prompts_file, tmp_path):  # noqa: F811
    """rl_updates_per_sample 2: every sampling trains two steps; a job stopped between them resumes on the
    answers it kept, to the same adapter; a KL penalty's base log-probabilities are the base's."""

    def cfg():
        return rl_cfg(model_dir, prompts_file, rl_updates_per_sample=2, rl_kl_beta=0.1, max_train_steps=6)

    sink = MemorySink()
    whole = run_training(cfg(), tmp_path / "whole", sink)
    assert whole.steps == 6  # 12 prompts, 2 a step: 6 samplings of 2 steps each, cut at 6
    sampled = [text.split(":")[0] for _, text, _ in sink.messages if text.startswith("step ")]
    assert sampled == ["step 1", "step 3", "step 5"]
    by_step = {r["step"]: r for r in sink.metric_rows if "train_reward_mean" in r}
    rows = [by_step[step] for step in sorted(by_step)]
    rewards = [r["train_reward_mean"] for r in rows]
    assert rewards[0] == rewards[1] and rewards[2] == rewards[3]  # a sampling's answers, trained twice
    # The KL to the base: 0 while the adapter adds nothing (LoRA's B starts at 0), then more.
    assert rows[0]["train_kl"] == 0.0 and all(r["train_kl"] > 0 for r in rows[1:])
    assert all(0.0 <= r["train_clip_fraction"] <= 1.0 for r in rows) and rows[0]["train_clip_fraction"] == 0.0
    assert rows[0]["rollout_s"] > 0 and rows[1]["rollout_s"] == 0.0  # the second step of a sampling samples nothing
    assert not list((tmp_path / "whole").glob(".rl-sampling-*"))  # kept answers go when the job ends
    first = MemorySink()
    with pytest.raises(TrainingStopped):  # stopped after step 3, the first of a sampling's two
        run_training(cfg(), tmp_path / "split", first, should_stop=StopAt(first, 3))
    kept = torch.load(next((tmp_path / "split").glob(".rl-sampling-00000002.*")), weights_only=True)
    rows = [r for rows in kept["rollouts"].values() for r in rows]
    assert rows and all(len(r["old_logps"]) == len(r["answer"]) == len(r["ref_logps"]) for r in rows)
    second = MemorySink()
    resumed = run_training(cfg(), tmp_path / "split", second)
    assert next(t for _, t, _ in second.messages if t.startswith("step ")).startswith("step 5")  # no new sampling
    a = load_file(str(Path(whole.adapter_dir) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed.adapter_dir) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_kl_penalty_reads_the_base_model_with_the_adapter_off(model_dir, prompts_file, tmp_path):  # noqa: F811
    """At the first sampling the adapter adds nothing yet (LoRA's B starts at 0): the sampling policy's
    and the base's log-probabilities are the same numbers."""
    cfg = rl_cfg(model_dir, prompts_file, rl_updates_per_sample=2, rl_kl_beta=1.0, max_train_steps=2)
    first = MemorySink()
    with pytest.raises(TrainingStopped):
        run_training(cfg, tmp_path, first, should_stop=StopAt(first, 1))
    kept = torch.load(next(tmp_path.glob(".rl-sampling-00000000.*")), weights_only=True)
    rows = [r for rows in kept["rollouts"].values() for r in rows]
    assert len(rows) == 6  # with a KL penalty every answer trains, whatever its advantage
    assert all(r["old_logps"] == r["ref_logps"] for r in rows)


COLOUR_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "colour",
        "schema": {
            "type": "object",
            "properties": {"colour": {"type": "string", "enum": ["red", "green"]}},
            "required": ["colour"],
            "additionalProperties": False,
        },
    },
}


def test_a_response_format_holds_every_sampled_answer_to_its_schema(model_dir, prompts_file, tmp_path):  # noqa: F811
    from sqft_service.training.rl_recipe import ReinforcementRecipe

    grader = {**EXACT, "input": "{{ sample.output_json.colour }}"}
    cfg = rl_cfg(model_dir, prompts_file, rl_response_format=COLOUR_FORMAT, rl_grader=grader, rl_max_tokens=24)
    recipe = ReinforcementRecipe(cfg, tmp_path / "recipe", MemorySink())
    recipe.setup()
    answers = recipe._sample(recipe.train_examples[:4], 3, 1.0, seed=0)
    texts = recipe._texts(answers)
    # A random model, sampled at temperature 1, answers the schema's JSON every time, and stops after it.
    assert len(texts) == 12 and all(json.loads(t)["colour"] in ("red", "green") for t in texts), texts
    assert all(a[-1] in recipe._eos_ids() for a in answers)
    _, failed = recipe._grade([p.item for p in recipe.train_examples[:4] for _ in range(3)], answers)
    assert failed == 0  # every answer has the `colour` the grader reads
    recipe.cleanup()
    sink = MemorySink()
    cfg.Training.max_train_steps = 2
    assert run_training(cfg, tmp_path / "job", sink).steps == 2
    rewards = [r["train_reward_mean"] for r in sink.metric_rows if "train_reward_mean" in r]
    assert rewards and all(0.0 <= r <= 1.0 for r in rewards)
