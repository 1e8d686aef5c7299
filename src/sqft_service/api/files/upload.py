"""Receive a multipart upload straight into the data dir, with the size limit enforced while reading.

Starlette's form parser (behind FastAPI's ``UploadFile``) spools every file over 1 MB to the system
temp dir, outside the data dir, and reads the whole body before the route runs, so a size limit
checked in the route comes after the disk and the time are spent. Here python-multipart's streaming
parser is fed the body as it arrives: the file part goes only to a staging file in
``<data_dir>/files`` (beside where it will be kept), and reading stops at the first chunk past the
limit. A body without ``Content-Length`` (chunked) is cut off the same way.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import anyio

from ...errors import InvalidRequestError, PayloadTooLargeError
from ..limits import MAX_FORM_FIELD_BYTES, MAX_FORM_FIELDS, MULTIPART_OVERHEAD_BYTES

try:  # python-multipart >= 0.0.13 names its module python_multipart; older releases only `multipart`
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError:  # pragma: no cover
    from multipart.exceptions import FormParserError  # type: ignore[no-redef]
    from multipart.multipart import MultipartParser, parse_options_header  # type: ignore[no-redef]

FILE_FIELD = "file"


@dataclass
class ReceivedUpload:
    """A file part written to ``staged`` (the caller keeps or removes it) and the form's other fields."""

    staged: Path
    filename: str | None
    size: int
    sha256: str
    fields: dict[str, str]


@dataclass
class _Form:
    """python-multipart callbacks: file bytes are queued for the writer, fields kept (small) in memory."""

    max_file_bytes: int
    file_field: str = FILE_FIELD
    too_large: str | None = None  # the message when the file part is over max_file_bytes
    header_name: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    disposition: bytes = b""
    part_name: str = ""
    in_file: bool = False
    value: bytearray = field(default_factory=bytearray)
    fields: dict[str, str] = field(default_factory=dict)
    has_file: bool = False
    filename: str | None = None
    file_size: int = 0
    pending: list[bytes] = field(default_factory=list)
    ended: bool = False

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": lambda data, start, end: self.header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self.header_value.extend(data[start:end]),
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.disposition, self.part_name, self.in_file = b"", "", False
        self.value = bytearray()

    def on_header_end(self) -> None:
        if bytes(self.header_name).strip().lower() == b"content-disposition":
            self.disposition = bytes(self.header_value)
        self.header_name, self.header_value = bytearray(), bytearray()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        name = options.get(b"name")
        if name is None:
            raise InvalidRequestError(
                "a form part has no name (its Content-Disposition lacks `name`)", param=self.file_field
            )
        self.part_name = name.decode("utf-8", errors="replace")
        if self.part_name == self.file_field:
            if self.has_file:
                raise InvalidRequestError(
                    f"one upload takes one `{self.file_field}`; this form has several", param=self.file_field
                )
            self.has_file, self.in_file = True, True
            raw = options.get(b"filename")
            self.filename = raw.decode("utf-8", errors="replace") if raw is not None else None
        elif len(self.fields) >= MAX_FORM_FIELDS:
            raise InvalidRequestError(f"the form has more than {MAX_FORM_FIELDS} fields", param=self.part_name)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.file_size += end - start
            if self.file_size > self.max_file_bytes:
                raise PayloadTooLargeError(
                    self.too_large or f"file is larger than the limit of {self.max_file_bytes} bytes",
                    param=self.file_field,
                    code="file_too_large",
                )
            self.pending.append(bytes(data[start:end]))
            return
        self.value.extend(data[start:end])
        if len(self.value) > MAX_FORM_FIELD_BYTES:
            raise InvalidRequestError(
                f"form field `{self.part_name}` is longer than {MAX_FORM_FIELD_BYTES} bytes", param=self.part_name
            )

    def on_part_end(self) -> None:
        if not self.in_file:
            self.fields[self.part_name] = self.value.decode("utf-8", errors="replace")

    def on_end(self) -> None:
        self.ended = True


def _write(out: BinaryIO, digest: Any, data: bytes) -> None:
    digest.update(data)
    out.write(data)


async def receive_upload(
    content_type: str | None,
    body: AsyncIterator[bytes],
    *,
    staging_dir: Path,
    max_file_bytes: int,
    file_field: str = FILE_FIELD,
    too_large: str | None = None,
) -> ReceivedUpload:
    """Parse a ``multipart/form-data`` body as it streams in; the ``file_field`` part lands in
    ``staging_dir`` (``too_large``: the message when it is over ``max_file_bytes``).

    Raises:
        PayloadTooLargeError: The file, or the whole body, is over the limit (reading stops there).
        InvalidRequestError: Not multipart, malformed, cut short, or without a ``file`` part.
    """
    media, params = parse_options_header(content_type or "")
    boundary = params.get(b"boundary")
    if media != b"multipart/form-data" or not boundary:
        wanted = "a `file` part (and optionally `purpose`)" if file_field == FILE_FIELD else f"a `{file_field}` part"
        raise InvalidRequestError(f"an upload is a multipart/form-data body with {wanted}", param=file_field)
    max_body = max_file_bytes + MULTIPART_OVERHEAD_BYTES
    form = _Form(max_file_bytes, file_field, too_large)
    fd, staged_name = tempfile.mkstemp(dir=staging_dir, prefix=".staging-")
    staged = Path(staged_name)
    out = os.fdopen(fd, "wb")
    digest = hashlib.sha256()
    received = 0
    try:
        parser = MultipartParser(boundary, form.callbacks())
        async for chunk in body:
            received += len(chunk)
            if received > max_body:
                raise PayloadTooLargeError(
                    f"the upload is over the limit of {max_body} bytes (file and form fields together)",
                    param=file_field,
                    code="file_too_large",
                )
            try:
                parser.write(chunk)
            except FormParserError as exc:
                raise InvalidRequestError(
                    f"the upload is not valid multipart/form-data: {exc}", param=file_field
                ) from None
            if form.pending:
                data = b"".join(form.pending)
                form.pending.clear()
                # Off the event loop: other requests keep being served while a big file is written.
                await anyio.to_thread.run_sync(_write, out, digest, data)
        if not form.ended:
            raise InvalidRequestError("the upload ended before its closing multipart boundary", param=file_field)
        if not form.has_file:
            raise InvalidRequestError(f"Missing required parameter `{file_field}`", param=file_field)
        out.close()
        return ReceivedUpload(staged, form.filename, form.file_size, digest.hexdigest(), form.fields)
    except BaseException:
        out.close()
        staged.unlink(missing_ok=True)
        raise
