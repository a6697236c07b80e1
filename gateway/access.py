"""Every request, once answered: counted in the metrics and, with `access_log`, written as one access log line.

The middleware is the outermost one, so it sees the response the error middleware rendered (a refusal's error
rides on it, `errors.API_ERROR`) and times the whole request, a stream to its last byte. Handlers that resolve a
model or open a hold say so (`model`, `billed`), which is where the line's model and cost come from: the cost is
the settled charge when it has committed by the time the response ends (a stream's is, before its last events are
sent); a stream whose client left is settled later, after the upstream is drained, and its line carries no cost.

The line (logger `meterline.access`): method, route template, status, duration_ms, and model and cost_micros when
known; the request's ids come from the log context like every line's. Never a raw path, a query string, a header or
a body, so never a key.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from aiohttp.typedefs import Middleware

from billing.holds import Hold
from gateway.errors import API_ERROR, Handler
from gateway.logs import FIELDS
from gateway.metrics import NO_MODEL, REFUSAL_REASONS, UNMATCHED, UPSTREAM_RATE_LIMITED, Metrics
from gateway.upstream import UpstreamError

log = logging.getLogger("meterline.access")

# A request whose handler was cancelled because its client went away (nginx's convention: no response was sent).
CLIENT_CLOSED = 499

MODEL = web.RequestKey("access_model", str)
HOLD = web.RequestKey("access_hold", Hold)


def model(request: web.Request, model_id: str) -> None:
    """The request resolved this catalog model: its metrics and access line name it."""
    request[MODEL] = model_id


def billed(request: web.Request, hold: Hold) -> None:
    """The request is billed through `hold`: its model, and its charge once settled."""
    request[HOLD] = hold
    if hold.record.model:
        request[MODEL] = hold.record.model


def route_of(request: web.Request) -> str:
    """The matched route's template (a sub-app's with its prefix), or `unmatched` (404, 405)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


def cost_of(request: web.Request) -> int | None:
    hold = request.get(HOLD)
    resolution = hold.resolution if hold is not None else None
    if resolution is None or resolution.state != "settled":
        return None
    return int(resolution.actual_micros)


def _refusal(response: web.StreamResponse | None) -> str | None:
    error = response.get(API_ERROR) if response is not None else None
    if error is None:
        return None
    if isinstance(error, UpstreamError):
        return UPSTREAM_RATE_LIMITED if error.status == 429 else None
    return REFUSAL_REASONS.get(error.code)


def middleware(metrics: Metrics, *, access_log: bool) -> Middleware:
    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500  # an error that escaped every middleware: aiohttp answers 500
        response: web.StreamResponse | None = None
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:  # a redirect (the error middleware renders every error status)
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            seconds = time.perf_counter() - started
            route = route_of(request)
            model_id = request.get(MODEL, NO_MODEL)
            refusal = _refusal(response) if status in (402, 429) else None
            metrics.request(route, request.method, status, model_id, seconds, refusal)
            if access_log:
                _write(request.method, route, status, seconds, model_id, cost_of(request))

    return observe


def _write(method: str, route: str, status: int, seconds: float, model_id: str, cost: int | None) -> None:
    duration_ms = round(seconds * 1000, 1)
    fields: dict[str, object] = {"method": method, "route": route, "status": status, "duration_ms": duration_ms}
    text = f"{method} {route} {status} {duration_ms}ms"
    if model_id:
        fields["model"] = model_id
        text += f" model={model_id}"
    if cost is not None:
        fields["cost_micros"] = cost
        text += f" cost_micros={cost}"
    log.info("%s", text, extra={FIELDS: fields})
