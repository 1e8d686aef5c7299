"""The auto hyperparameter rule: sizes -> values, and which fields it may fill (only the unsent ones)."""

from __future__ import annotations

import json

import pytest

from sqft_service import auto_hparams
from sqft_service.api.fine_tuning.protocol import CreateFineTuningJobRequest
from sqft_service.config import FinetuneConfig, Hyperparameters, resolve_config


def resolve(body: dict, n_records: int | None = 1000, validation: str | None = None) -> FinetuneConfig:
    """As the API does: the body parsed from JSON (so ``model_fields_set`` is what was sent), then resolved."""
    req = CreateFineTuningJobRequest.model_validate_json(json.dumps({"training_file": "file-x", **body}))
    hp = req.hyperparameters
    if req.method is not None and req.method.supervised is not None and req.method.supervised.hyperparameters:
        hp = req.method.supervised.hyperparameters
    return resolve_config(
        FinetuneConfig(General=req.General, Dataset=req.Dataset, Training=req.Training),
        model="m",
        training_file_path="/data/train.json",
        validation_file_path=validation,
        hyperparameters=hp,
        seed=1,
        n_training_records=n_records,
    )


@pytest.mark.parametrize(
    ("n_examples", "batch"),
    [(1, 2), (16, 2), (100, 2), (124, 2), (125, 4), (248, 4), (249, 8), (950, 8), (100_000, 8)],
)
def test_batch_grows_with_the_data_set_while_an_epoch_keeps_32_steps(n_examples, batch):
    choice = auto_hparams.choose(n_examples)
    assert choice.batch_size == batch
    assert (choice.learning_rate, choice.lr_scheduler, choice.r) == (5e-4, "cosine", 16)


@pytest.mark.parametrize(("n_examples", "epochs"), [(1, 2), (60, 2), (600, 2), (1000, 2), (1001, 1), (100_000, 1)])
def test_data_sets_of_up_to_a_thousand_examples_get_a_second_pass(n_examples, epochs):
    assert auto_hparams.choose(n_examples).epochs == epochs


def test_a_request_without_hyperparameters_gets_the_rule():
    # 1000 records, 5% held out -> 950 training examples -> batch 8, 119 steps an epoch, 2 epochs,
    # warmup round(0.06 * 238) = 14.
    cfg = resolve({})
    t, lora = cfg.Training, cfg.General.lora_config
    assert (t.epochs, t.batch_size, t.learning_rate, t.lr_scheduler, t.warmup_steps) == (2, 8, 5e-4, "cosine", 14)
    big = resolve({}, n_records=2000).Training  # 1900 examples: one epoch of 238 steps
    assert (big.epochs, big.batch_size, big.warmup_steps) == (1, 8, 14)
    assert (lora.r, lora.lora_alpha, lora.target_modules) == (16, 32, None)


def test_the_size_counts_what_one_epoch_trains_on():
    ds = FinetuneConfig().Dataset
    assert auto_hparams.training_examples(1000, ds, has_validation_file=False) == 950
    assert auto_hparams.training_examples(1000, ds, has_validation_file=True) == 1000
    capped = ds.model_copy(update={"max_train_samples": 200})
    assert auto_hparams.training_examples(1000, capped, has_validation_file=True) == 200
    # 140 records with a 20% split leave 112 -> batch 2 (not 4): the split is counted.
    assert resolve({"Dataset": {"validation_split_percentage": 20}}, n_records=140).Training.batch_size == 2
    assert resolve({}, n_records=140, validation="/data/val.json").Training.batch_size == 4


def test_tiny_data_sets_keep_the_reference_batch():
    # The test suite's jobs (and any tiny upload) keep the reference's batch of 2, with the second pass.
    cfg = resolve({}, n_records=16)
    assert (cfg.Training.batch_size, cfg.Training.epochs) == (2, 2)


def test_section_values_the_client_sent_win_even_when_they_equal_the_defaults():
    cfg = resolve({"Training": {"batch_size": 2, "epochs": 1}, "General": {"lora_config": {"r": 8, "lora_alpha": 16}}})
    t, lora = cfg.Training, cfg.General.lora_config
    assert (t.batch_size, t.epochs, lora.r, lora.lora_alpha) == (2, 1, 8, 16)
    assert t.learning_rate == 5e-4  # not sent: the rule's


def test_a_client_learning_rate_keeps_the_sections_schedule():
    cfg = resolve({"Training": {"learning_rate": 5e-5}})
    t = cfg.Training
    assert (t.learning_rate, t.lr_scheduler, t.warmup_steps) == (5e-5, "linear", 0)
    assert t.batch_size == 8  # the other fields still follow the rule


def test_the_reference_readme_payload_keeps_every_value_it_sends():
    body = {
        "General": {"lora_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}},
        "Training": {"batch_size": 2, "epochs": 1, "learning_rate": 5e-5, "lr_scheduler": "linear"},
    }
    cfg = resolve(body)
    t, lora = cfg.Training, cfg.General.lora_config
    assert (t.batch_size, t.epochs, t.learning_rate, t.lr_scheduler, t.warmup_steps) == (2, 1, 5e-5, "linear", 0)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (8, 16, 0.1)


def test_openai_hyperparameters_win_and_the_multiplier_scales_the_sections_rate():
    cfg = resolve({"hyperparameters": {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 2}})
    t = cfg.Training
    assert (t.epochs, t.batch_size, t.learning_rate, t.lr_scheduler) == (3, 4, 1e-4, "linear")
    assert cfg.General.lora_config.r == 16  # not an OpenAI field: still the rule's
    via_method = resolve({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 1}}}})
    assert via_method.Training.batch_size == 1


def test_auto_strings_are_unset():
    cfg = resolve({"hyperparameters": {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}})
    assert (cfg.Training.batch_size, cfg.Training.learning_rate) == (8, 5e-4)


def test_an_explicit_rank_gets_twice_its_alpha_and_an_explicit_alpha_stays():
    assert resolve({"General": {"lora_config": {"r": 4}}}).General.lora_config.lora_alpha == 8
    lora = resolve({"General": {"lora_config": {"lora_alpha": 64}}}).General.lora_config
    assert (lora.r, lora.lora_alpha) == (16, 64)


def test_neural_lora_search_keeps_the_rank_its_search_space_was_written_for():
    groups = [["q_proj", "k_proj", "v_proj"], ["up_proj", "down_proj"]]
    body = {"General": {"lora_config": {"neural_lora_search": True, "target_module_groups": groups}}}
    body["General"]["lora_config"]["search_space"] = ["8,6,4", "8,4"]
    lora = resolve(body).General.lora_config
    assert (lora.r, lora.lora_alpha) == (8, 16)


def test_warmup_follows_accumulation_steps_and_max_train_steps():
    # Accumulation 4: micro-batch 8 // 4 = 2, so a step still sees 8 examples (119 steps x 2 epochs).
    cfg = resolve({"Training": {"gradient_accumulation_steps": 4}})
    assert (cfg.Training.batch_size, cfg.Training.warmup_steps) == (2, 14)
    capped = resolve({"Training": {"max_train_steps": 50}})
    assert (capped.Training.warmup_steps, capped.Training.epochs) == (3, 1)  # round(0.06 * 50)


def test_without_a_record_count_the_sections_are_kept():
    cfg = resolve_config(
        FinetuneConfig(),
        model="m",
        training_file_path="/t.json",
        validation_file_path=None,
        hyperparameters=Hyperparameters(),
        seed=1,
    )
    assert (cfg.Training.batch_size, cfg.Training.learning_rate, cfg.General.lora_config.r) == (2, 5e-5, 8)


def test_a_multiplier_past_the_bound_still_names_the_openai_field():
    from sqft_service.errors import InvalidConfigurationError

    with pytest.raises(InvalidConfigurationError) as err:
        resolve({"hyperparameters": {"learning_rate_multiplier": 1e5}})
    assert err.value.param == "hyperparameters.learning_rate_multiplier"


def test_length_limits_left_unset_grow_to_fit_the_records_images(tmp_path):
    """Two 256-token images a record (Gemma 3's): the defaults' text room kept beside them; a limit the client
    sent stays, and the source limit stays within the client's own max_length."""
    from sqft_service.config import DatasetSection

    unset = DatasetSection()
    said = auto_hparams.fit_images(unset, max_images=2, per_image=256)
    assert (unset.max_source_length, unset.max_length) == (384 + 528, 512 + 528)
    assert said == ["`Dataset.max_source_length` 912", "`Dataset.max_length` 1040"]
    capped = DatasetSection.model_validate({"max_length": 600})
    assert auto_hparams.fit_images(capped, max_images=2, per_image=256) == ["`Dataset.max_source_length` 912"]
    assert (capped.max_source_length, capped.max_length) == (600, 600)
    sent = DatasetSection.model_validate({"max_length": 600, "max_source_length": 100})
    assert auto_hparams.fit_images(sent, max_images=2, per_image=256) == []
    assert (sent.max_source_length, sent.max_length) == (100, 600)
    (tmp_path / "config.json").write_text(json.dumps({"mm_tokens_per_image": 256}))
    assert auto_hparams.image_tokens(str(tmp_path)) == 256
    assert auto_hparams.image_tokens(str(tmp_path / "nothing")) is None
    # SmolVLM-256M (Idefics3): 64 tokens a tile, images up to 2,048 pixels split into 512-pixel tiles beside
    # the whole: 17 blocks; with splitting off, one.
    smolvlm = tmp_path / "smolvlm"
    smolvlm.mkdir()
    (smolvlm / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    (smolvlm / "processor_config.json").write_text(json.dumps({"image_seq_len": 64}))
    reader = {"do_image_splitting": True, "size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}}
    (smolvlm / "preprocessor_config.json").write_text(json.dumps(reader))
    assert auto_hparams.image_tokens(str(smolvlm)) == 17 * (64 + auto_hparams.TILE_FRAME_TOKENS)
    (smolvlm / "preprocessor_config.json").write_text(json.dumps(reader | {"do_image_splitting": False}))
    assert auto_hparams.image_tokens(str(smolvlm)) == 64
    # Odd values in a client's model directory are read as unsaid, not raised.
    (smolvlm / "preprocessor_config.json").write_text(json.dumps({"do_image_splitting": True, "size": 2048}))
    assert auto_hparams.image_tokens(str(smolvlm)) == 64
    odd = {"model_type": "llava", "vision_config": {"patch_size": "14", "image_size": 336}}
    (smolvlm / "config.json").write_text(json.dumps(odd))
    (smolvlm / "processor_config.json").write_text(json.dumps({"image_processor": []}))
    assert auto_hparams.image_tokens(str(smolvlm)) is None
    # Qwen2-VL-2B-Instruct's preprocessor_config.json (images up to 12,845,056 pixels, a token per 28 x 28),
    # and transformers 5's way of saving the same budget; a non-number budget is unsaid.
    qwen = tmp_path / "qwen2-vl"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    reader = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2}
    (qwen / "preprocessor_config.json").write_text(json.dumps(reader))
    assert auto_hparams.image_tokens(str(qwen)) == 16384
    saved = {"size": {"shortest_edge": 3136, "longest_edge": 1003520}, "patch_size": 14, "merge_size": 2}
    (qwen / "preprocessor_config.json").write_text(json.dumps(saved))
    assert auto_hparams.image_tokens(str(qwen)) == 1280
    (qwen / "preprocessor_config.json").write_text(json.dumps(reader | {"max_pixels": "many"}))
    assert auto_hparams.image_tokens(str(qwen)) is None
