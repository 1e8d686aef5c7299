"""What the engine is asked to run: torch-free value objects shared with the API layer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    """One servable model: a base (or merged) model, optionally with a PEFT adapter on top."""

    name: str  # the id the client used (echoed in responses)
    model: str  # a checked model path (a directory or a .gguf), loaded as the base
    tokenizer: str | None = None  # the job's General.tokenizer_name; None: the model's own
    adapter: str | None = None  # a PEFT adapter directory
    # How the job's training rendered its records ("alpaca" | "chat"); None: a base model (chat template).
    data_format: str | None = None
    # The adapter was trained with SparsePEFT (``General.lora_config.sparse_adapter``): its update is
    # masked by the base's non-zeros, so it is served merged that way (``engine.py``).
    sparse: bool = False


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    # None: no log-probabilities; k >= 0: each token's, and the k likeliest tokens at its position.
    logprobs: int | None = None
    echo: bool = False  # completions: the prompt (and its tokens' log-probabilities) come first
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    grammar: str | None = None  # structured outputs: the answer is held to it (``inference/guided.py``)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusted(self) -> bool:
        """Whether penalties, biases or a guide reshape the logits (``inference/penalties.py``)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or self.grammar)


@dataclass(frozen=True)
class TokenLogprob:
    """One token of a prompt or an answer, as the model scored it (``inference/logprobs.py``)."""

    token: str  # the token's text (special tokens by name)
    bytes: tuple[int, ...]  # its UTF-8 bytes (a piece of a character is a byte of it)
    logprob: float | None  # None: a prompt's first token, which nothing predicts
    width: int  # the characters it adds to the decoded text (a special token none)
    top: tuple[tuple[str, tuple[int, ...], float], ...] = ()  # the k likeliest (token, bytes, logprob)


@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens)
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None  # the answer's tokens, when asked
    prompt_text: str | None = None  # ``echo``: the prompt, as its tokens decode, comes before ``text``
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # ``echo`` with logprobs: the prompt's tokens
