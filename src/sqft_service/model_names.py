"""OpenAI-style names of fine-tuned models: ``ft:<base>:<suffix>:<job-id>[:<version>][:merged]``.

A succeeded fine-tune's ``fine_tuned_model`` is ``ft:<base>:<suffix or "sqft">:<job-id>`` (OpenAI's
form); an extracted NLS sub-adapter adds ``:<version>``, a merged model ``:merged`` (after the version,
if any), a checkpoint ``:ckpt-step-<N>`` (as OpenAI names checkpoint models; sub-adapter versions can't
start so). ``<base>`` and ``<suffix>`` are slugs without ``:``, so the job id is always the fourth field
and a name parses without a lookup table. "merged" cannot be a sub-adapter version (api/sqft/protocol.py
reserves it), so the last field is never ambiguous. Shared by the job manager and the API: stdlib only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath

MERGED = "merged"
CHECKPOINT_PREFIX = "ckpt-step-"
DEFAULT_SUFFIX = "sqft"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _slug(text: str) -> str:
    return _UNSAFE.sub("-", text).strip("-") or "model"


def base_slug(model_ref: str) -> str:
    """A short name of a base model reference: a directory's name, a GGUF file's stem, a Hub id's name;
    for a fine-tuned model, its own base's (as OpenAI names the fine-tune of a fine-tuned model)."""
    if parse_fine_tuned(model_ref) is not None:
        return model_ref.split(":")[1]
    path = PurePath(model_ref.rstrip("/"))
    return _slug(path.stem if path.suffix == ".gguf" else path.name)


def fine_tuned_name(model_ref: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{base_slug(model_ref)}:{_slug(suffix) if suffix else DEFAULT_SUFFIX}:{job_id}"


@dataclass(frozen=True)
class FineTunedRef:
    """What a fine-tuned model id points at: the job, and optionally a sub-adapter version and/or merged."""

    job_id: str
    version: str | None = None
    merged: bool = False

    def name(self, model_ref: str, suffix: str | None) -> str:
        tail = [p for p in (self.version, MERGED if self.merged else None) if p]
        return ":".join([fine_tuned_name(model_ref, suffix, self.job_id), *tail])


def checkpoint_ref(job_id: str, step: int) -> FineTunedRef:
    return FineTunedRef(job_id, f"{CHECKPOINT_PREFIX}{step}")


def parse_fine_tuned(model_id: str) -> FineTunedRef | None:
    """The parts of an ``ft:`` id, or None for anything else (a base model reference)."""
    parts = model_id.split(":")
    if len(parts) < 4 or len(parts) > 6 or parts[0] != "ft" or not all(parts):
        return None
    rest = parts[4:]
    merged = bool(rest) and rest[-1] == MERGED
    if merged:
        rest = rest[:-1]
    if len(rest) > 1:
        return None
    return FineTunedRef(parts[3], rest[0] if rest else None, merged)
