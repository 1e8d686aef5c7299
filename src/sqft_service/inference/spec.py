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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens)
    completion_tokens: int
