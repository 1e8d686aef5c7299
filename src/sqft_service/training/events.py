"""How the training recipe reports progress without knowing who listens.

The recipe calls an :class:`EventSink`; the job process (``sqft_service.jobs.worker``) provides one
that writes to the service's store, tests and benchmarks provide in-memory ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Level = Literal["info", "warn", "error"]


class EventSink(Protocol):
    def message(self, text: str, level: Level = "info", data: dict[str, Any] | None = None) -> None:
        """A human-readable line (OpenAI event ``type="message"``)."""

    def metrics(self, data: dict[str, Any]) -> None:
        """A step's numbers (OpenAI event ``type="metrics"``): step, epoch, train_loss, lr, ..."""

    def checkpoint(self, step: int, path: str, metrics: dict[str, Any]) -> None:
        """An adapter checkpoint written to ``path`` at ``step``."""

    def progress(self, trained_tokens: int, estimated_finish: float | None) -> None:
        """Totals for the job object: real tokens trained so far and the ETA (unix seconds)."""


@dataclass
class MemorySink:
    """Keeps everything in lists (tests, benchmarks, the CLI's ``sqft train``)."""

    messages: list[tuple[str, str, dict[str, Any] | None]] = field(default_factory=list)
    metric_rows: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    trained_tokens: int = 0
    estimated_finish: float | None = None
    echo: bool = False

    def message(self, text: str, level: Level = "info", data: dict[str, Any] | None = None) -> None:
        self.messages.append((level, text, data))
        if self.echo:
            print(f"[{level}] {text}", flush=True)

    def metrics(self, data: dict[str, Any]) -> None:
        self.metric_rows.append(dict(data))
        if self.echo:
            print(" ".join(f"{k}={v}" for k, v in data.items()), flush=True)

    def checkpoint(self, step: int, path: str, metrics: dict[str, Any]) -> None:
        self.checkpoints.append((step, path, dict(metrics)))

    def progress(self, trained_tokens: int, estimated_finish: float | None) -> None:
        self.trained_tokens = trained_tokens
        self.estimated_finish = estimated_finish


class NullSink:
    """Drops everything: the sink of data-parallel ranks other than 0, which report nothing themselves."""

    def message(self, text: str, level: Level = "info", data: dict[str, Any] | None = None) -> None:
        pass

    def metrics(self, data: dict[str, Any]) -> None:
        pass

    def checkpoint(self, step: int, path: str, metrics: dict[str, Any]) -> None:
        pass

    def progress(self, trained_tokens: int, estimated_finish: float | None) -> None:
        pass
