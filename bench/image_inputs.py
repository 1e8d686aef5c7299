"""What a training batch's images cost the host (vision fine-tuning, ``training/images.py``).

A training example keeps its images as the ``data:`` URLs of its record, and each batch decodes them and
runs the processor's image half (:meth:`ImageInputs.model_inputs`): resize to Gemma 3's 896 x 896,
rescale, normalise; with ``detail: "high"`` also pan-and-scan crops; the batch's examples side by side
on a thread pool (against one thread, turn by turn). The alternative, keeping every
image's ``pixel_values`` from tokenization on, costs memory instead: this prints both, per image, for
JPEG and PNG pictures of a few sizes, with Gemma 3 4B's image processor settings (PIL backend, as
transformers picks without torchvision). Each setup runs ``--repeats`` times, the fastest kept.

Run from the repository root: ``.venv/bin/python -m bench.image_inputs``. Prints a table and writes
``bench/results/<date>-image-inputs-<host>.json``.
"""

from __future__ import annotations

import argparse
import base64
import io
import time
from types import SimpleNamespace

import numpy as np
from bench.throughput.report import write_machine_results

SIZES = [(640, 480, "JPEG"), (1280, 960, "JPEG"), (1920, 1080, "PNG")]


def data_url(width: int, height: int, fmt: str, seed: int = 0) -> str:
    """A photo-like picture (smooth gradients plus noise, so JPEG and PNG sizes are realistic)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, quality=90)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def gemma3_image_inputs():
    """:class:`ImageInputs` over Gemma 3 4B's image processor (its hub ``preprocessor_config.json``)."""
    from transformers import Gemma3ImageProcessorPil

    from sqft_service.training.images import ImageInputs

    image_processor = Gemma3ImageProcessorPil(
        size={"height": 896, "width": 896},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        pan_and_scan_min_crop_size=256,
        pan_and_scan_max_num_crops=4,
        pan_and_scan_min_ratio_to_activate=1.2,
    )
    processor = SimpleNamespace(
        image_processor=image_processor,
        image_token="<start_of_image>",
        model_input_names=["input_ids", "attention_mask", "token_type_ids", "pixel_values"],
        unused_input_names=["num_crops"],
    )
    return ImageInputs(processor)


def main() -> None:
    import torch

    from sqft_service.training.tokenization import TokenizedExample

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="images per timed batch")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = gemma3_image_inputs()
    images_workers = images.workers
    rows = []
    for width, height, fmt in SIZES:
        url = data_url(width, height, fmt)
        for detail in ("low", "high"):
            picture = {"url": url, "detail": detail}
            example = TokenizedExample([0], [0], images=(picture,), image_options=images.options([picture]))
            batch = [example] * args.batch
            best = {}
            for _ in range(args.repeats):
                for workers in (1, images_workers):  # one thread, then the thread pool, turn by turn
                    images.workers = workers
                    t0 = time.perf_counter()
                    media = images.model_inputs(batch)
                    best[workers] = min(best.get(workers, float("inf")), time.perf_counter() - t0)
            pixels = media["pixel_values"]
            rows.append(
                {
                    "image": f"{width}x{height} {fmt}",
                    "data_url_kb": round(len(url) / 1024, 1),
                    "detail": detail,
                    "crops_per_image": pixels.shape[0] // args.batch,
                    "ms_per_image_one_thread": round(1000 * best[1] / args.batch, 2),
                    "ms_per_image": round(1000 * best[images_workers] / args.batch, 2),
                    "pixel_values_mb_per_image": round(pixels.numel() * pixels.element_size() / args.batch / 2**20, 2),
                }
            )
    print(f"{images_workers} image threads")
    print(
        f"{'image':<16} {'data URL':>9} {'detail':>6} {'crops':>5} {'ms/image 1 thread':>18} {'pool':>7} "
        f"{'kept pixels':>12}"
    )
    for r in rows:
        print(
            f"{r['image']:<16} {r['data_url_kb']:>7} KB {r['detail']:>6} {r['crops_per_image']:>5} "
            f"{r['ms_per_image_one_thread']:>18} {r['ms_per_image']:>7} {r['pixel_values_mb_per_image']:>9} MB"
        )
    figures = {"batch": args.batch, "image_threads": images_workers, "rows": rows}
    write_machine_results("image-inputs", args.threads, figures)


if __name__ == "__main__":
    main()
