"""A fast fake OpenAI-compatible upstream for the benchmark: chat completions (plain and SSE) and a model list.

Its knobs (latency, SSE chunk count and pacing) are set for the whole process through `POST /_bench/config`, so
every arm (direct, bare proxy, Meterline, LiteLLM) sees the same upstream without passing anything through.
Responses always carry `usage`; a streamed response sends it in its last chunk before `[DONE]`.

    python -m bench.upstream --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from aiohttp import web

MODEL = "bench/fast"
COMPLETION_TOKENS = 8
# OpenRouter's catalog format: USD per token as decimal strings. $1 / $2 per million tokens.
PROMPT_PRICE = "0.000001"
COMPLETION_PRICE = "0.000002"

KNOBS = web.AppKey("knobs", dict[str, float])
COUNTS = web.AppKey("counts", dict[str, int])


def prompt_tokens(body: bytes) -> int:
    """A stable stand-in for a tokenizer: one token per 4 bytes of request body."""
    return max(1, len(body) // 4)


def _usage(prompt: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": COMPLETION_TOKENS,
            "total_tokens": prompt + COMPLETION_TOKENS}


def _completion(model: str, prompt: int) -> bytes:
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "bench " * COMPLETION_TOKENS}}],
        "usage": _usage(prompt),
    }, separators=(",", ":")).encode()


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    payload = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": int(time.time()),
               "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    request.app[COUNTS]["chat"] += 1
    knobs = request.app[KNOBS]
    try:
        data = json.loads(body)
    except ValueError:
        return web.json_response({"error": {"message": "body is not JSON", "type": "invalid_request_error"}},
                                 status=400)
    model = str(data.get("model", MODEL))
    prompt = prompt_tokens(body)
    if knobs["latency_ms"] > 0:
        await asyncio.sleep(knobs["latency_ms"] / 1000)
    if not data.get("stream"):
        return web.Response(body=_completion(model, prompt), content_type="application/json")

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    chunks = int(knobs["chunks"])
    pace = knobs["pace_ms"] / 1000
    await response.write(_chunk(model, {"role": "assistant", "content": ""}))
    for i in range(chunks):
        if pace > 0 and i > 0:
            await asyncio.sleep(pace)
        await response.write(_chunk(model, {"content": "tok "}))
    tail = _chunk(model, {}, "stop")
    if (data.get("stream_options") or {}).get("include_usage"):
        usage = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": int(time.time()),
                 "model": model, "choices": [], "usage": _usage(prompt)}
        tail += b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n"
    await response.write(tail + b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def models(request: web.Request) -> web.Response:
    entry = {
        "id": MODEL, "name": "Benchmark model", "context_length": 131072,
        "pricing": {"prompt": PROMPT_PRICE, "completion": COMPLETION_PRICE},
        "top_provider": {"max_completion_tokens": 4096},
    }
    return web.json_response({"object": "list", "data": [entry]})


async def set_config(request: web.Request) -> web.Response:
    """Set latency_ms, chunks and pace_ms (any subset); answers with the knobs now in force."""
    knobs = request.app[KNOBS]
    for name, value in (await request.json()).items():
        if name not in knobs:
            raise web.HTTPBadRequest(text=f"unknown knob {name!r}")
        knobs[name] = float(value)
    return web.json_response(knobs)


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[COUNTS])


def create_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[KNOBS] = {"latency_ms": 0.0, "chunks": 32.0, "pace_ms": 10.0}
    app[COUNTS] = {"chat": 0}
    for prefix in ("", "/v1", "/api/v1"):
        app.router.add_post(f"{prefix}/chat/completions", chat)
        app.router.add_get(f"{prefix}/models", models)
    app.router.add_post("/_bench/config", set_config)
    app.router.add_get("/_bench/stats", stats)
    app.router.add_get("/healthz", stats)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(create_app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
