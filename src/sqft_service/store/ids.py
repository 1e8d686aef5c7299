"""Object ids and timestamps in OpenAI's shapes (``file-…``, ``ftjob-…``; unix seconds)."""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str, sep: str = "-") -> str:
    """``file-…``, ``ftjob-…``; ``sep="_"`` for the objects OpenAI names so (``upload_…``, ``batch_…``)."""
    return f"{prefix}{sep}{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())
