"""A webhook receiver on a real socket: records every request (headers and raw body) and answers from a script
of statuses (then 200), each with optional headers; `hold_first` keeps the first request waiting for `release`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class WebhookReceiver:
    answers: list[int] = field(default_factory=list)  # statuses to answer with, in order; then 200
    answer_headers: dict[str, str] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    hold_first: bool = False  # the first request waits for `release` before it is answered
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook", self.hook)
        return app

    async def hook(self, request: web.Request) -> web.Response:
        self.received.append(Received(dict(request.headers), await request.read()))
        self.arrived.set()
        if self.hold_first and len(self.received) == 1:
            await self.release.wait()
        status = self.answers.pop(0) if self.answers else 200
        return web.Response(status=status, text="ok", headers=self.answer_headers if status != 200 else None)
