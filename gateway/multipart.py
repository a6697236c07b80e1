"""Multipart uploads (images/edits, videos with input_reference): read the client's parts within limits, and
re-emit the validated fields and the files as a new multipart body for the upstream.

The text fields must be known before anything is sent (they decide the price, and the hold comes before the
upstream call), and a client may send files before fields, so file parts are written as they arrive to one
anonymous temporary file per upload (never one per part), and streamed from there to the upstream: an upload is
never held whole in memory. Limits: `max_upload_bytes` in all, `max_upload_parts` parts, `max_form_field_bytes`
per text field; a field name given twice is refused (only the names a route declares repeatable, its image files,
may repeat). Reading yields to other requests after every part, so one upload cannot hold up the process.
The parts are hashed as they are read, for Idempotency-Key.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import IO

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from gateway.errors import ApiError, invalid

_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    max_bytes: int
    max_parts: int
    max_field_bytes: int


@dataclass
class FilePart:
    name: str
    filename: str
    content_type: str
    offset: int  # where its bytes start in the form's spool
    size: int


@dataclass
class Form:
    """The parts of a multipart body: text fields by name (each given once) and files in order."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[FilePart] = field(default_factory=list)
    digest: bytes = b""
    size: int = 0
    spool: IO[bytes] | None = None  # every file's bytes, one after another

    def files_named(self, *names: str) -> list[FilePart]:
        return [f for f in self.files if f.name in names]

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()


def too_large(limit: int) -> ApiError:
    return ApiError(413, "REQUEST_TOO_LARGE",
                    f"The upload is larger than the limit of {limit} bytes (max_upload_bytes)")


async def read_form(request: web.Request, limits: Limits, *, repeatable: frozenset[str] = frozenset()) -> Form:
    """Read a multipart/form-data body. 400 for a body that is not multipart (or is malformed), too many parts, an
    oversized text field or a name given twice; 413 past `max_bytes`. The caller owns the form and must close it."""
    if not request.content_type.startswith("multipart/form-data"):
        raise invalid("The request body must be multipart/form-data")
    if request.content_length is not None and request.content_length > limits.max_bytes:
        raise too_large(limits.max_bytes)
    form = Form()
    digest = hashlib.sha256()
    seen: set[str] = set()
    parts = 0
    try:
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                parts += 1
                if parts > limits.max_parts:
                    raise invalid(f"The upload has more than {limits.max_parts} parts (max_upload_parts)")
                if not isinstance(part, aiohttp.BodyPartReader):
                    raise invalid("Nested multipart bodies are not supported")
                name = part.name
                if not name:
                    raise invalid("Every multipart part needs a name")
                if name in seen and name not in repeatable:
                    raise invalid(f"{name}: is given more than once", name)
                seen.add(name)
                if part.filename is None:
                    await _read_field(part, name, form, digest, limits)
                else:
                    await _read_file(part, name, part.filename, form, digest, limits)
                await asyncio.sleep(0)  # one upload's parts never hold up other requests
        except (ValueError, AssertionError, aiohttp.ClientPayloadError, web.RequestPayloadError,
                BadHttpMessage) as exc:  # BadHttpMessage: a part's header line that does not parse
            raise invalid(f"The multipart body is malformed: {type(exc).__name__}") from None
    except BaseException:
        form.close()
        raise
    form.digest = digest.digest()
    return form


async def _read_field(part: aiohttp.BodyPartReader, name: str, form: Form, digest: hashlib._Hash,
                      limits: Limits) -> None:
    data = bytearray()
    while chunk := await part.read_chunk(_CHUNK):
        form.size += len(chunk)
        if form.size > limits.max_bytes:
            raise too_large(limits.max_bytes)
        data += chunk
        if len(data) > limits.max_field_bytes:
            raise invalid(f"{name}: is longer than {limits.max_field_bytes} bytes (max_form_field_bytes)", name)
    try:
        value = data.decode(part.get_charset("utf-8"))
    except (UnicodeDecodeError, LookupError):
        raise invalid(f"{name}: is not valid text", name) from None
    if "\x00" in value:
        raise invalid(f"{name}: must not contain NUL characters", name)
    digest.update(f"field\0{name}\0{len(data)}\0".encode() + bytes(data))
    form.fields[name] = value


async def _read_file(part: aiohttp.BodyPartReader, name: str, filename: str, form: Form, digest: hashlib._Hash,
                     limits: Limits) -> None:
    if form.spool is None:
        form.spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed by Form.close
    spool = form.spool
    content_type = part.headers.get("Content-Type", "application/octet-stream")
    upload = FilePart(name, filename, content_type, spool.tell(), 0)
    form.files.append(upload)
    digest.update(f"file\0{name}\0{filename}\0{content_type}\0".encode())
    while chunk := await part.read_chunk(_CHUNK):
        form.size += len(chunk)
        if form.size > limits.max_bytes:
            raise too_large(limits.max_bytes)
        upload.size += len(chunk)
        digest.update(chunk)
        # A write to a temporary file lands in the page cache: too short for a thread.
        spool.write(chunk)
    digest.update(f"\0{upload.size}".encode())


async def _slice(spool: IO[bytes], offset: int, size: int) -> AsyncIterator[bytes]:
    """A file part's bytes, read from the spool by position (no shared file offset between parts)."""
    end = offset + size
    while offset < end:
        chunk = os.pread(spool.fileno(), min(_CHUNK, end - offset), offset)
        if not chunk:
            return
        offset += len(chunk)
        yield chunk


def multipart_body(fields: list[tuple[str, str]], form: Form) -> aiohttp.MultipartWriter:
    """A new multipart/form-data body for the upstream: `fields` (the validated, priced ones), then the form's
    files, streamed from its spool."""
    writer = aiohttp.MultipartWriter("form-data")
    for name, value in fields:
        part = writer.append(value, {"Content-Type": "text/plain; charset=utf-8"})
        part.set_content_disposition("form-data", name=name)
    if form.spool is not None:
        form.spool.flush()
    for upload in form.files:
        assert form.spool is not None
        payload = aiohttp.payload.AsyncIterablePayload(_slice(form.spool, upload.offset, upload.size),
                                                       content_type=upload.content_type)
        payload.set_content_disposition("form-data", name=upload.name, filename=upload.filename)
        writer.append_payload(payload)
    return writer
