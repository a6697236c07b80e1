"""A simulated OpenAI-compatible upstream for `meterline demo`: chat completions (non-streaming, and streaming with a
usage chunk as OpenRouter sends it), `GET /models` with prices, images and videos, all offline and answering with
deterministic usage. Only the demo starts it; `meterline serve` never does.

Every answer says it is a simulation: chat text and image captions say so, chat answers and images name the
provider "Meterline simulator", and every response carries `X-Meterline-Simulator: true`. It asks for its own
bearer key (the demo makes one per run) as a real upstream would, so the gateway's upstream key path is the one
used in production.

Usage is a rule of the request alone (`prompt_tokens`, `completion_tokens`), one token per four UTF-8 bytes of
text, rounded up, as English text roughly runs:

    prompt_tokens     = Σ over messages (3 + ceil(bytes(text) / 4)) + 3
    completion_tokens = n * ceil(bytes(reply) / 4)

where the reply is a fixed sentence naming the simulator (cut to the output limit, 4 bytes a token, when one is
sent), and `usage.cost` is the simulator's own price for it (CHAT_PRICES). A video is queued, in progress at its
first poll and completed from its second; its "content" is a line of text saying what it stands in for.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import itertools
import json
import math
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import aiohttp
from aiohttp import web

PROVIDER = "Meterline simulator"
HEADER = "X-Meterline-Simulator"
CHAT_MODEL = "simulator/chat"
IMAGE_MODEL = "simulator/image"
VIDEO_MODEL = "simulator/video"
# What the simulator publishes for its chat model in `GET /models`: OpenRouter's USD-per-token decimal strings.
# $3 and $15 per million tokens are whole micros per token (3 and 15), so every charge is easy to check by hand.
CHAT_PRICES = {"prompt": "0.000003", "completion": "0.000015"}
CHAT_CONTEXT_LENGTH = 128_000
CHAT_MAX_OUTPUT_TOKENS = 4_096

BYTES_PER_TOKEN = 4
MESSAGE_TOKENS = 3  # OpenAI's framing: tokens per message, and for the reply's header
REPLY_TOKENS = 3
_STREAM_PIECES = 6
_VIDEO_ID = re.compile(r"sim_video_[0-9a-f]{16}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def text_tokens(text: str) -> int:
    """One token per four UTF-8 bytes of `text`, rounded up."""
    return -(-len(text.encode("utf-8", "surrogatepass")) // BYTES_PER_TOKEN)


def message_text(message: object) -> str:
    """The text of a chat message: its string content, or its text parts joined (other parts carry none)."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content
                       if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def prompt_tokens(messages: list[Any]) -> int:
    return sum(MESSAGE_TOKENS + text_tokens(message_text(m)) for m in messages) + REPLY_TOKENS


def reply_text(messages: list[Any]) -> str:
    """The simulator's answer: a fixed sentence naming it, with the word count of the last user message (so the
    answer visibly depends on the question, and stays plain ASCII)."""
    last = next((message_text(m) for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), "")
    words = len(last.split())
    return (f"This answer comes from Meterline's simulator, not from a model: nothing left this machine. Your "
            f"message had {words} word{'' if words == 1 else 's'}; the usage below is the simulator's deterministic "
            "count, and its charge is real.")


def output_limit(body: dict[str, Any]) -> int | None:
    """The output limit the request sends (the smaller of max_tokens and max_completion_tokens, if both)."""
    limits = [v for k in ("max_tokens", "max_completion_tokens")
              if isinstance(v := body.get(k), int) and not isinstance(v, bool) and v >= 0]
    return min(limits) if limits else None


def _messages(body: dict[str, Any]) -> list[Any]:
    messages = body.get("messages")
    return messages if isinstance(messages, list) else []


def completion(body: dict[str, Any]) -> tuple[str, str, int]:
    """One choice's text, its finish_reason, and the usage's completion tokens over all `n` choices."""
    text = reply_text(_messages(body))
    limit = output_limit(body)
    finish = "stop"
    if limit is not None and text_tokens(text) > limit:
        text, finish = text[: limit * BYTES_PER_TOKEN], "length"  # ASCII: one byte a character
    return text, finish, max(_count(body.get("n"), 1), 1) * text_tokens(text)


def usage(body: dict[str, Any]) -> dict[str, Any]:
    """The usage of a chat request, as OpenRouter reports it (with `cost`, the simulator's price in USD)."""
    prompt = prompt_tokens(_messages(body))
    _, _, completion_tokens = completion(body)
    cost = Decimal(prompt) * Decimal(CHAT_PRICES["prompt"]) + Decimal(completion_tokens) * Decimal(
        CHAT_PRICES["completion"])
    return {
        "prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0},
        # A JSON number, as OpenRouter sends it: the float's repr is this exact decimal.
        "cost": float(cost),
    }


def pieces(text: str, count: int = _STREAM_PIECES) -> list[str]:
    """`text` in at most `count` consecutive pieces cut at word starts (together, all of it)."""
    words = re.findall(r"\S+\s*|\s+", text)
    size = max(1, math.ceil(len(words) / count))
    return ["".join(words[i:i + size]) for i in range(0, len(words), size)] or [""]


def catalog() -> dict[str, Any]:
    """`GET /models`, in OpenRouter's shape."""
    return {"data": [{
        "id": CHAT_MODEL, "name": "Simulated chat (Meterline simulator)", "created": 1_767_225_600,
        "description": "Meterline's built-in simulator: a fixed answer and deterministic usage, no model.",
        "context_length": CHAT_CONTEXT_LENGTH,
        "pricing": {**CHAT_PRICES, "request": "0", "image": "0"},
        "top_provider": {"context_length": CHAT_CONTEXT_LENGTH, "max_completion_tokens": CHAT_MAX_OUTPUT_TOKENS},
        "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
    }]}


def png() -> bytes:
    """A valid 1x1 PNG (one teal pixel), the image every image answer carries."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes([0, 0, 128, 128])))
            + chunk(b"IEND", b""))


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": f"{PROVIDER}: {message}", "type": kind, "code": status}},
                             status=status)


def _count(value: object, default: int) -> int:
    if isinstance(value, str) and value.isdigit():  # multipart fields are text
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


class Simulator:
    """The simulated upstream's routes, under `/v1`, answering only to `api_key`."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key
        self._ids = itertools.count(1)
        self._videos: dict[str, dict[str, Any]] = {}
        self._polls: dict[str, int] = {}

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._authorised], client_max_size=64 * 1024 * 1024)
        app.on_response_prepare.append(_stamp)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/images/generations", self.images)
        app.router.add_post("/v1/images/edits", self.images)
        app.router.add_post("/v1/videos", self.create_video)
        app.router.add_get("/v1/videos/{id}", self.get_video)
        app.router.add_get("/v1/videos/{id}/content", self.video_content)
        return app

    @web.middleware
    async def _authorised(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").encode()
        if not hmac.compare_digest(given, self._api_key.encode()):
            return _error(401, "a missing or wrong API key", "authentication_error")
        return await handler(request)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(catalog())

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return _error(400, "messages: a non-empty list is required")
        text, finish, _ = completion(body)
        n = max(_count(body.get("n"), 1), 1)
        answer_id = f"gen-sim-{next(self._ids)}"
        model = body.get("model")
        if body.get("stream"):
            return await self._stream(request, body, answer_id, text, finish, n)
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                   for i in range(n)]
        return web.json_response({
            "id": answer_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "provider": PROVIDER, "system_fingerprint": "meterline-simulator", "choices": choices,
            "usage": usage(body),
        })

    async def _stream(self, request: web.Request, body: dict[str, Any], answer_id: str, text: str, finish: str,
                      n: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b": MeterlineSimulator PROCESSING\n\n")  # as OpenRouter's keep-alive comments

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            chunk = {"id": answer_id, "object": "chat.completion.chunk", "created": int(time.time()),
                     "model": body.get("model"), "provider": PROVIDER, "choices": choices, **extra}
            return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

        parts = pieces(text)
        for index, piece in enumerate(parts):
            last = index == len(parts) - 1
            delta = {"role": "assistant", "content": piece} if index == 0 else {"content": piece}
            await response.write(event([{"index": i, "delta": delta, "finish_reason": finish if last else None}
                                        for i in range(n)]))
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(event([], usage=usage(body)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _images(self, prompt: object, n: int) -> web.Response:
        picture = base64.b64encode(png()).decode()
        caption = f"[{PROVIDER}] a stand-in for: {prompt if isinstance(prompt, str) else ''}"
        return web.json_response({"created": int(time.time()), "provider": PROVIDER,
                                  "data": [{"b64_json": picture, "revised_prompt": caption} for _ in range(n)]})

    async def images(self, request: web.Request) -> web.Response:
        """Generations (JSON) and edits (multipart): the same stand-in picture, n times."""
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        return self._images(body.get("prompt"), max(_count(body.get("n"), 1), 1))

    async def create_video(self, request: web.Request) -> web.Response:
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        video_id = f"sim_video_{next(self._ids):016x}"
        video = {"id": video_id, "object": "video", "model": body.get("model"), "status": "queued", "progress": 0,
                 "created_at": int(time.time()), "seconds": str(body.get("seconds", "4")), "size": body.get("size"),
                 "prompt": body.get("prompt"), "provider": PROVIDER}
        self._videos[video_id] = video
        return web.json_response(video)

    def _video(self, video_id: str) -> dict[str, Any] | None:
        video = self._videos.get(video_id)
        if video is None and _VIDEO_ID.fullmatch(video_id):
            # Made by an earlier run of the demo (this one starts with no jobs): it finished meanwhile.
            video = {"id": video_id, "object": "video", "status": "completed", "progress": 100,
                     "provider": PROVIDER}
            self._polls[video_id] = 2
        return video

    async def get_video(self, request: web.Request) -> web.Response:
        video_id = request.match_info["id"]
        video = self._video(video_id)
        if video is None:
            return _error(404, f"no video {video_id!r}")
        self._polls[video_id] = polls = self._polls.get(video_id, 0) + 1
        status, progress = ("in_progress", 50) if polls < 2 else ("completed", 100)
        return web.json_response({**video, "status": status, "progress": progress})

    async def video_content(self, request: web.Request) -> web.Response:
        video_id = request.match_info["id"]
        video = self._video(video_id)
        if video is None:
            return _error(404, f"no video {video_id!r}")
        if self._polls.get(video_id, 0) < 2:
            return _error(404, f"video {video_id!r} is not completed")
        seconds, size, prompt = video.get("seconds"), video.get("size"), video.get("prompt")
        what = "a video" + (f" of {seconds} seconds" if seconds else "") + (f" at {size}" if size else "")
        text = f"{PROVIDER}: no video was made; this stands in for {what}" + (f", of: {prompt}" if prompt else "")
        return web.Response(text=text + "\n", content_type="text/plain")


async def _stamp(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[HEADER] = "true"


async def _body(request: web.Request) -> dict[str, Any] | web.Response:
    """A request's fields: its multipart text fields, or its JSON object; a 400 answer when it is neither."""
    if request.content_type.startswith("multipart/"):
        return await _form_fields(request)
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return _error(400, "the body is not JSON")
    return body if isinstance(body, dict) else _error(400, "the body must be a JSON object")


async def _form_fields(request: web.Request) -> dict[str, str]:
    """The text fields of a multipart body (files are read and dropped: the simulator makes nothing of them)."""
    fields: dict[str, str] = {}
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if isinstance(part, aiohttp.BodyPartReader):
            data = await part.read()
            if part.filename is None and part.name:
                fields[part.name] = bytes(data).decode("utf-8", "replace")
    return fields


class SimulatorServer:
    """The simulator served on a loopback port of its own, from a thread with its own event loop, so it runs beside
    the gateway as any upstream does and stays up until the gateway has drained (`stop` is called after)."""

    def __init__(self, api_key: str, *, host: str = "127.0.0.1") -> None:
        self._app = Simulator(api_key).app()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((host, 0))
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="meterline-simulator", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> str:
        """Start serving; returns the base URL (…/v1) once the simulator accepts connections."""
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise self._failure
        return self.base_url

    def stop(self) -> None:
        if not self._thread.is_alive():  # never started, or already stopped
            self._sock.close()
            return
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join()

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        runner = web.AppRunner(self._app, handle_signals=False, access_log=None)
        try:
            await runner.setup()
            await web.SockSite(runner, self._sock).start()
        except BaseException as exc:
            self._failure = exc
            self._ready.set()
            await runner.cleanup()
            raise
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await runner.cleanup()
