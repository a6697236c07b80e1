"""A fake media upstream (OpenAI's images and videos API) on a real socket, with knobs.

Knobs: `images_returned` (how many images a call returns; None = as many as asked), `status` (an error
status every POST answers with), `delay` (before an image generation answers), `progression` (the statuses a
video reports on its 1st, 2nd, … poll; the last one sticks), `created_status` (a new video's status in the answer
to its creation), `content` (the bytes a completed video serves), `echo_model` (image answers name the model they
were asked for, as some providers' do).
It counts calls, and records bodies, headers and the multipart parts it received, so tests can state exactly
what reached it.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.settings import Settings, UpstreamSettings


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class MediaUpstream:
    images_returned: int | None = None
    status: int | None = None
    delay: float = 0.0  # seconds an image call waits before answering
    progression: list[str] = field(default_factory=lambda: ["in_progress", "completed"])
    created_status: str = "queued"  # what a new video's status is in the answer to its creation
    content: bytes = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 64
    echo_model: bool = False
    calls: Counter[str] = field(default_factory=Counter)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    parts: list[list[Part]] = field(default_factory=list)
    videos: dict[str, dict[str, Any]] = field(default_factory=dict)
    polls: Counter[str] = field(default_factory=Counter)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/images/generations", self.generations)
        app.router.add_post("/v1/images/edits", self.edits)
        app.router.add_post("/v1/videos", self.create_video)
        app.router.add_get("/v1/videos/{id}", self.get_video)
        app.router.add_get("/v1/videos/{id}/content", self.video_content)
        return app

    def _seen(self, request: web.Request, name: str) -> web.Response | None:
        self.calls[name] += 1
        self.headers.append(dict(request.headers))
        if self.status is not None:
            error = {"message": f"fake failure {self.status}", "type": "server_error"}
            return web.json_response({"error": error}, status=self.status)
        return None

    def _images(self, asked: int, model: object) -> web.Response:
        count = asked if self.images_returned is None else self.images_returned
        data = [{"b64_json": base64.b64encode(f"image {i}".encode()).decode()} for i in range(count)]
        answer = {"created": 1_700_000_000, "data": data, "vendor_extra": {"kept": True}}
        return web.json_response({**answer, "model": model} if self.echo_model else answer)

    async def generations(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        failed = self._seen(request, "generations")
        await asyncio.sleep(self.delay)
        return failed or self._images(int(body.get("n", 1)), body.get("model"))

    async def _read_parts(self, request: web.Request) -> tuple[list[Part], dict[str, str]]:
        parts: list[Part] = []
        fields: dict[str, str] = {}
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            assert isinstance(part, aiohttp.BodyPartReader)
            data = await part.read()
            name = part.name or ""
            filename = part.filename
            parts.append(Part(name, filename, part.headers.get("Content-Type"), bytes(data)))
            if filename is None:
                fields[name] = bytes(data).decode()
        self.parts.append(parts)
        return parts, fields

    async def edits(self, request: web.Request) -> web.Response:
        _, fields = await self._read_parts(request)
        self.bodies.append(fields)
        failed = self._seen(request, "edits")
        return failed or self._images(int(fields.get("n", "1")), fields.get("model"))

    async def create_video(self, request: web.Request) -> web.Response:
        if request.content_type.startswith("multipart/"):
            _, body = await self._read_parts(request)
        else:
            body = await request.json()
        self.bodies.append(body)
        failed = self._seen(request, "create_video")
        if failed:
            return failed
        video_id = f"up_video_{next(self._ids)}"
        self.videos[video_id] = {
            "id": video_id, "object": "video", "model": body.get("model"), "status": self.created_status,
            "progress": 100 if self.created_status == "completed" else 0,
            "created_at": 1_700_000_000, "seconds": str(body.get("seconds", "4")), "size": body.get("size"),
        }
        return web.json_response(self.videos[video_id])

    async def get_video(self, request: web.Request) -> web.Response:
        video_id = request.match_info["id"]
        self.calls["get_video"] += 1
        if video_id not in self.videos:
            return web.json_response({"error": {"message": "no such video"}}, status=404)
        self.polls[video_id] += 1
        status = self.progression[min(self.polls[video_id], len(self.progression)) - 1]
        video = dict(self.videos[video_id], status=status)
        video["progress"] = {"queued": 0, "in_progress": 50}.get(status, 100)
        if status == "failed":
            video["error"] = {"code": "generation_failed", "message": "the fake refused"}
        return web.json_response(video)

    async def video_content(self, request: web.Request) -> web.StreamResponse:
        self.calls["video_content"] += 1
        self.headers.append(dict(request.headers))
        response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        response.content_length = len(self.content)
        await response.prepare(request)
        for start in range(0, len(self.content), 4096):
            await response.write(self.content[start:start + 4096])
        await response.write_eof()
        return response



UPSTREAM_KEY = "media-upstream-secret-key"


def media_settings(settings: Settings, server: TestServer, **overrides: Any) -> Settings:
    """The test settings with the `media` upstream pointed at a running fake (its key in MEDIA_API_KEY)."""
    upstream = UpstreamSettings(base_url=str(server.make_url("/v1")), api_key_env="MEDIA_API_KEY",
                                timeout_seconds=30)
    return settings.model_copy(update={"upstreams": {**settings.upstreams, "media": upstream}, **overrides})


def tiny_png(red: int = 255) -> bytes:
    """A valid 1x1 RGB PNG, built by hand."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(bytes([0, red, 0, 0]))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.fixture
def fake() -> MediaUpstream:
    """The fake media upstream, with its knobs at their defaults."""
    return MediaUpstream()


@pytest.fixture
async def server(aiohttp_server: Any, fake: MediaUpstream) -> TestServer:
    """The fake media upstream served on loopback."""
    return await aiohttp_server(fake.app())  # type: ignore[no-any-return]
