"""Multipart uploads (images/edits, videos with input_reference): read the client's parts, counting bytes
against `max_upload_bytes`, and re-emit them to the upstream as a new multipart body.

The text fields must be known before anything is sent (they decide the price, and the hold comes before the
upstream call), and a client may send files before fields, so file parts are spooled to an anonymous temporary
file as they arrive and streamed from there to the upstream: an upload is never held whole in memory. The
parts are hashed as they are read, for Idempotency-Key.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from typing import IO, Any

import aiohttp
from aiohttp import web

from gateway.errors import ApiError, invalid

_CHUNK = 64 * 1024


@dataclass
class FilePart:
    name: str
    filename: str
    content_type: str
    size: int
    file: IO[bytes]


@dataclass
class Form:
    """The parts of a multipart body: text fields in order (a repeated name keeps every value) and files."""

    fields: list[tuple[str, str]] = field(default_factory=list)
    files: list[FilePart] = field(default_factory=list)
    digest: bytes = b""
    size: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The text fields as a JSON-like mapping (the last value of a repeated name wins)."""
        return dict(self.fields)

    def files_named(self, *names: str) -> list[FilePart]:
        return [f for f in self.files if f.name in names]

    def close(self) -> None:
        for part in self.files:
            part.file.close()


def too_large(limit: int) -> ApiError:
    return ApiError(413, "REQUEST_TOO_LARGE",
                    f"The upload is larger than the limit of {limit} bytes (max_upload_bytes)")


async def read_form(request: web.Request, *, max_bytes: int) -> Form:
    """Read a multipart/form-data body. 400 for a body that is not multipart, 413 past `max_bytes`.

    The caller owns the returned form and must close it."""
    if not request.content_type.startswith("multipart/form-data"):
        raise invalid("The request body must be multipart/form-data")
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large(max_bytes)
    form = Form()
    digest = hashlib.sha256()
    try:
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, aiohttp.BodyPartReader):
                    raise invalid("Nested multipart bodies are not supported")
                name = part.name
                if not name:
                    raise invalid("Every multipart part needs a name")
                if part.filename is None:
                    data = bytearray()
                    while chunk := await part.read_chunk(_CHUNK):
                        form.size += len(chunk)
                        if form.size > max_bytes:
                            raise too_large(max_bytes)
                        data += chunk
                    try:
                        value = data.decode(part.get_charset("utf-8"))
                    except (UnicodeDecodeError, LookupError):
                        raise invalid(f"{name}: is not valid text", name) from None
                    digest.update(f"field\0{name}\0{len(data)}\0".encode() + bytes(data))
                    form.fields.append((name, value))
                    continue
                content_type = part.headers.get("Content-Type", "application/octet-stream")
                spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed by Form.close
                upload = FilePart(name, part.filename, content_type, 0, spool)
                form.files.append(upload)
                digest.update(f"file\0{name}\0{part.filename}\0{content_type}\0".encode())
                while chunk := await part.read_chunk(_CHUNK):
                    form.size += len(chunk)
                    if form.size > max_bytes:
                        raise too_large(max_bytes)
                    upload.size += len(chunk)
                    digest.update(chunk)
                    # A write to a fresh temporary file lands in the page cache: too short for a thread.
                    spool.write(chunk)
                digest.update(f"\0{upload.size}".encode())
                spool.seek(0)
        except (ValueError, AssertionError, aiohttp.ClientPayloadError) as exc:
            raise invalid(f"The multipart body is malformed: {exc}") from None
    except BaseException:
        form.close()
        raise
    form.digest = digest.digest()
    return form


def multipart_body(fields: list[tuple[str, str]], files: list[FilePart]) -> aiohttp.MultipartWriter:
    """A new multipart/form-data body for the upstream: the fields, then the spooled files, streamed."""
    writer = aiohttp.MultipartWriter("form-data")
    for name, value in fields:
        part = writer.append(value, {"Content-Type": "text/plain; charset=utf-8"})
        part.set_content_disposition("form-data", name=name)
    for upload in files:
        upload.file.seek(0)
        payload = aiohttp.payload.BufferedReaderPayload(
            upload.file, content_type=upload.content_type,
        )
        payload.set_content_disposition("form-data", name=upload.name, filename=upload.filename)
        writer.append_payload(payload)
    return writer
