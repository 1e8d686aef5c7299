"""Tokenizers as the hub's model directories hold them, for the GGUF export tests and ``gguf_hf_llamacpp``.

No hub directory can be downloaded here, so these rebuild the parts that matter: the pre-tokenizers of
Llama 3's, Qwen2's, Phi-4-mini's (GPT-4o's) and SmolLM2's ``tokenizer.json`` as the hub files spell
them, and a Llama 2-style tokenizer made the way Llama 2's and Mistral's were (a SentencePiece BPE model
with byte fallback, converted by transformers into ``tokenizer.json``).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

# Llama 3's tokenizer.json pre-tokenizer, as the hub file spells it.
LLAMA3_PRE = {
    "type": "Sequence",
    "pretokenizers": [
        {
            "type": "Split",
            "pattern": {
                "Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
                "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
            },
            "behavior": "Isolated",
            "invert": False,
        },
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ],
}
# Qwen2's: Llama 3's with every digit alone.
QWEN2_PRE = {
    **LLAMA3_PRE,
    "pretokenizers": [
        {
            **LLAMA3_PRE["pretokenizers"][0],
            "pattern": {"Regex": LLAMA3_PRE["pretokenizers"][0]["pattern"]["Regex"].replace("{1,3}", "")},
        },
        LLAMA3_PRE["pretokenizers"][1],
    ],
}
# GPT-4o's (o200k), as Phi-4-mini's tokenizer.json spells it: Llama 3's shape with another split.
GPT4O_PRE = {
    **LLAMA3_PRE,
    "pretokenizers": [
        {
            **LLAMA3_PRE["pretokenizers"][0],
            "pattern": {
                "Regex": "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+"
                "(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+"
                "[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
                "[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
            },
        },
        LLAMA3_PRE["pretokenizers"][1],
    ],
}
# SmolLM2's on the hub: every digit alone, then GPT-2's byte-level split.
SMOLLM_PRE = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def sentencepiece_tokenizer(out_dir: Path, lines: Iterable[str], vocab_size: int = 800, style: str = "llama"):
    """A Llama 2-style (or Gemma-style) tokenizer trained on ``lines``, saved in ``out_dir``
    (``tokenizer.model`` and what transformers writes from it: ``tokenizer.json``), and returned.

    Llama 2's trainer settings: BPE, byte fallback, digits split, whitespace kept as it is, ids 0-2 for
    ``<unk>``, ``<s>``, ``</s>``, BOS added; transformers 5 writes a Metaspace pre-tokenizer. Gemma's
    (``style="gemma"``): no space before the text, ids 0-3 for ``<pad>``, ``<eos>``, ``<bos>``, ``<unk>``,
    the turn markers as user-defined pieces; transformers 5 writes a ``Replace(" ", "▁")`` normalizer.
    """
    import sentencepiece
    from transformers import GemmaTokenizer, LlamaTokenizer

    gemma = style == "gemma"
    if gemma:
        ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>")
        ids |= dict(add_dummy_prefix=False, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
    else:
        ids = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=0.9995,
        minloglevel=2,
        **ids,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = (GemmaTokenizer if gemma else LlamaTokenizer).from_pretrained(str(out_dir), add_bos_token=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
