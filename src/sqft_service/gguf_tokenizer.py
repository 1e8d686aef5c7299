"""A model directory's tokenizer as GGUF tokenizer fields, for ``gguf_hf`` (export of a merge).

The tokenizer is the one transformers loads (serialized as ``tokenizer.json``), the one the model was
trained with. Two kinds, the two llama.cpp runs from a Hugging Face BPE tokenizer:

- byte-level BPE (Llama 3, Qwen2, SmolLM2, GPT-2) as GGUF's ``gpt2`` model: every id's token and type,
  the merges, and the name of the pre-tokenizer, which llama.cpp runs from its own table of regexes and so
  must recognise. llama.cpp's converter names it by hashing how a probe text tokenizes, per hub model; we
  name it by what the pre-tokenizer does (:func:`pre_tokenizer_name`).
- SentencePiece BPE (Llama 2, Mistral, TinyLlama: ``▁`` for spaces, byte fallback) as GGUF's ``llama``
  model: tokens, scores and types. llama.cpp merges the adjacent pair whose joined token scores highest,
  as SentencePiece does; a tokenizer.json holds no scores but its merges in rank order, so a token's
  score is minus the rank of the first merge that makes it (:func:`sentencepiece_scores`).

Both carry the special ids, ``add_bos``/``add_eos`` as the tokenizer's post-processor adds them, and the
chat template (``gguf.SpecialVocab``). Anything else is refused with the reason, never written wrong.
Written here because llama.cpp's converter is a script, not a package, that wants the hub directory (and
for SentencePiece the ``tokenizer.model`` file, which a saved transformers tokenizer need not have).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import gguf
from tokenizers import Regex, Tokenizer, pre_tokenizers

from .model_sources import GGUFExportError

# The Split patterns of Llama 3's and Qwen2's tokenizer.json (the pre-tokenizers llama.cpp calls
# "llama-bpe" and "qwen2"); Qwen2's differs in splitting every digit instead of runs of up to three.
# (transformers' GGUF tokenizer loader holds the same two, privately, for the other direction.)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# GPT-4o's (o200k; Phi-4-mini's tokenizer.json, llama.cpp's "gpt-4o"): words split before capitals, a
# contraction kept with its word, "/" kept with the punctuation before it.
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# llama.cpp's name for each pre-tokenizer it implements that a byte-level BPE tokenizer.json can hold.
PRE_TOKENIZERS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    ),
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
    "gpt-4o": lambda: _split_then_bytes(_GPT4O_SPLIT),
}
# Text that tells those pre-tokenizers apart: contractions in both cases, runs of digits, punctuation
# before letters, newlines after punctuation, runs of spaces, non-Latin letters, an emoji, capitals inside
# words and a path.
_PROBE = (
    "I'm sure it's 12345 or 3.14, isn't it?\n\n  \t Don'T  'Ve\r\n...\n(x)=y+1;  über 東京 12 🚀 a1b22c333\n   \n"
    " parseHTTPResponse(userID) ./usr/local"
)
_SPACE = "▁"  # SentencePiece's space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """llama.cpp's name for the pre-tokenizer of ``tokenizer`` (the one that splits the probe alike).

    Raises:
        GGUFExportError: no pre-tokenizer llama.cpp implements splits text as this one does.
    """
    if tokenizer.pre_tokenizer is None:
        raise GGUFExportError("the tokenizer has no pre-tokenizer; llama.cpp's byte-level BPE needs one")
    pieces = tokenizer.pre_tokenizer.pre_tokenize_str(_PROBE)
    for name, make in PRE_TOKENIZERS.items():
        if make().pre_tokenize_str(_PROBE) == pieces:
            return name
    raise GGUFExportError(
        "the tokenizer's pre-tokenizer splits text unlike any llama.cpp implements for byte-level BPE "
        f"({', '.join(PRE_TOKENIZERS)}): convert this merge with llama.cpp's convert_hf_to_gguf.py"
    )


def _is(step: Any, kind: str, **fields: Any) -> bool:
    return isinstance(step, dict) and step.get("type") == kind and all(step.get(k) == v for k, v in fields.items())


def _steps(step: Any) -> list[Any]:
    """A normalizer's, pre-tokenizer's or decoder's steps (one, or a Sequence's)."""
    if not isinstance(step, dict):
        return []
    return step.get("normalizers") or step.get("pretokenizers") or step.get("decoders") or [step]


def sentencepiece_prefix(data: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style ``tokenizer.json`` puts a ``▁`` before the text (llama.cpp's
    ``add_space_prefix``), the way transformers writes it (a Metaspace pre-tokenizer) or the hub's older
    files do (normalizers ``Prepend("▁")`` then ``Replace(" ", "▁")``; Gemma's: the Replace alone).

    Raises:
        GGUFExportError: a pipeline llama.cpp's SentencePiece tokenizer would not reproduce.
    """
    normalizer, pre = data.get("normalizer"), data.get("pre_tokenizer")
    decoders = _steps(data.get("decoder"))
    if not any(_is(d, "ByteFallback") for d in decoders) or not any(
        _is(d, "Replace", content=" ") and d.get("pattern") == {"String": _SPACE} for d in decoders
    ):
        raise GGUFExportError("a byte-fallback BPE tokenizer whose decoder is not SentencePiece's (▁ → space, bytes)")
    if normalizer is None and _is(pre, "Metaspace", replacement=_SPACE):
        if pre.get("split", True):  # llama.cpp merges across spaces, as SentencePiece does
            raise GGUFExportError("the tokenizer's Metaspace splits at spaces, which llama.cpp would not do")
        return pre.get("prepend_scheme", "always") != "never"
    steps = _steps(normalizer)
    replace = [s for s in steps if _is(s, "Replace", content=_SPACE) and s.get("pattern") == {"String": " "}]
    prepend = [s for s in steps if _is(s, "Prepend", prepend=_SPACE)]
    # transformers 5's Gemma tokenizer also splits at " ", of which its Replace normalizer leaves none.
    no_op_split = _is(pre, "Split", pattern={"String": " "})
    if (pre is None or no_op_split) and replace and len(steps) == len(replace) + len(prepend):
        return bool(prepend)
    raise GGUFExportError(
        "the tokenizer is byte-fallback BPE but not SentencePiece's pipeline (a Metaspace pre-tokenizer, or the "
        f"normalizers Prepend('▁') and Replace(' ', '▁')): normalizer {normalizer}, pre-tokenizer {pre}"
    )


def _as_transformers_loads_it(model_dir: Path) -> str:
    """The tokenizer transformers loads from ``model_dir``, as ``tokenizer.json`` text: the one the model
    was trained with. transformers 5 rebuilds some tokenizers' pipelines (Llama's Metaspace) from their
    class and ``tokenizer_config.json``, whatever ``tokenizer.json`` spells."""
    # A merge checks the tokenizer before it starts and writes it after: one load (seconds for a 128k
    # vocabulary) serves both while the tokenizer files are unchanged.
    files = [*sorted(model_dir.glob("*token*")), model_dir / "config.json"]
    stats = {p.name: p.stat() for p in files if p.is_file()}
    stamps = tuple((name, stat.st_mtime_ns, stat.st_size) for name, stat in stats.items())
    return _load_tokenizer_text(str(model_dir), stamps)


@functools.lru_cache(maxsize=4)
def _load_tokenizer_text(model_dir: str, _stamps: tuple) -> str:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir).backend_tokenizer.to_str()
    except Exception as exc:  # transformers raises many types; the merge reports one sentence
        raise GGUFExportError(f"transformers could not load the tokenizer of {Path(model_dir).name}: {exc}") from exc


def read_tokenizer(model_dir: Path) -> tuple[dict[str, Any], Tokenizer, str]:
    """The tokenizer of ``model_dir`` (loaded once) as ``tokenizer.json``'s JSON, as the tokenizer, and as
    GGUF's tokenizer model (``gpt2`` or ``llama``), if GGUF export writes it.

    Raises:
        GGUFExportError: a tokenizer llama.cpp would not run as transformers does.
    """
    text = _as_transformers_loads_it(model_dir)
    data = json.loads(text)
    tokenizer = Tokenizer.from_str(text)
    model, decoder = data.get("model") or {}, data.get("decoder") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        sentencepiece_prefix(data)
        if not model.get("merges"):  # llama.cpp would merge any pair the vocabulary holds; BPE then none
            raise GGUFExportError("the SentencePiece-style tokenizer has no merges for llama.cpp to rank tokens by")
        return data, tokenizer, "llama"
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise GGUFExportError(
            "GGUF export writes byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM2, GPT-2) and SentencePiece BPE "
            f"ones (Llama 2, Mistral, Gemma); this model's tokenizer.json is a {model.get('type')!r} model with a "
            f"{decoder.get('type')!r} decoder"
        )
    normalizer = (data.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):  # llama.cpp normalizes nothing; NFC (Qwen2's) changes no typed text
        raise GGUFExportError(f"the tokenizer normalizes text ({normalizer}), which llama.cpp would not do")
    pre_tokenizer_name(tokenizer)
    return data, tokenizer, "gpt2"


def _tokens(data: dict[str, Any], vocab_size: int, unk: int | None) -> tuple[list[str], list[gguf.TokenType]]:
    """Every id's token and type, as llama.cpp's converter lists them: added special tokens CONTROL, other
    added tokens USER_DEFINED, ids the tokenizer lacks (an embedding padded to a round size) UNUSED; in a
    SentencePiece vocabulary also ``<0xNN>`` BYTE and the unknown token (``unk``) UNKNOWN."""
    by_id = {int(i): token for token, i in data["model"]["vocab"].items()}
    added = {int(a["id"]): a for a in data.get("added_tokens") or []}
    by_id.update({i: a["content"] for i, a in added.items()})
    if by_id and max(by_id) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {max(by_id)}, beyond the model's {vocab_size} embeddings")
    byte_tokens = bool(data["model"].get("byte_fallback"))
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif byte_tokens and i == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif byte_tokens and _BYTE_TOKEN.fullmatch(token):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def sentencepiece_scores(data: dict[str, Any], tokens: list[str]) -> list[float]:
    """Each token's score for llama.cpp's SentencePiece merging: minus the rank of the first merge making
    it; tokens no merge makes (characters, bytes, specials) score below every merge."""
    rank: dict[str, int] = {}
    merges = data["model"].get("merges") or []
    for r, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    return [-float(rank.get(token, len(merges))) for token in tokens]


def add_tokenizer(
    writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int, read: tuple[dict[str, Any], Tokenizer, str] | None = None
) -> None:
    """The tokenizer of ``model_dir`` into ``writer`` (``vocab_size``: the model's embedding rows; ``read``:
    what :func:`read_tokenizer` gave for it, if the caller has it already).

    Raises:
        GGUFExportError: a tokenizer llama.cpp would not run as transformers does.
    """
    data, tokenizer, kind = read or read_tokenizer(model_dir)
    special = gguf.SpecialVocab(model_dir, load_merges=kind == "gpt2", n_vocab=vocab_size)
    tokens, types = _tokens(data, vocab_size, special.special_token_ids.get("unk"))
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
        writer.add_add_space_prefix(False)  # every pre-tokenizer named above splits "I" without a leading space
    else:
        writer.add_add_space_prefix(sentencepiece_prefix(data))
        writer.add_token_scores(sentencepiece_scores(data, tokens))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # What encoding adds, as the tokenizer does it (its post-processor), whatever tokenizer_config.json says:
    # llama.cpp's own default differs by tokenizer.
    special.add_special_token = _adds_special(tokenizer, special)
    special.add_to_gguf(writer, quiet=True)


def _adds_special(tokenizer: Tokenizer, special: gguf.SpecialVocab) -> dict[str, bool]:
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    ids = tokenizer.encode("a", add_special_tokens=True).ids
    bos, eos = special.special_token_ids.get("bos"), special.special_token_ids.get("eos")
    added = {"bos": bos is not None and len(ids) > len(plain) and ids[0] == bos}
    if eos is not None and len(ids) > len(plain) and ids[-1] == eos:  # rare: written only when it does
        added["eos"] = True
    return added
