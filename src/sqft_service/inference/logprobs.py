"""Log-probabilities of tokens, as OpenAI's ``logprobs`` report them (torch imported when called).

* A generated token's log-probability is read off the model's output layer by a forward hook: during
  ``generate()`` each forward's last position is the distribution the next token is drawn from, and the
  streamer is handed that token before the next forward. So the figures cost one ``log_softmax`` per
  step, not a second pass over the answer, and streamed and whole answers report the same numbers.
* The distribution is the model's own (its logits' softmax), before temperature and ``top_p`` reshape
  it for sampling, as vLLM reports them by default: a token's log-probability does not depend on how
  the request samples.
* A prompt's tokens (``echo``, completions) are scored by one forward over the prompt: position ``i``'s
  distribution scores token ``i + 1``; the first token has none (``None``), as in OpenAI's answers.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

from .spec import TokenLogprob

# JSON has no -inf; OpenAI reports tokens the model rules out as -9999.0.
FLOOR = -9999.0
# Prompt positions scored per log_softmax: bounds the float32 copy of the logits to 256 x vocab.
PROMPT_CHUNK = 256


def _finite(value: float) -> float:
    return value if math.isfinite(value) and value > FLOOR else FLOOR


@cache
def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


class TokenTexts:
    """A tokenizer's tokens as text, bytes and printed width, cached per id (a vocabulary is finite)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, tuple[int, ...], int]] = {}

    def __call__(self, token_id: int) -> tuple[str, tuple[int, ...], int]:
        """(text, bytes, width): ``width`` is how much it adds to a decoded answer (a special token none)."""
        if (known := self._cache.get(token_id)) is None:
            tok = self.tokenizer
            text = tok.decode([token_id], skip_special_tokens=False)
            width = len(tok.decode([token_id], skip_special_tokens=True))
            known = self._cache[token_id] = (text, self._bytes(token_id, text), width)
        return known

    def _bytes(self, token_id: int, text: str) -> tuple[int, ...]:
        # A byte-level BPE token (GPT-2 style, SmolLM2's) spells its bytes one character each; a
        # SentencePiece byte-fallback token is written <0xNN>. Either way a piece of a multi-byte
        # character gets its true byte, where its decoded text would be U+FFFD.
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            decoder = _byte_decoder()
            if piece and all(c in decoder for c in piece):
                return tuple(decoder[c] for c in piece)
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    return (int(piece[3:5], 16),)
                except ValueError:
                    pass
            if "\u2581" in piece:  # SentencePiece writes a space as U+2581 (which a lone token's decode drops)
                return tuple(piece.replace("\u2581", " ").encode("utf-8"))
        return tuple(text.encode("utf-8"))


def score_token(texts: TokenTexts, token_id: int, logprobs: Any, k: int) -> TokenLogprob:
    """``token_id`` scored by ``logprobs`` (one position's log-softmax, on any device)."""
    import torch

    text, raw, width = texts(token_id)
    top: tuple[tuple[str, tuple[int, ...], float], ...] = ()
    if k:
        values, ids = torch.topk(logprobs, k)
        top = tuple((*texts(i)[:2], _finite(v)) for v, i in zip(values.tolist(), ids.tolist(), strict=True))
    return TokenLogprob(text, raw, _finite(float(logprobs[token_id])), width, top)


class Recorder:
    """Scores the tokens ``generate()`` picks: a forward hook on the output layer keeps the last
    position's log-softmax of each forward; ``score`` reads a row's picked token off it."""

    def __init__(self, model: Any, texts: TokenTexts, k: int) -> None:
        self.head = model.get_output_embeddings()
        self.texts, self.k = texts, k
        self.last: Any = None
        self._handle: Any = None

    def __enter__(self) -> Recorder:
        self._handle = self.head.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def _hook(self, module: Any, args: Any, output: Any) -> None:
        self.last = output[:, -1].float().log_softmax(-1)

    def score(self, row: int, token: int) -> TokenLogprob:
        """``row``'s picked token, scored by the forward that picked it."""
        return score_token(self.texts, token, self.last[row], self.k)


def score_prompt(model: Any, ids: list[int], texts: TokenTexts, k: int) -> tuple[list[TokenLogprob], Any]:
    """The prompt's tokens scored (the first by nothing) and the distribution of the token after it."""
    import torch

    from ..training.device import model_device

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=model_device(model))).logits[0]
        text, raw, width = texts(ids[0])
        entries, last = [TokenLogprob(text, raw, None, width)], None
        for start in range(0, len(ids), PROMPT_CHUNK):
            rows = logits[start : start + PROMPT_CHUNK].float().log_softmax(-1)
            for j, row in enumerate(rows):
                position = start + j
                if position + 1 == len(ids):
                    last = row
                    break
                entries.append(score_token(texts, ids[position + 1], row, k))
    return entries, last
