"""``sqft``: serve the API, or run the same operations from a shell."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import UserError
from .model_sources import GGUF_TYPES
from .settings import Settings

log = logging.getLogger("sqft_service.cli")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api.auth import ApiKeys, is_loopback
    from .app import create_app
    from .logs import configure_logging, logging_config

    settings = Settings.from_env().with_overrides(
        host=args.host,
        port=args.port,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        max_concurrent_jobs=args.max_concurrent_jobs,
        runner=args.runner,
        ray_address=args.ray_address,
    )
    configure_logging(settings.log_format)
    if settings.runner == "ray" and (problem := _connect_ray(settings)):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    keys = ApiKeys.parse(settings.api_key)
    if not keys and not is_loopback(settings.host):
        # Without a key anyone who can reach the port could train, read files and cancel jobs.
        print(
            f"error: set SQFT_API_KEY to listen on {settings.host}: without an API key the service "
            "only listens on a loopback address (127.0.0.1, ::1, localhost)",
            file=sys.stderr,
        )
        return 2
    if keys:
        log.info("API keys: %d, projects: %s", len(keys), ", ".join(keys.projects))
    else:
        log.warning(
            "no SQFT_API_KEY: the API is unauthenticated; any local user or process that can reach %s:%s can use it",
            settings.host,
            settings.port,
        )
    banner = f"sqft-service on http://{settings.host}:{settings.port}  (docs: /docs, data: {settings.data_dir})"
    if settings.log_format == "json":
        log.info("%s", banner)  # every line of a JSON log is a JSON object
    else:
        print(banner, flush=True)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_keep_alive=settings.keep_alive_s,
        # Text: uvicorn's own format, as before. JSON: uvicorn's loggers go to the root's JSON handler.
        log_config=logging_config("json") if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
    )
    return 0


def _connect_ray(settings: Settings) -> str | None:
    """Join the Ray cluster before serving (the app's runner then reuses the connection); why not, if not."""
    try:
        from .jobs.ray_runner import connect
    except ImportError as exc:
        return str(exc)
    try:
        connect(settings.ray_address, settings.ray_namespace)
    except ConnectionError as exc:
        return str(exc)
    log.info("jobs run on the Ray cluster at %s", settings.ray_address)
    return None


def _train(args: argparse.Namespace) -> int:
    from .config import FinetuneConfig
    from .training.events import MemorySink
    from .training.recipe import run_training

    cfg = FinetuneConfig.model_validate_json(Path(args.config).read_text())
    sink = MemorySink(echo=True)
    result = run_training(cfg, Path(args.output), sink, model_cache_dir=Path(args.model_cache))
    print(f"adapter: {result.adapter_dir}  steps: {result.steps}  tokens: {result.trained_tokens}")
    return 0


def _emit(result: dict, json_out: str | None) -> None:
    text = json.dumps(result, indent=2, default=str)
    if json_out:
        Path(json_out).write_text(text)
    print(text)


def _sparsify(args: argparse.Namespace) -> int:
    from .model_ops import sparsify

    result = sparsify(
        args.model,
        Path(args.output),
        method=args.method,
        sparsity=args.sparsity,
        pattern=args.pattern,
        calibration_file=args.calibration_file,
        n_calibration=args.n_calibration,
        model_cache_dir=Path(args.model_cache),
        quantization=_gptq(args),
    )
    _emit(result, args.json_out)
    return 0


def _gptq(args: argparse.Namespace) -> dict | None:
    if args.gptq_bits is None:
        return None
    from .jobs.kinds import SparsifyQuantization

    # The API's checks (bits 2-8, a group size that is a multiple of 8), with the flag named in the error.
    try:
        spec = SparsifyQuantization(bits=args.gptq_bits, group_size=args.gptq_group_size)
    except ValueError as exc:
        raise ValueError(f"--gptq-bits / --gptq-group-size: {exc}") from None
    return spec.model_dump()


def _merge(args: argparse.Namespace) -> int:
    from .model_ops import merge

    result = merge(
        args.model,
        Path(args.adapter),
        Path(args.output),
        sparse=args.sparse,
        model_cache_dir=Path(args.model_cache),
        gguf_type=args.gguf,
    )
    _emit(result, args.json_out)
    return 0


def _extract(args: argparse.Namespace) -> int:
    from .model_ops import extract, sub_adapter_ranks

    adapter = Path(args.adapter)
    custom = [int(v) for v in args.custom_config.split(",")] if args.custom_config else None
    ranks = sub_adapter_ranks(adapter, args.version, custom)
    _emit(extract(adapter, Path(args.output), ranks), args.json_out)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation import run_evaluation, trained_sparse
    from .jobs.kinds import EvalCandidate, EvaluateParams
    from .training.events import MemorySink

    candidates = [EvalCandidate(name=args.model, model=args.model)] + [
        EvalCandidate(name=a, model=args.model, adapter=a, sparse=trained_sparse(a), data_format=args.data_format)
        for a in args.adapter
    ]
    params = EvaluateParams(
        candidates=candidates,
        data_path=args.data,
        file=args.data,
        max_samples=args.max_samples,
        generate=not args.no_generate,
        max_new_tokens=args.max_new_tokens,
    )
    rows = run_evaluation(params, MemorySink(echo=True), Path(args.model_cache))
    _emit({"object": "finetune.evaluation", "file": args.data, "data": rows}, args.json_out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sqft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the HTTP service")
    serve.add_argument("--host", help="bind address (env SQFT_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (env SQFT_PORT, default 8015)")
    serve.add_argument("--data-dir", help="state directory (env SQFT_DATA_DIR, default ./sqft-data)")
    serve.add_argument("--max-concurrent-jobs", type=int, help="jobs run at once (env SQFT_MAX_CONCURRENT_JOBS, 1)")
    serve.add_argument(
        "--runner", choices=["subprocess", "ray"], help="where jobs run (env SQFT_RUNNER, default subprocess)"
    )
    serve.add_argument("--ray-address", help="the Ray cluster, host:port or auto (env SQFT_RAY_ADDRESS, default auto)")
    serve.set_defaults(func=_serve)

    train = sub.add_parser("train", help="run one fine-tuning configuration in this process")
    train.add_argument("--config", required=True, help="a JSON file with General / Dataset / Training")
    train.add_argument("--output", required=True, help="output directory")
    train.add_argument("--model-cache", default="./sqft-data/models", help="where converted GGUF models go")
    train.set_defaults(func=_train)

    sparsify = sub.add_parser("sparsify", help="prune a base model (magnitude or Wanda) into a model directory")
    sparsify.add_argument("--model", required=True, help="a model directory or a .gguf file")
    sparsify.add_argument("--method", choices=["magnitude", "wanda"], default="magnitude")
    sparsify.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights to zero per row")
    sparsify.add_argument("--pattern", default=None, help="N:M semi-structured pattern, e.g. 2:4")
    sparsify.add_argument("--calibration-file", default=None, help="Alpaca/chat file for Wanda (default: built-in)")
    sparsify.add_argument("--n-calibration", type=int, default=32)
    sparsify.add_argument(
        "--gptq-bits", type=int, default=None, help="then quantize by GPTQ to this many bits (QA-SparsePEFT's base)"
    )
    sparsify.add_argument("--gptq-group-size", type=int, default=64, help="inputs per GPTQ scale")
    sparsify.add_argument("--output", required=True)
    sparsify.set_defaults(func=_sparsify)

    merge = sub.add_parser("merge", help="merge a PEFT adapter into its base model")
    merge.add_argument("--model", required=True, help="the base: a model directory or a .gguf file")
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--output", required=True)
    merge.add_argument("--sparse", action="store_true", help="SparsePEFT: keep the base's zeros")
    merge.add_argument(
        "--gguf",
        choices=GGUF_TYPES,
        default=None,
        help="also write <output>/model.gguf (base: a .gguf, or a model dir with tokenizer.json), others in this type",
    )
    merge.set_defaults(func=_merge)

    extract = sub.add_parser("extract", help="extract a sub-adapter from an NLS super-adapter")
    extract.add_argument("--adapter", required=True, help="the super-adapter directory")
    extract.add_argument("--version", default="heuristic", help="maximal | heuristic | minimal | a custom name")
    extract.add_argument("--custom-config", default=None, help="comma-separated ranks, group-major")
    extract.add_argument("--output", required=True)
    extract.set_defaults(func=_extract)

    evaluate = sub.add_parser("evaluate", help="score a base model and adapters on the same Alpaca/chat records")
    evaluate.add_argument("--model", required=True, help="the base: a model directory or a .gguf file")
    evaluate.add_argument("--adapter", action="append", default=[], help="a PEFT adapter directory (repeatable)")
    evaluate.add_argument("--data", required=True, help="an Alpaca or chat file (JSON / JSONL)")
    evaluate.add_argument("--data-format", choices=["alpaca", "chat"], default=None, help="how the adapters trained")
    evaluate.add_argument("--max-samples", type=int, default=64)
    evaluate.add_argument("--max-new-tokens", type=int, default=64)
    evaluate.add_argument("--no-generate", action="store_true", help="loss and token accuracy only")
    evaluate.set_defaults(func=_evaluate)

    for cmd in (sparsify, merge, extract, evaluate):
        cmd.add_argument("--json-out", default=None, help="also write the result JSON here")
    for cmd in (sparsify, merge, evaluate):
        cmd.add_argument("--model-cache", default="./sqft-data/models", help="where converted GGUF models go")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as exc:
        # The user's input was wrong: one line on stderr (naming the field where known), exit status 2.
        where = f" ({exc.param})" if isinstance(exc, UserError) and exc.param else ""
        print(f"error{where}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
