"""Object ids and timestamps in OpenAI's shapes (``file-…``, ``ftjob-…``; unix seconds)."""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())
