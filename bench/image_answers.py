"""Image prompts answered together (batch jobs, eval runs: ``InferenceEngine.generate_together``) against one
at a time, as batch lines with images were answered before.

The model is ``bench/vision_training.py``'s SmolVLM-256M-shaped Gemma 3 (random weights: the shapes cost,
not the answers); ``--prompts`` chat prompts, each a question and one 640 x 480 JPEG, get ``--new-tokens``
greedy tokens at most (random weights rarely end sooner). The two setups take turns
``--rounds`` times. Reports requests/s, the speed-up, and whether every answer together equals its answer
alone. Run from the repository root: ``.venv/bin/python -m bench.image_answers``; writes
``bench/results/<date>-image-answers-<host>.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.image_inputs import data_url
from bench.throughput.report import write_machine_results
from bench.vision_training import build


def main() -> None:
    from sqft_service.api.inference.protocol import Message
    from sqft_service.inference.answer import chat_renderer
    from sqft_service.inference.engine import InferenceEngine
    from sqft_service.inference.spec import ModelSpec, Sampling

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build(Path(tmp))
        engine = InferenceEngine(threads=args.threads, max_queue=0, max_models=1, model_cache_dir=None, device="cpu")
        spec = ModelSpec("vlm", str(model_dir))
        prompts = []
        for i in range(args.prompts):
            content = [
                {"type": "text", "text": f"Question {i}: what is in this picture?"},
                {"type": "image_url", "image_url": {"url": data_url(640, 480, "JPEG", seed=i)}},
            ]
            messages = [Message.model_validate({"role": "user", "content": content}).as_dict()]
            prompts.append(engine.prepare(spec, chat_renderer(spec, messages))[0])
        sampling = Sampling(args.new_tokens, temperature=0.0)
        runs: dict[str, list[float]] = {"alone": [], "together": []}
        answers: dict[str, list[str]] = {}
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            answers["alone"] = [engine.generate(spec, ids, sampling)[0].text for ids in prompts]
            runs["alone"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            together = engine.generate_together(spec, prompts, [sampling] * len(prompts))
            answers["together"] = [c.text for c in together]
            runs["together"].append(time.perf_counter() - t0)
    best = {name: min(times) for name, times in runs.items()}
    rates = {name: round(args.prompts / t, 3) for name, t in best.items()}
    same = answers["alone"] == answers["together"]
    print(f"alone: {rates['alone']} requests/s, together: {rates['together']} requests/s")
    print(f"speed-up {best['alone'] / best['together']:.2f}x; answers together equal answers alone: {same}")
    figures = {
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "requests_per_s": rates,
        "speedup": round(best["alone"] / best["together"], 3),
        "answers_equal": same,
        "seconds": {name: [round(t, 2) for t in times] for name, times in runs.items()},
    }
    write_machine_results("image-answers", args.threads, figures)


if __name__ == "__main__":
    main()
