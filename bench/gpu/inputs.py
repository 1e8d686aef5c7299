"""The model shapes (random-initialised on the device), the data files and the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.throughput.inputs import REPO, gsm8k_as_alpaca

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
NLS_GROUPS = [["q_proj", "k_proj", "v_proj"], ["up_proj"], ["down_proj"]]
# Where the device run finds what it carries (bench/gpu/prepare_carry.sh fills it on a CPU machine).
CARRY = REPO / ".gpu-carry"

# The published configs of the models (their config.json), as LlamaConfig arguments. The vocabulary is
# the model's own (the lm_head is a large part of the cost); token ids come from SmolLM2's tokenizer,
# which fits inside every one of them.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    # --tiny: the script's own check, on a CPU in seconds.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
}


def linear_params(shape: str) -> int:
    """N: the weights of every linear layer (attention, MLP, lm_head): the matmuls a token goes through."""
    c = SHAPES[shape]
    h, i, heads, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim", h // heads)
    per_layer = 2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * i
    return c["num_hidden_layers"] * per_layer + h * c["vocab_size"]


def build_model(shape: str, device: str, sparse: bool = False):
    """A random-initialised fp32 ``LlamaForCausalLM`` of ``shape``, built directly on ``device``.

    ``sparse``: 50% magnitude-pruned decoder linears (the SparsePEFT starting point).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if sparse:
        from sqft_service.adapters.sparsify import sparsify_model

        sparsify_model(model, "magnitude", 0.5)
    return model


def data_dir(arg: str | None) -> Path:
    for root in [Path(arg)] if arg else [REPO.parent / "shared" / "data", Path("/work/shared/data"), CARRY / "data"]:
        if (root / "arce_train_instruct.json").is_file():
            return root
    raise SystemExit("no data: pass --data-dir with arce_train_instruct.json and gsm8k_train.jsonl")


def data_file(name: str, root: Path, work: Path) -> str:
    """An Alpaca JSON file of the data set ``name`` ("arce" or "gsm8k")."""
    if name == "arce":
        return str(root / "arce_train_instruct.json")
    target = work / "gsm8k_alpaca.json"
    if not target.is_file():
        gsm8k_as_alpaca(root / "gsm8k_train.jsonl", target)
    return str(target)


def tokenizer_dir(arg: str | None, work: Path) -> str:
    """A saved tokenizer directory: the given one, the carried one, or SmolLM2's, read from its GGUF."""
    for candidate in [Path(arg)] if arg else [CARRY / "tokenizer"]:
        if (candidate / "tokenizer_config.json").is_file():
            return str(candidate)
    if arg:
        raise SystemExit(f"--tokenizer {arg}: no tokenizer_config.json there")
    from bench.throughput.inputs import default_model
    from transformers import AutoTokenizer

    gguf = default_model()
    out = work / "tokenizer"
    if not (out / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return str(out)


def describe_data(path: str) -> dict[str, Any]:
    records = json.loads(Path(path).read_text())
    return {"file": Path(path).name, "records": len(records)}
