"""A run's output items as the API reads them: an index of each item's id, status and place in the run's
file, and the run's summary, both brought up to date by reading only what the job appended since the
last look (a run of 50,000 rows is paged through without reading its file once per page)."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...jobs.eval_run import Summary

MAX_RUNS = 64  # indexes kept (a few bytes per item each), least recently read dropped


@dataclass
class _Index:
    end: int = 0  # bytes of the file read so far (whole lines)
    spans: list[tuple[str, str, int, int]] = field(default_factory=list)  # (id, status, offset, length)
    summary: Summary = field(default_factory=Summary)


class RunItems:
    def __init__(self) -> None:
        self._indexes: OrderedDict[str, _Index] = OrderedDict()
        self._lock = threading.Lock()

    def _index(self, path: Path) -> _Index:
        """The index of ``path``, with what was appended to it since the last call."""
        with self._lock:
            index = self._indexes.pop(str(path), None) or _Index()
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size < index.end:  # cut back (a job resumed after a crash drops a half-written line)
                index = _Index()
            if size > index.end:
                with path.open("rb") as handle:
                    handle.seek(index.end)
                    data = handle.read(size - index.end)
                offset = index.end
                for line in data[: data.rfind(b"\n") + 1].splitlines(keepends=True):
                    item = json.loads(line)
                    index.spans.append((item["id"], item["status"], offset, len(line)))
                    index.summary.add(item)
                    offset += len(line)
                index.end = offset
            self._indexes[str(path)] = index
            while len(self._indexes) > MAX_RUNS:
                self._indexes.popitem(last=False)
            return index

    def summary(self, path: Path, criteria: list[str], total: int) -> dict[str, Any]:
        return self._index(path).summary.result(criteria, total)

    def page(
        self, path: Path, *, after: str | None, limit: int, descending: bool, status: str | None
    ) -> tuple[list[dict[str, Any]], bool]:
        spans = [s for s in self._index(path).spans if status is None or s[1] == status]
        if descending:
            spans.reverse()
        start = next((n + 1 for n, s in enumerate(spans) if s[0] == after), 0) if after else 0
        chosen = spans[start : start + limit]
        return _read(path, chosen), start + limit < len(spans)

    def get(self, path: Path, item_id: str) -> dict[str, Any] | None:
        found = [s for s in self._index(path).spans if s[0] == item_id]
        return _read(path, found)[0] if found else None

    def forget(self, path: Path) -> None:
        with self._lock:
            self._indexes.pop(str(path), None)


def _read(path: Path, spans: list[tuple[str, str, int, int]]) -> list[dict[str, Any]]:
    if not spans:
        return []
    with path.open("rb") as handle:
        items = []
        for _, _, offset, length in spans:
            handle.seek(offset)
            items.append(json.loads(handle.read(length)))
        return items
