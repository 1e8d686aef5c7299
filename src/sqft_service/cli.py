"""``sqft``: serve the API, or run the same operations from a shell."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .settings import Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    settings = Settings.from_env().with_overrides(
        host=args.host,
        port=args.port,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        max_concurrent_jobs=args.max_concurrent_jobs,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(
        f"sqft-service on http://{settings.host}:{settings.port}  (docs: /docs, data: {settings.data_dir})",
        flush=True,
    )
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .config import FinetuneConfig
    from .training.events import MemorySink
    from .training.recipe import run_training

    cfg = FinetuneConfig.model_validate_json(Path(args.config).read_text())
    sink = MemorySink(echo=True)
    result = run_training(cfg, Path(args.output), sink, model_cache_dir=Path(args.model_cache))
    print(f"adapter: {result.adapter_dir}  steps: {result.steps}  tokens: {result.trained_tokens}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sqft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the HTTP service")
    serve.add_argument("--host", help="bind address (env SQFT_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (env SQFT_PORT, default 8015)")
    serve.add_argument("--data-dir", help="state directory (env SQFT_DATA_DIR, default ./sqft-data)")
    serve.add_argument("--max-concurrent-jobs", type=int, help="jobs run at once (env SQFT_MAX_CONCURRENT_JOBS, 1)")
    serve.set_defaults(func=_serve)

    train = sub.add_parser("train", help="run one fine-tuning configuration in this process")
    train.add_argument("--config", required=True, help="a JSON file with General / Dataset / Training")
    train.add_argument("--output", required=True, help="output directory")
    train.add_argument("--model-cache", default="./sqft-data/models", help="where converted GGUF models go")
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
