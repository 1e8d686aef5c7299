"""Secrets in a job's configuration (``General.config.token``): kept where only the job reads them.

A job's configuration is stored in SQLite, written into ``spec.json``, returned by the API and
copied into ``training_config.json`` beside every adapter, so none of those may hold a secret. When
a job is created, :func:`split_secrets` replaces each secret by :data:`REDACTED` and the real values go
to the job's ``secrets.json`` (mode 0600: only the service's user can read it). The job process puts
them back (:func:`restore_secrets`) just before it uses the configuration; whatever it writes out goes
through :func:`redact` first. The API redacts too, which also covers rows stored before this existed.

Standard library only: the service, the job process and the recipe all import it.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

REDACTED = "***"
# Where secrets live in a fine-tune's configuration, as key paths.
SECRET_PATHS: tuple[tuple[str, ...], ...] = (("General", "config", "token"),)


def _parent(config: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    node: Any = config
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return None
    return node if isinstance(node, dict) else None


def redact(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """A copy of ``config`` with every secret that is set shown as ``"***"``."""
    if not config:
        return config
    out = copy.deepcopy(config)
    for path in SECRET_PATHS:
        parent = _parent(out, path)
        if parent is not None and parent.get(path[-1]) is not None:
            parent[path[-1]] = REDACTED
    return out


def redacted_json(config: dict[str, Any]) -> str:
    """``config`` as indented JSON with its secrets redacted: for files written beside outputs."""
    return json.dumps(redact(config), indent=2)


def split_secrets(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``config`` redacted, and the secrets it held as ``{"General.config.token": value}``."""
    secrets: dict[str, str] = {}
    for path in SECRET_PATHS:
        parent = _parent(config, path)
        value = parent.get(path[-1]) if parent is not None else None
        if value is not None:
            secrets[".".join(path)] = value
    return redact(config) or config, secrets


def write_secrets(path: Path, secrets: dict[str, str]) -> None:
    """Write ``secrets`` readable by the owner only (created 0600, never widened by the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file that already existed
        with os.fdopen(fd, "w") as handle:
            json.dump(secrets, handle)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def restore_secrets(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """A copy of ``config`` with each ``"***"`` replaced by its value from ``path``.

    A secret missing from the file (a lost file) becomes null, never the literal ``"***"``: the job then
    runs as if no token had been given (``HF_TOKEN`` of the service still applies).
    """
    try:
        secrets = json.loads(path.read_text())
    except FileNotFoundError:
        secrets = {}
    out = copy.deepcopy(config)
    for path_keys in SECRET_PATHS:
        parent = _parent(out, path_keys)
        if parent is not None and parent.get(path_keys[-1]) == REDACTED:
            parent[path_keys[-1]] = secrets.get(".".join(path_keys))
    return out
