"""A fine-tuned model's files as one uncompressed tar, streamed as it is read.

``tarfile`` builds the headers (PAX, so long names and files over 8 GiB are fine); the file bodies are
copied here in 1 MiB chunks, because ``TarFile.addfile`` copies a whole file into its output at once,
which for a streamed response would hold a multi-GB model in memory. Uncompressed: safetensors and GGUF
weights barely compress, and the exact length is known up front (``Content-Length``).
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20
_BLOCK = tarfile.BLOCKSIZE  # 512
_END = b"\0" * (2 * _BLOCK)  # two zero blocks end an archive


@dataclass(frozen=True)
class Member:
    name: str  # the path inside the archive
    path: Path
    size: int
    header: bytes

    @classmethod
    def of(cls, name: str, path: Path) -> Member:
        stat = path.stat()
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
        return cls(name, path, stat.st_size, info.tobuf(format=tarfile.PAX_FORMAT))

    @property
    def padding(self) -> int:
        return -self.size % _BLOCK


def tar_length(members: list[Member]) -> int:
    return sum(len(m.header) + m.size + m.padding for m in members) + len(_END)


def tar_stream(members: list[Member]) -> Iterator[bytes]:
    """The archive's bytes: each member's header, its body in chunks, its padding; then the end blocks.

    Raises:
        OSError: a file changed size while it was sent (the response then ends short, and the
            client sees a truncated archive rather than a wrong one).
    """
    for member in members:
        yield member.header
        with member.path.open("rb") as handle:
            left = member.size
            while left:
                chunk = handle.read(min(CHUNK, left))
                if not chunk:
                    raise OSError(f"{member.name} shrank while it was being sent")
                left -= len(chunk)
                yield chunk
        if member.padding:
            yield b"\0" * member.padding
    yield _END
