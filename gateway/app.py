"""The application factory: routes, middlewares and every shared resource, opened in cleanup contexts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from billing import conversations, db, schema
from billing.batcher import LedgerBatcher
from billing.errors import DatabaseUnavailable
from billing.holds import Holds
from billing.keys import KeyStore, follow_key_changes
from billing.quotas import QuotaBook, QuotaRules
from billing.tasks import TaskOwner
from gateway import (
    access,
    admin,
    auth,
    auto_topup_api,
    auto_topup_worker,
    chat,
    console,
    consumer,
    conversations_api,
    grants_api,
    images,
    media_poller,
    metrics,
    models_api,
    payments_api,
    server,
    upstream,
    usage,
    videos,
    webhook_worker,
    webhooks_api,
    wire,
)
from gateway import openapi as openapi_document
from gateway.breaker import Breakers
from gateway.contract import Answer, operation
from gateway.errors import error_middleware
from gateway.failover import BREAKERS
from gateway.keys import CATALOG, HOLDS, HTTP, KEY_STORE, POOL, QUOTAS, SETTINGS, TASKS
from gateway.render import json_response
from gateway.settings import Settings, SettingsError
from gateway.tasks import start_housekeeping, start_sweeper

# The group commit of holds and settlements (only the hold lifecycle, billing.holds, uses it).
BATCHER = web.AppKey("batcher", LedgerBatcher)


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    url = settings.database_url
    if url is None:
        url = await asyncio.to_thread(db.embedded_database_url, settings.data_dir)
    health = db.Health()
    pool = await db.create_pool(url, min_size=settings.pool_min_size, max_size=settings.pool_max_size,
                                health=health, command_timeout=settings.database_timeout_seconds)
    try:
        async with pool.acquire() as conn:
            await schema.migrate(conn)
            if not await conversations.has_language(conn, settings.memory_language):
                raise SettingsError(f"invalid setting memory_language: {settings.memory_language!r} is not a text "
                                    "search configuration of this database (SELECT cfgname FROM pg_ts_config)")
        app[POOL] = pool
        app[KEY_STORE] = KeyStore(pool, ttl_seconds=settings.key_cache_seconds,
                                  notified_ttl_seconds=settings.key_cache_notified_seconds)
        app[BATCHER] = LedgerBatcher(pool, max_batch=settings.ledger_batch_max, observe=app[metrics.METRICS].batch)
        listener = asyncio.create_task(
            follow_key_changes(lambda: db.connect(url, health=health,
                                                  command_timeout=settings.database_timeout_seconds),
                               app[KEY_STORE]),
            name="key-change listener")
        try:
            yield
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
    finally:
        if BATCHER in app:
            await app[BATCHER].close()  # batches still queued are written before the pool goes
        await pool.close()


async def tasks_ctx(app: web.Application) -> AsyncIterator[None]:
    """The task owner and the hold lifecycle. Closed before the upstream session and the pool: settlements in
    flight (streams still being read for their usage included) finish first, up to `shutdown_grace_seconds`."""
    settings = app[SETTINGS]
    tasks = TaskOwner()
    app[TASKS] = tasks
    book = None
    if settings.quotas:
        book = QuotaBook(app[POOL], QuotaRules(
            share_ppm=settings.quota_share_ppm, min_calls=settings.quota_min_calls,
            beat_seconds=settings.quota_beat_seconds, horizon_seconds=settings.quota_horizon_seconds,
            idle_seconds=settings.quota_idle_seconds, call_ttl_seconds=settings.hold_ttl_seconds,
            lease_seconds=settings.quota_lease_seconds),
            events=app[metrics.METRICS])
        app[QUOTAS] = book
        tasks.background(book.run(), "quota beat")
    app[HOLDS] = Holds(app[POOL], app[BATCHER], tasks, ttl_seconds=settings.hold_ttl_seconds,
                       void_wait_seconds=settings.stream_settle_wait_seconds, events=app[metrics.METRICS],
                       quotas=book)
    start_sweeper(app)
    start_housekeeping(app)
    yield
    await tasks.close(grace_seconds=settings.shutdown_grace_seconds)


async def http_client_ctx(app: web.Application) -> AsyncIterator[None]:
    """One ClientSession for all upstream calls: its connector pools and reuses connections. Timeouts are set
    per upstream on each call."""
    upstream.report_unconfigured(app[SETTINGS])
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300)
    async with aiohttp.ClientSession(connector=connector) as session:
        app[HTTP] = session
        yield


@operation("Liveness: the process answers", answer=wire.Health, database=False)
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@operation("Readiness: the database answers (the catalog's state is reported, not required)",
           answer=(Answer(wire.Readiness, description="Ready"),
                   Answer(wire.Readiness, status=503, description="The database is not answering")),
           database=False)
async def readyz(request: web.Request) -> web.Response:
    checks: dict[str, str] = {}
    try:
        await db.ping(request.app[POOL], timeout=2)
        checks["database"] = "ok"
    except DatabaseUnavailable:
        checks["database"] = "unavailable"
    ready = all(v == "ok" for v in checks.values())
    # The catalog is reported, not required: with a stale or local-only catalog the gateway still serves.
    return json_response({"status": "ready" if ready else "unavailable", "checks": checks,
                          "catalog": request.app[CATALOG].status()},
                         status=200 if ready else 503)


def create_app(settings: Settings) -> web.Application:
    # Under `serve --workers N` the supervisor set PROMETHEUS_MULTIPROC_DIR: the figures of all processes add up.
    observed = metrics.Metrics(multiprocess=metrics.multiprocess_dir())
    app = web.Application(middlewares=[access.middleware(observed, access_log=settings.access_log),
                                       error_middleware])
    app.on_response_prepare.append(auth.stamp_response)
    app[SETTINGS] = settings
    app[metrics.METRICS] = observed
    app[BREAKERS] = Breakers(threshold=settings.provider_failure_threshold,
                             cooldown_seconds=settings.provider_cooldown_seconds, on_change=observed.circuit_changed)
    app.cleanup_ctx.append(database_ctx)
    app.cleanup_ctx.append(http_client_ctx)
    app.cleanup_ctx.append(tasks_ctx)  # after the pool and the session, so it is closed (drained) before them
    app.cleanup_ctx.append(models_api.catalog_ctx)  # after tasks_ctx: its refresh task
    app.cleanup_ctx.append(media_poller.media_poller_ctx)  # after tasks_ctx: its polling task
    app.cleanup_ctx.append(webhook_worker.webhook_worker_ctx)  # after tasks_ctx: its delivery loop
    app.cleanup_ctx.append(auto_topup_worker.auto_topup_worker_ctx)  # after tasks_ctx: its charging loop
    app.cleanup_ctx.append(metrics.metrics_ctx)  # after catalog_ctx: samples the pool and the catalog
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics.metrics_with_token)
    openapi_document.add_routes(app)
    consumer.add_routes(app)
    chat.add_routes(app)
    conversations_api.add_routes(app)
    webhooks_api.add_routes(app)
    payments_api.add_routes(app)
    auto_topup_api.add_routes(app)
    grants_api.add_routes(app)
    usage.add_routes(app)
    images.add_routes(app)
    videos.add_routes(app)
    app.add_subapp("/admin", admin.admin_app())
    app.add_subapp("/console", console.console_app())
    return app


def serve(settings: Settings, *, host: str, port: int, reuse_port: bool = False,
          print: Callable[[str], None] | None = None) -> None:
    """Serve until stopped: `meterline serve`, and each process of `serve --workers`. On uvloop's event loop
    unless `uvloop = false` (or it is not installed: it has no Windows build)."""
    loop: asyncio.AbstractEventLoop | None = None
    if settings.uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            loop = uvloop.new_event_loop()
    app = create_app(settings)
    listeners = []
    if settings.metrics_port is not None:
        # Every worker listens there too (SO_REUSEPORT): whichever answers a scrape reports every process.
        listeners.append(server.Listener(metrics.listener_app(app), settings.metrics_host, settings.metrics_port))
    server.run(app, host=host, port=port, loop=loop or asyncio.new_event_loop(), reuse_port=reuse_port,
               print=print, listeners=listeners)
