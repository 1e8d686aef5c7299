"""Test data and polling helpers (tests write their own data; nothing is downloaded)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]

# One record of each shape, shared by the unit tests of training/records, tokenization and batching.
WITH_INPUT = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
NO_INPUT = {"instruction": "Name a primary colour.", "output": "Red is a primary colour."}
CHAT = {
    "messages": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "That makes 6."},
    ]
}


def alpaca_records(n: int) -> list[dict[str, str]]:
    """A small, learnable instruction set: short, repetitive answers so loss falls within a few steps."""
    records = []
    for i in range(n):
        color = COLORS[i % len(COLORS)]
        if i % 2:
            records.append({"instruction": "Name the color.", "input": f"The sky is {color}.", "output": color})
        else:
            records.append({"instruction": f"Repeat the word {color}.", "input": "", "output": f"{color} {color}"})
    return records


def write_json(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(records, indent=1))
    return path


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def preference_records(n: int) -> list[dict[str, Any]]:
    """OpenAI preference (DPO) records with a learnable preference: the reply that names the color."""
    records = []
    for i in range(n):
        color, other = COLORS[i % len(COLORS)], COLORS[(i + 1) % len(COLORS)]
        records.append(
            {
                "input": {"messages": [{"role": "user", "content": f"The sky is {color}. What color is the sky?"}]},
                # Replies that differ from their first token: a shared opening would add gradients that
                # cancel exactly in exact arithmetic only, and Adam would scale their rounding noise up.
                "preferred_output": [{"role": "assistant", "content": f"{color}, it is."}],
                "non_preferred_output": [{"role": "assistant", "content": f"{other}, it is."}],
            }
        )
    return records


def output_text(response: dict[str, Any]) -> str:
    """A Responses API response's text (its message items' ``output_text`` parts; calls have none)."""
    return "".join(
        part["text"] for item in response["output"] for part in item.get("content", []) if part["type"] == "output_text"
    )


def long_conversation(pairs: int) -> list[dict[str, str]]:
    """``pairs`` user/assistant exchanges of about 45 tokens each, then a last question: longer than the
    tiny test model's 512-token context from 6 pairs on."""
    turns: list[dict[str, str]] = []
    for n in range(pairs):
        turns.append({"role": "user", "content": f"Question {n}: " + "tell me about the colours of the sea " * 4})
        turns.append({"role": "assistant", "content": f"Answer {n}: " + "blue and green and grey waves " * 4})
    return [*turns, {"role": "user", "content": "Which colour came first?"}]
