"""A fake OpenRouter (chat completions and its model catalog) on a real socket, with knobs.

Knobs: `usage` ("present", "absent" or "zero") and the token counts it reports, `cost` (OpenRouter's usage.cost
in USD), `status` (an error status chat answers with), `delay` (seconds before answering), `chunks` (content
chunks streamed) with `chunk_pause` between them, `drop_after` (cut the connection after N chunks),
`error_after` (send an SSE error event after N chunks), `hold_answers` (a non-streaming answer waits for
`release`), `hold_after` (after N chunks wait until `release` is set), `hold_usage` (wait for `usage_release`
before the usage chunk), `reply` (the answer's text for a request), `extra_message` / `extra_delta` /
`extra_chunk` / `extra_top` / `usage_extra` (fields it answers with, in the message, every content delta, every
chunk, the answer and the usage), `answer_model` (the
model its answers name; default the one asked for), `compact` (stream chunks written as compact JSON, as OpenRouter
writes them, rather than with Python's `", "` and `": "`), and `models` (the `GET /models` list) or
`models_status`. It counts calls and records every request's JSON body and headers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

CONTENT_PIECE = "hello "  # one cl100k token per chunk


def openrouter_model(model_id: str, *, prompt: str, completion: str, cache_read: str | None = None,
                     context_length: int = 128_000, max_completion_tokens: int | None = 8_192) -> dict[str, Any]:
    pricing = {"prompt": prompt, "completion": completion, "request": "0", "image": "0"}
    if cache_read is not None:
        pricing["input_cache_read"] = cache_read
    return {
        "id": model_id, "name": model_id, "created": 1_700_000_000, "context_length": context_length,
        "pricing": pricing,
        "top_provider": {"context_length": context_length, "max_completion_tokens": max_completion_tokens},
        "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
    }


def _piece(text: str, index: int, pieces: int) -> str:
    """The index-th of `pieces` consecutive slices of `text` (together, all of it)."""
    size = -(-len(text) // pieces)
    return text[index * size:(index + 1) * size]


@dataclass
class FakeUpstream:
    usage: str = "present"  # present | absent | zero
    prompt_tokens: int = 12
    completion_tokens: int = 5
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost: str | None = "0.000123"
    status: int | None = None
    error_message: str = "upstream says no"
    delay: float = 0.0
    chunks: int = 5
    chunk_pause: float = 0.0
    drop_after: int | None = None
    error_after: int | None = None
    hold_after: int | None = None
    hold_answers: bool = False  # a non-streaming call waits for `release` before it answers
    hold_usage: bool = False
    extra_message: dict[str, Any] = field(default_factory=dict)
    # The answer's text for a request body (streamed in `chunks` pieces); None: CONTENT_PIECE per chunk.
    reply: Callable[[dict[str, Any]], str] | None = None
    extra_delta: dict[str, Any] = field(default_factory=dict)
    extra_chunk: dict[str, Any] = field(default_factory=dict)
    extra_top: dict[str, Any] = field(default_factory=dict)
    usage_extra: dict[str, Any] = field(default_factory=dict)
    answer_model: str | None = None
    compact: bool = False
    finish_reason: str = "stop"  # how the answer (or a stream's last chunk) says it ended
    models: list[dict[str, Any]] = field(default_factory=list)
    models_status: int | None = None
    calls: Counter[str] = field(default_factory=Counter)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    usage_release: asyncio.Event = field(default_factory=asyncio.Event)
    finished: int = 0  # chat calls whose whole answer was written
    held: asyncio.Event = field(default_factory=asyncio.Event)  # set when a stream reaches `hold_after`

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v1/chat/completions", self.chat)
        app.router.add_get("/api/v1/models", self.list_models)
        return app

    def usage_body(self) -> dict[str, Any]:
        zero = self.usage == "zero"
        prompt = 0 if zero else self.prompt_tokens
        completion = 0 if zero else self.completion_tokens
        body: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0 if zero else self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": 0 if zero else self.reasoning_tokens},
        }
        if self.cost is not None:
            body["cost"] = 0 if zero else float(self.cost)
        return {**body, **self.usage_extra}

    async def list_models(self, request: web.Request) -> web.Response:
        self.calls["models"] += 1
        if self.models_status is not None:
            return web.json_response({"error": {"message": "catalog down"}}, status=self.models_status)
        return web.json_response({"data": self.models})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.calls["chat"] += 1
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.hold_answers and not body.get("stream"):
            await self.release.wait()
        if self.status is not None:
            return web.json_response({"error": {"message": self.error_message, "code": self.status}},
                                     status=self.status)
        if body.get("stream"):
            return await self._stream(request, body)
        content = self.reply(body) if self.reply is not None else CONTENT_PIECE * self.chunks
        message = {"role": "assistant", "content": content, **self.extra_message}
        answer: dict[str, Any] = {
            "id": "gen-fake-1", "object": "chat.completion", "created": int(time.time()),
            "model": self.answer_model or body.get("model"), "provider": "FakeProvider",
            "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason}],
            **self.extra_top,
        }
        if self.usage != "absent":
            answer["usage"] = self.usage_body()
        self.finished += 1
        return web.json_response(answer)

    def _chunk(self, body: dict[str, Any], delta: dict[str, Any], finish: str | None) -> bytes:
        chunk = {"id": "gen-fake-1", "object": "chat.completion.chunk", "created": 1_700_000_000,
                 "model": self.answer_model or body.get("model"), "provider": "FakeProvider",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **self.extra_chunk}
        return self._event(chunk)

    def _event(self, data: dict[str, Any]) -> bytes:
        text = json.dumps(data, separators=(",", ":")) if self.compact else json.dumps(data)
        return b"data: " + text.encode() + b"\n\n"

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b": OPENROUTER PROCESSING\n\n")
        for index in range(self.chunks):
            if index == self.drop_after:
                assert request.transport is not None
                request.transport.abort()
                return response
            if index == self.error_after:
                error = {"error": {"message": "provider crashed", "code": 502}}
                await response.write(b"data: " + json.dumps(error).encode() + b"\n\n")
                return response
            if index == self.hold_after:
                self.held.set()
                await self.release.wait()
            if index and self.chunk_pause:
                await asyncio.sleep(self.chunk_pause)
            piece = CONTENT_PIECE if self.reply is None else _piece(self.reply(body), index, self.chunks)
            delta = {"role": "assistant", "content": piece} if index == 0 else {"content": piece}
            delta.update(self.extra_delta)
            last = index == self.chunks - 1
            await response.write(self._chunk(body, delta, self.finish_reason if last else None))
        if self.hold_after == self.chunks:
            self.held.set()
            await self.release.wait()
        if self.hold_usage:
            await self.usage_release.wait()
        include = (body.get("stream_options") or {}).get("include_usage")
        if include and self.usage != "absent":
            usage_chunk = {"id": "gen-fake-1", "object": "chat.completion.chunk", "created": 1_700_000_000,
                           "model": self.answer_model or body.get("model"), "choices": [], "usage": self.usage_body()}
            await response.write(self._event(usage_chunk))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        self.finished += 1
        return response
