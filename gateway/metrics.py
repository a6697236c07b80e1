"""Prometheus metrics: what every gateway process counts, and `GET /metrics` in Prometheus's text format.

One `Metrics` per app, made by the app factory. In one process its figures live in a registry of its own (so each
app, a test's included, starts from zero); under `meterline serve --workers N` the supervisor sets
PROMETHEUS_MULTIPROC_DIR before the workers start, prometheus-client then keeps every figure in a file per process
in that directory, and a scrape (answered by whichever worker) adds up every process's files (MultiProcessCollector):
counters and histograms sum, gauges as each one's `multiprocess_mode` says.

Labels are bounded by construction: a route is the matched route's template (`/v1/models/{model_id}`; no route:
`unmatched`), a model is a catalog entry's id (set only once the model resolved, so a client's unknown model is
no label), an upstream a configured upstream's name, a reason or kind one of a fixed set. Never a key, an account,
a prompt or a raw path.

What PostgreSQL knows (holds pending past their expiry, holds that expired unsettled) is read from it when a scrape
arrives, one statement, in the process that answers; the pool and catalog gauges are sampled there too and every
few seconds in every process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Hashable
from pathlib import Path
from typing import Concatenate, Generic, ParamSpec, TypeVar

import asyncpg
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from billing import db, reports
from billing.errors import DatabaseUnavailable
from billing.ledger import Reservation, Resolution
from gateway.auth import check_admin
from gateway.contract import Answer, operation
from gateway.keys import CATALOG, POOL, TASKS

log = logging.getLogger("meterline.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How often each process samples its pool and catalog gauges (a scrape samples its own process as well).
SAMPLE_SECONDS = 5.0
# The backlog read a scrape makes may not hold the scrape up for long when the database hangs.
BACKLOG_TIMEOUT_SECONDS = 2.0
UNMATCHED = "unmatched"
NO_MODEL = ""

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 10_000)

# 402 and 429 refusals: the error code (and who refused) as the label.
REFUSAL_REASONS = {
    "INSUFFICIENT_BALANCE": "insufficient_balance",
    "KEY_LIMIT_EXCEEDED": "key_limit_exceeded",
    "RATE_LIMITED": "key_rate_limited",
}
UPSTREAM_RATE_LIMITED = "upstream_rate_limited"
# The fixed label values of the counters below, each series made at 0 from the start (so that a rate or an
# increase sees its first event, and a dashboard shows the series before anything happened).
HOLD_EVENTS = ("reserved", "settled", "voided", "expired")
REFUSALS = (("402", "insufficient_balance"), ("402", "key_limit_exceeded"), ("429", "key_rate_limited"),
            ("429", UPSTREAM_RATE_LIMITED))
# A stream whose client left, read on for its usage: how that ended.
DRAIN_OUTCOMES = ("usage", "ended_without_usage", "timeout", "upstream_error")
# The state a webhook attempt leaves its delivery in (billing.webhooks.attempted).
WEBHOOK_OUTCOMES = ("delivered", "pending", "exhausted", "cancelled")


def multiprocess_dir() -> str | None:
    """The directory prometheus-client's multiprocess mode uses, if this process runs in it."""
    return os.environ.get(MULTIPROC_ENV) or None


def fresh_directory() -> tuple[Path, bool]:
    """The workers' shared metrics directory, empty: the operator's PROMETHEUS_MULTIPROC_DIR (cleared of an earlier
    run's files, whose counters would otherwise be added to this run's), else a new one. Returns it and whether it
    was made here (to be removed at the end)."""
    named = os.environ.get(MULTIPROC_ENV)
    if named:
        path = Path(named)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        return path, False
    return Path(tempfile.mkdtemp(prefix="meterline-metrics-")), True


P = ParamSpec("P")
M = TypeVar("M", Counter, Histogram)


class _Children(Generic[M]):
    """A labelled metric's children by their label values, kept in a dict: prometheus-client's `labels()` checks
    and locks on every call (about 1.5 µs), a dict lookup takes a tenth of that, on every request. The label values
    are bounded (see the module's docstring), and so is the dict."""

    __slots__ = ("_known", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._known: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._known.get(values)
        if child is None:
            child = self._known[values] = self._metric.labels(*values)
        return child


def _guarded(record: Callable[Concatenate[Metrics, P], None]) -> Callable[Concatenate[Metrics, P], None]:
    """A figure that cannot be recorded is lost, and said once: it never fails the request or the money step that
    reported it (a hold taken, a charge committed). In multiprocess mode a figure is written to a file that grows,
    which fails with OSError when its disk is full; in one process nothing here raises."""

    def guarded(self: Metrics, /, *args: P.args, **kwargs: P.kwargs) -> None:
        try:
            record(self, *args, **kwargs)
        except OSError as exc:
            if not self.failing:
                self.failing = True
                log.warning("a metric could not be recorded (%s): the figures are incomplete from now on", exc)

    return guarded


class Metrics:
    """Every metric Meterline exports, with the few methods the code that counts calls."""

    def __init__(self, *, multiprocess: str | None = None) -> None:
        self.multiprocess = multiprocess
        # Multiprocess: metrics write to the directory's files and a scrape reads them all; none is registered
        # (a registered one would be exported twice). Otherwise this app's own registry.
        own = None if multiprocess else CollectorRegistry()
        # No `_created` series (the time each counter was made): multiprocess mode has none, so one process would
        # export series that N processes do not, and nothing here reads them. A process-wide switch, never turned
        # back on.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self._own = own
        self.started = time.monotonic()
        self.failing = False  # a figure could not be recorded (said once)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=own)

        self.requests = counter("meterline_requests", "HTTP requests answered, by route template, method, status "
                                "and model (a catalog id; empty when no model was resolved)",
                                ("route", "method", "status", "model"))
        self.request_seconds = Histogram(
            "meterline_request_duration_seconds", "Time from a request's arrival to the end of its response (a "
            "stream's last byte), by route template", ("route",), buckets=_LATENCY_BUCKETS, registry=own)
        self.upstream_seconds = Histogram(
            "meterline_upstream_duration_seconds", "Time an upstream took to answer a call (until its response "
            "headers: for a stream, its first byte), by upstream", ("upstream",), buckets=_LATENCY_BUCKETS,
            registry=own)
        self.holds = counter("meterline_holds", "Holds by what happened to them: reserved, settled, voided, and "
                             "expired (by the sweeper, or found expired when resolved)", ("event",))
        self.held_micros = counter("meterline_held_micros", "Micros held by reservations")
        self.charged_micros = counter("meterline_charged_micros", "Micros charged by settlements")
        self.topped_up_micros = counter("meterline_topped_up_micros", "Micros credited by top-ups (admin API, Stripe)")
        self.refusals = counter("meterline_refusals", "Requests refused with 402 or 429, by status and reason",
                                ("status", "reason"))
        self.batch_size = Histogram("meterline_ledger_batch_size", "Holds or settlements committed together in "
                                    "one group commit, by kind (reserve, settle)", ("kind",),
                                    buckets=_BATCH_BUCKETS, registry=own)
        self.batch_seconds = Histogram("meterline_ledger_batch_commit_seconds", "Time one group commit's statement "
                                       "(one transaction, its commit included) took, by kind", ("kind",),
                                       buckets=_COMMIT_BUCKETS, registry=own)
        self.upstream_errors = counter("meterline_upstream_errors", "Upstream failures by upstream and kind",
                                       ("upstream", "kind"))
        self.stream_drains = counter("meterline_stream_drains", "Streams whose client left, read on for their "
                                     "usage, by how that ended", ("outcome",))
        self.webhook_deliveries = counter("meterline_webhook_deliveries", "Webhook delivery attempts by the state "
                                          "they left the delivery in (delivered, pending: to be retried, "
                                          "exhausted, cancelled: the endpoint answered 410)", ("outcome",))
        self.pool_in_use = Gauge("meterline_db_pool_in_use", "Database connections in use (summed over live "
                                 "processes)", registry=own, multiprocess_mode="livesum")
        self.pool_waiting = Gauge("meterline_db_pool_waiting", "Callers waiting for a database connection (summed "
                                  "over live processes)", registry=own, multiprocess_mode="livesum")
        self.catalog_age = Gauge("meterline_catalog_age_seconds", "Seconds since the model catalog was last loaded "
                                 "from the text upstream (never loaded: since start; 0 when remote loading is "
                                 "off); the stalest live process", registry=own, multiprocess_mode="livemax")
        self.pending_past_expiry = Gauge(
            "meterline_holds_pending_past_expiry", "Holds still pending after their expiry (PostgreSQL's count at "
            "the last scrape)", registry=own, multiprocess_mode="livemostrecent")
        self.expired_unsettled = Gauge(
            "meterline_holds_expired_unsettled", "Holds that expired with no charge ever arriving, all time "
            "(PostgreSQL's count at the last scrape)", registry=own, multiprocess_mode="livemostrecent")
        self.provider_attempts = counter(
            "meterline_provider_attempts", "Calls sent to a provider of a model with several, by upstream, the "
            "provider's model id and outcome (served; failed: the call moved on; refused: the request's own "
            "fault)", ("upstream", "model", "outcome"))
        self.circuit_changes = counter(
            "meterline_provider_circuit_changes", "Circuit breaker state changes of a provider, by upstream, model "
            "id and the state entered (open, half_open, closed)", ("upstream", "model", "state"))
        self.circuit_open = Gauge(
            "meterline_provider_circuit_open", "1 while a provider's breaker is open or half-open in some live "
            "process (it is skipped there), else 0", ("upstream", "model"), registry=own,
            multiprocess_mode="livemax")
        self.quota_events = counter(
            "meterline_quota_events", "Quota grants (billing.quotas) by event: taken, grown, shrunk (room given "
            "back with calls in flight), returned", ("event",))
        self.quota_micros = counter(
            "meterline_quota_micros", "Micros added to quota grants (taken, grown) or given back from them "
            "(shrunk, returned), by event", ("event",))
        self.processes = Gauge("meterline_processes", "Gateway processes serving (live ones)", registry=own,
                               multiprocess_mode="livesum")
        self.processes.set(1)
        self._requests = _Children(self.requests)
        self._request_seconds = _Children(self.request_seconds)
        self._upstream_seconds = _Children(self.upstream_seconds)
        self._holds = _Children(self.holds)
        self._refusals = _Children(self.refusals)
        self._batch_size = _Children(self.batch_size)
        self._batch_seconds = _Children(self.batch_seconds)
        self._upstream_errors = _Children(self.upstream_errors)
        self._drains = _Children(self.stream_drains)
        self._webhooks = _Children(self.webhook_deliveries)
        for event in HOLD_EVENTS:
            self._holds(event)
        for status, reason in REFUSALS:
            self._refusals(status, reason)
        for outcome in DRAIN_OUTCOMES:
            self._drains(outcome)
        for outcome in WEBHOOK_OUTCOMES:
            self._webhooks(outcome)

    # --- what the code that counts calls (each guarded: see _guarded) ---

    @_guarded
    def request(self, route: str, method: str, status: int, model: str, seconds: float,
                refusal: str | None) -> None:
        self._requests(route, method, str(status), model).inc()
        self._request_seconds(route).observe(seconds)
        if refusal is not None:
            self._refusals(str(status), refusal).inc()

    @_guarded
    def reserved(self, reservation: Reservation) -> None:
        self._holds("reserved").inc()
        self.held_micros.inc(reservation.granted_micros)

    @_guarded
    def resolved(self, resolution: Resolution) -> None:
        self._holds(resolution.state).inc()
        if resolution.state == "settled":
            self.charged_micros.inc(resolution.actual_micros)

    @_guarded
    def quota(self, event: str, micros: int) -> None:
        self.quota_events.labels(event).inc()
        self.quota_micros.labels(event).inc(max(micros, 0))

    @_guarded
    def expired(self, count: int) -> None:
        if count:
            self._holds("expired").inc(count)

    @_guarded
    def topped_up(self, micros: int) -> None:
        self.topped_up_micros.inc(micros)

    @_guarded
    def batch(self, kind: str, size: int, seconds: float) -> None:
        self._batch_size(kind).observe(size)
        self._batch_seconds(kind).observe(seconds)

    @_guarded
    def upstream_time(self, upstream: str, seconds: float) -> None:
        self._upstream_seconds(upstream).observe(seconds)

    @_guarded
    def upstream_error(self, upstream: str, kind: str) -> None:
        self._upstream_errors(upstream, kind).inc()

    @_guarded
    def provider_attempt(self, upstream: str, model: str, outcome: str) -> None:
        self.provider_attempts.labels(upstream, model, outcome).inc()

    @_guarded
    def circuit_changed(self, key: Hashable, state: str) -> None:
        upstream, model = key if isinstance(key, tuple) else (str(key), "")
        self.circuit_changes.labels(upstream, model, state).inc()
        self.circuit_open.labels(upstream, model).set(0 if state == "closed" else 1)

    @_guarded
    def drained(self, outcome: str) -> None:
        self._drains(outcome).inc()

    @_guarded
    def webhook_attempt(self, outcome: str) -> None:
        self._webhooks(outcome).inc()

    # --- exposition ---

    @_guarded
    def sample(self, pool: asyncpg.Pool | None, catalog_age: float) -> None:
        if pool is not None:
            in_use, waiting = db.pool_usage(pool)
            self.pool_in_use.set(in_use)
            self.pool_waiting.set(waiting)
        self.catalog_age.set(catalog_age)

    def exposition(self) -> bytes:
        if self._own is not None:
            return generate_latest(self._own)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


METRICS = web.AppKey("metrics", Metrics)


def catalog_age(app: web.Application) -> float:
    """Seconds since the catalog's last good load; since this process started if it never loaded; 0 when the
    remote catalog is off (local models only: nothing can be stale)."""
    catalog = app.get(CATALOG)
    if catalog is None or not catalog.remote_enabled:
        return 0.0
    loaded = catalog.status()["loaded_at"]
    if loaded is None:
        return time.monotonic() - app[METRICS].started
    return max(0.0, time.time() - float(loaded.timestamp()))


def sample(app: web.Application) -> None:
    app[METRICS].sample(app.get(POOL), catalog_age(app))


async def scrape(app: web.Application) -> web.Response:
    """Sample this process, read the hold backlog from PostgreSQL, and render every figure."""
    metrics = app[METRICS]
    sample(app)
    pool = app.get(POOL)
    if pool is not None:
        try:
            async with asyncio.timeout(BACKLOG_TIMEOUT_SECONDS):
                past_expiry, expired_unsettled = await reports.hold_backlog(pool)
        except (DatabaseUnavailable, TimeoutError):
            pass  # the gauges keep their last values; the outage shows in the 503s (and in /readyz)
        else:
            metrics.pending_past_expiry.set(past_expiry)
            metrics.expired_unsettled.set(expired_unsettled)
    body = await asyncio.to_thread(metrics.exposition)  # multiprocess: reads every process's files
    response = web.Response(body=body)
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    response.charset = "utf-8"
    return response


@operation("Prometheus metrics, in its text format (the admin token; or without it on metrics_port)",
           answer=Answer(media=("text/plain",), description="Prometheus text exposition format 0.0.4"),
           database=False, security="adminToken")
async def metrics_with_token(request: web.Request) -> web.Response:
    """`GET /metrics` on the API's own port: the admin token is required, as for /admin."""
    check_admin(request)
    return await scrape(request.app)


MAIN_APP = web.AppKey("main_app", web.Application)


async def _listener_scrape(request: web.Request) -> web.Response:
    return await scrape(request.app[MAIN_APP])


def listener_app(main: web.Application) -> web.Application:
    """The app of the separate metrics listener (`metrics_port`): only `GET /metrics`, without a token (it is
    meant for an address only the scraper reaches), from the main app's metrics."""
    listener = web.Application()
    listener[MAIN_APP] = main
    listener.router.add_get("/metrics", _listener_scrape)
    return listener


async def _sampling(app: web.Application) -> None:
    while True:
        await asyncio.sleep(SAMPLE_SECONDS)
        sample(app)


async def metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    """Samples this process's gauges every few seconds (the other processes' scrapes see them). Needs the task
    owner, the pool and the catalog, so it goes after `catalog_ctx`."""
    app[TASKS].background(_sampling(app), "metrics-sampler")
    yield

