"""Serving an app on a real loopback port with a chosen `handler_cancellation`.

aiohttp's TestServer always turns handler cancellation on, but `meterline serve` runs with aiohttp's default
(off): there a client that leaves is noticed by a failed write, not by cancellation. Tests that care about the
difference serve the app through this instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web


@contextlib.asynccontextmanager
async def running(app: web.Application, *, handler_cancellation: bool) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1 with the given handler_cancellation; yields the base URL."""
    runner = web.AppRunner(app, handler_cancellation=handler_cancellation)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
