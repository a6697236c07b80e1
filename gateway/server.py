"""Serving the app: aiohttp's runner, with what reaches logs and clients about malformed requests guarded.

aiohttp answers a malformed request line or header (a control character, a bare LF, an obs-fold, a line over
8 KB) before any middleware runs: by default it logs the exception, whose text quotes the offending line, at
ERROR, and echoes that text in the 400 body. Either can carry `Authorization: Bearer ml-…`. Here such a request
is logged as one line naming only the kind of fault and the peer, and answered with an OpenAI-shaped 400 that
quotes nothing. The access log (off by default) writes one line per request without the query string, so a key
or token passed as a query parameter never reaches it.

This module and its tests are the only users of aiohttp's server internals (`RequestHandler.handle_error`,
`AppRunner._make_server`); a change in them fails tests/test_secrets.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web, web_protocol

from gateway.render import dumps

log = logging.getLogger("meterline.server")

_MALFORMED = {"error": {
    "message": "The HTTP request is malformed: a request line or a header is invalid (it is not echoed here)",
    "type": "invalid_request_error", "code": "INVALID_REQUEST", "param": None}}


class GuardedRequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, but a malformed request is logged and answered without its content."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status != 400:
            return super().handle_error(request, status, exc, message)
        log.info("refused a malformed HTTP request from %s (%s)", request.remote, type(exc).__name__)
        response = web.Response(status=400, text=dumps(_MALFORMED), content_type="application/json")
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, web.RequestPayloadError):
            # A body that could not be decoded (a bad Content-Encoding), met again while aiohttp drains it after
            # the 400 was sent: the client was already told; its bytes are not logged.
            log.info("discarded the rest of an undecodable request body (%s)", type(exc).__name__)
            return
        super().log_exception(*args, **kwargs)


class _GuardedServer(web.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """web.AppRunner whose connections are GuardedRequestHandlers."""

    async def _make_server(self) -> web.Server:
        loop = asyncio.get_running_loop()
        app = self._app
        app._set_loop(loop)
        app.on_startup.freeze()
        await app.startup()
        app.freeze()
        return _GuardedServer(app._handle, request_factory=app._make_request,  # type: ignore[arg-type]
                              loop=loop, **self._kwargs)


@dataclass(frozen=True, slots=True)
class Listener:
    """A further app served beside the main one, on its own address (the metrics listener)."""

    app: web.Application
    host: str
    port: int


def runner(app: web.Application, *, handle_signals: bool = False,
           handler_cancellation: bool = False) -> GuardedAppRunner:
    return GuardedAppRunner(app, handle_signals=handle_signals, handler_cancellation=handler_cancellation,
                            access_log=None)


async def _serve(app: web.Application, *, host: str, port: int, reuse_port: bool,
                 print: Callable[[str], None] | None, listeners: Sequence[Listener]) -> None:
    served = runner(app, handle_signals=True)
    await served.setup()
    extra: list[GuardedAppRunner] = []
    try:
        site = web.TCPSite(served, host, port, reuse_port=reuse_port or None)
        await site.start()
        for listener in listeners:
            # Started after the main app, whose start-up (the pool, the catalog) what they serve may read.
            side = runner(listener.app)
            extra.append(side)
            await side.setup()
            await web.TCPSite(side, listener.host, listener.port, reuse_port=reuse_port or None).start()
        if print is not None:
            print(f"======== Running on {site.name} ========\n(Press CTRL+C to quit)")
        await asyncio.Event().wait()  # until a signal (GracefulExit) or a stop cancels this
    finally:
        for side in reversed(extra):
            await side.cleanup()
        await served.cleanup()


def run(app: web.Application, *, host: str, port: int, loop: asyncio.AbstractEventLoop, reuse_port: bool = False,
        print: Callable[[str], None] | None = None, listeners: Sequence[Listener] = ()) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully (in-flight requests, then the app's cleanup:
    settlements in flight are drained), as web.run_app does."""
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(app, host=host, port=port, reuse_port=reuse_port, print=print,
                                   listeners=listeners))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                loop.run_until_complete(asyncio.gather(main, return_exceptions=True))
        finally:
            rest = asyncio.all_tasks(loop)
            for task in rest:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
