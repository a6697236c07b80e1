"""Failover: one call tried on a model's providers in turn, under the one hold it already has (issue 15).

`Routing.run(send)` calls `send(route, upstream)` on each provider gateway.routing orders, until one succeeds.
`send` covers everything before output reaches the client (the request, and the answer or a stream's first data
event), so a provider can still be left while the client has seen nothing. A failure that says nothing of the
request (no connection, a timeout, a 5xx, a 429, a malformed answer, an upstream that is not configured) moves on
to the next provider and counts against its circuit breaker; a 4xx caused by the request itself (400, 404, 413,
422 upstream) is the client's answer at once, and is not tried elsewhere.

After the last provider: 502 `ALL_PROVIDERS_EXHAUSTED` naming what each did (the caller voids the hold, so
nothing is charged). A model without `providers` has one provider and no breaker: its failure is answered as it
always was (502 `UPSTREAM_ERROR`, 429 `RATE_LIMITED`).

Every attempt (provider, upstream status, error code, duration) is laid on the call's request record, with the
provider that served it, whichever way the hold ends.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from billing.catalog import CatalogEntry
from billing.catalog_config import ModelConfig
from billing.holds import Hold
from gateway.breaker import Breakers
from gateway.keys import SETTINGS
from gateway.metrics import METRICS
from gateway.routing import Preference, Route, order, parse_preference, routes_of
from gateway.upstream import Upstream, UpstreamError, upstream_named

T = TypeVar("T")

# The app's circuit breakers, one per provider (upstream and model id), in this process.
BREAKERS = web.AppKey("breakers", Breakers)
PROVIDER_HEADER = "X-Meterline-Provider"
MODEL_HEADER = "X-Meterline-Model"
# Order among providers of equal priority: not a secret, and not the global generator others share.
_SHUFFLE = random.Random()


def retryable(exc: UpstreamError) -> bool:
    """Whether another provider may serve the call: every failure but the request's own fault (a 400 from an
    upstream that read the request and refused it)."""
    return exc.status != 400


@dataclass(frozen=True, slots=True)
class Attempt:
    provider: str
    upstream_status: int | None  # the provider's HTTP status; None when no answer came
    error_code: str | None  # None: it served the call
    duration_ms: int

    def as_json(self) -> dict[str, Any]:
        # Spelled out: dataclasses.asdict deep-copies field by field, about 30 µs a call on the hot path.
        return {"provider": self.provider, "upstream_status": self.upstream_status, "error_code": self.error_code,
                "duration_ms": self.duration_ms}


class Routing:
    """The providers of one call, the attempts made on them, and the one that served it."""

    def __init__(self, app: web.Application, model_id: str, config: ModelConfig | None, *, upstream: str,
                 forwarded_id: str, preference: Mapping[str, Any] | None = None) -> None:
        self.app = app
        self.model_id = model_id
        self.routes = routes_of(config, upstream=upstream, forwarded_id=forwarded_id)
        self.routed = getattr(config, "providers", None) is not None
        self.preference = parse_preference(preference, self.routes) if self.routed else Preference()
        self.breakers = app[BREAKERS] if self.routed else None
        self.attempts: list[Attempt] = []
        self.served: Route | None = None

    @classmethod
    def of_entry(cls, app: web.Application, entry: CatalogEntry,
                 preference: Mapping[str, Any] | None = None) -> Routing:
        return cls(app, entry.id, entry.config, upstream=entry.upstream, forwarded_id=entry.forwarded_id,
                   preference=preference)

    @property
    def first(self) -> Route:
        """The provider a dry run names: the first that would be tried now."""
        tried, skipped = order(self.routes, self.preference, self.breakers, _SHUFFLE)
        return (tried or skipped or self.routes)[0]

    def check_configured(self) -> None:
        """Before anything is held: a model none of whose upstreams is configured answers 503 at once."""
        configured = self.app[SETTINGS].upstreams
        if not any(route.upstream in configured for route in self.routes):
            upstream_named(self.app, self.routes[0].upstream)  # raises UPSTREAM_NOT_CONFIGURED, naming it

    def headers(self) -> dict[str, str]:
        """X-Meterline-Provider and X-Meterline-Model, once a provider served the call."""
        if self.served is None:
            return {}
        return {PROVIDER_HEADER: self.served.name, MODEL_HEADER: self.served.model}

    def record_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"attempts": [attempt.as_json() for attempt in self.attempts] or None}
        if self.served is not None:
            fields.update(provider=self.served.name, provider_model=self.served.model,
                          upstream=self.served.upstream)
        return fields

    async def run(self, hold: Hold | None, send: Callable[[Route, Upstream], Awaitable[T]]) -> T:
        """`send` on each provider in turn until one succeeds; the hold's record carries the attempts after."""
        try:
            return await self._run(send)
        finally:
            if hold is not None:
                hold.record = dataclasses.replace(hold.record, **self.record_fields())

    async def _run(self, send: Callable[[Route, Upstream], Awaitable[T]]) -> T:
        tried, skipped = order(self.routes, self.preference, self.breakers, _SHUFFLE)
        breakers = self.breakers
        failures: list[tuple[Route, UpstreamError]] = []
        for route in tried:
            key = route.breaker_key
            if breakers is not None and not breakers.acquire(key):
                skipped.append(route)  # another call took its half-open trial meanwhile
                continue
            started = time.monotonic()
            try:
                result = await send(route, upstream_named(self.app, route.upstream))
            except UpstreamError as exc:
                self._attempt(route, started, exc.upstream_status, exc.code,
                              "failed" if retryable(exc) else "refused")
                if not retryable(exc):
                    if breakers is not None:
                        breakers.release(key)  # the request's fault says nothing of the provider
                    raise
                if breakers is not None:
                    breakers.failed(key)
                failures.append((route, exc))
                continue
            except BaseException:
                if breakers is not None:
                    breakers.release(key)
                raise
            if breakers is not None:
                breakers.succeeded(key)
            self._attempt(route, started, 200, None, "served")
            self.served = route
            return result
        raise self._exhausted(failures, skipped)

    def _attempt(self, route: Route, started: float, status: int | None, code: str | None,
                 outcome: str) -> None:
        self.attempts.append(Attempt(route.name, status, code,
                                     max(0, int((time.monotonic() - started) * 1000))))
        if self.routed:
            self.app[METRICS].provider_attempt(route.upstream, route.model, outcome)

    def _exhausted(self, failures: list[tuple[Route, UpstreamError]], skipped: list[Route]) -> UpstreamError:
        if not self.routed and failures:
            return failures[-1][1]  # one provider: its own error, as before providers existed
        said = [f"{route.name} ({_what(exc)})" for route, exc in failures]
        said += [f"{route.name} (skipped: failing recently)" for route in skipped]
        headers = None
        if not failures and skipped and self.breakers is not None:
            wait = min(self.breakers.retry_in(route.breaker_key) for route in skipped)
            headers = {"Retry-After": str(max(1, math.ceil(wait)))}
        return UpstreamError(502, "ALL_PROVIDERS_EXHAUSTED",
                             f"Every provider of model {self.model_id} failed: {', '.join(said)}; nothing was "
                             "charged", upstream_status=None, headers=headers)


def _what(exc: UpstreamError) -> str:
    if exc.code == "UPSTREAM_NOT_CONFIGURED":
        return "not configured"
    if exc.upstream_status is None:
        return "no answer"
    return f"status {exc.upstream_status}"
