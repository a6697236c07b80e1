"""A fake OpenRouter that bills as a provider could, for checking that what is forwarded is bounded by the hold.

Input: every text-bearing field it receives, counted with cl100k piece by piece (every string and key, and each
number's spelling), anywhere in the body but the model id, plus 3 tokens a message and 3 a request; each image
part as 765 tokens. Output: the largest output limit it was sent (`max_tokens`, `max_completion_tokens` or a
reasoning budget), for each of `n` choices; with no limit at all, 100,000 tokens a choice, as a model with a large
window might produce. It records every body.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from billing import tokens

IMAGE_TOKENS = 765
UNBOUNDED_OUTPUT = 100_000


def _billed(value: Any) -> int:
    if isinstance(value, str):
        return tokens.count_text(value)
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int | float):
        return tokens.count_text(str(value))
    if isinstance(value, list):
        return sum(_billed(item) for item in value)
    if isinstance(value, dict):
        if value.get("type") == "image_url":
            return IMAGE_TOKENS
        return sum(tokens.count_text(str(key)) + _billed(item) for key, item in value.items())
    return 0


def billed_input(body: dict[str, Any]) -> int:
    messages = body.get("messages") or []
    total = 3
    for message in messages:
        total += 3 + sum(_billed(item) for key, item in message.items() if key != "role") + _billed(
            message.get("role"))
    return total + sum(tokens.count_text(key) + _billed(value) for key, value in body.items()
                       if key not in ("model", "messages"))


def output_limit(body: dict[str, Any]) -> int:
    limits = [body.get(name) for name in ("max_tokens", "max_completion_tokens")]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict):
        limits.append(reasoning.get("max_tokens"))
    given = [limit for limit in limits if isinstance(limit, int)]
    return max(given) if given else UNBOUNDED_OUTPUT


@dataclass
class BillingUpstream:
    bodies: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/api/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        n = body.get("n") or 1
        prompt, completion = billed_input(body), output_limit(body) * n
        return web.json_response({
            "id": "gen-billing-1", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": i, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "length"}
                        for i in range(n)],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        })
