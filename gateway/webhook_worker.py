"""Delivering webhooks: a worker in every gateway process takes due deliveries from the outbox (billing.webhooks)
under a lease, signs each attempt by the Standard Webhooks scheme with the `standardwebhooks` package, POSTs it,
and records what happened.

Headers: `webhook-id` (the event's id, the same on every attempt), `webhook-timestamp` (this attempt's, in unix
seconds) and `webhook-signature` (`v1,<base64 HMAC-SHA256 of id.timestamp.body>`, one per secret that signs now:
during a rotation both the new and the old). The body is `{"type", "timestamp", "data"}`, the same on every attempt.

SSRF: unless `webhook_allow_private_targets`, only https URLs are called, and only public addresses are connected
to: a literal address is checked before the call, a hostname is resolved by a resolver that drops loopback,
private, link-local (the cloud metadata address among them) and reserved addresses, at connect time, on every
attempt. Redirects are not followed; at most WEBHOOK_BODY_LIMIT bytes of an answer are read.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from standardwebhooks import Webhook

from billing import webhooks
from billing.webhooks import Due
from gateway.keys import POOL, SETTINGS, TASKS
from gateway.metrics import METRICS
from gateway.render import iso
from gateway.tasks import every

log = logging.getLogger("meterline.webhooks")

WEBHOOK_BODY_LIMIT = 4_096
WORKER = web.AppKey("webhook_worker", object)


def public_address(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


class PublicResolver(AbstractResolver):
    """Resolves as aiohttp does, keeping only public addresses: a name that resolves only to loopback, private,
    link-local or reserved addresses cannot be connected to, whatever it resolved to at registration."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        public = [entry for entry in found if public_address(entry["host"])]
        if not public:
            raise OSError(errno.EACCES, f"{host} resolves to no public address")
        return public

    async def close(self) -> None:
        await self._inner.close()


def check_target(url: str, *, allow_private: bool) -> str | None:
    """Why `url` may not be called (None: it may): not http(s), not https without the private-targets setting, or
    a literal address that is not public."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "a webhook URL must be an http(s) URL with a host"
    if allow_private:
        return None
    if parts.scheme != "https":
        return "a webhook URL must use https"
    host = parts.hostname
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None  # a name: what it resolves to is checked at connect time (PublicResolver)
    return None if public_address(host) else "a webhook URL must point at a public address"


def body(due: Due) -> bytes:
    return json.dumps({"type": due.type, "timestamp": iso(due.created_at), "data": due.data},
                      separators=(",", ":"), ensure_ascii=False).encode()


def signed_headers(due: Due, payload: bytes, at: datetime) -> dict[str, str]:
    signatures = " ".join(Webhook(secret).sign(due.event_id, at, payload) for secret in due.secrets)
    return {"webhook-id": due.event_id, "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": signatures, "Content-Type": "application/json",
            "User-Agent": "Meterline-Webhooks/1"}


# The longest a receiver's Retry-After may put the next attempt off (the schedule's own longest wait is 10 h).
RETRY_AFTER_CAP_SECONDS = 36_000.0


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    """The seconds a 429 or 503 asks to wait (delta-seconds form), at most RETRY_AFTER_CAP_SECONDS."""
    if response.status not in (429, 503):
        return None
    value = response.headers.get("Retry-After", "").strip()
    return min(float(value), RETRY_AFTER_CAP_SECONDS) if value.isascii() and value.isdigit() else None


class Worker:
    def __init__(self, app: web.Application, session: aiohttp.ClientSession) -> None:
        self.app = app
        self.session = session
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{id(self)}"

    async def tick(self) -> None:
        settings = self.app[SETTINGS]
        due = await webhooks.claim_due(self.app[POOL], owner=self.owner, lease_seconds=settings.webhook_lease_seconds,
                                       limit=settings.webhook_batch)
        if due:
            await asyncio.gather(*(self.deliver(item) for item in due))

    async def deliver(self, due: Due) -> None:
        settings = self.app[SETTINGS]
        payload = body(due)
        status: int | None = None
        error: str | None = None
        retry_after: float | None = None
        started = time.monotonic()
        if not due.secrets:  # the account has never shown or used its secret: it is made now, once
            made = await webhooks.current_secret(self.app[POOL], due.account_id)
            due = webhooks.with_secrets(due, [made["secret"]])
        refused = check_target(due.url, allow_private=settings.webhook_allow_private_targets)
        if refused is not None:
            error = refused
        else:
            try:
                async with self.session.post(
                        due.url, data=payload, headers=signed_headers(due, payload, datetime.now(UTC)),
                        allow_redirects=False,
                        timeout=aiohttp.ClientTimeout(total=settings.webhook_timeout_seconds)) as response:
                    status = response.status
                    retry_after = _retry_after(response)
                    await response.content.read(WEBHOOK_BODY_LIMIT)
                    if not 200 <= status < 300:
                        error = f"answered {status}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
        state = await webhooks.attempted(
            self.app[POOL], due, owner=self.owner, status=status, error=error, retry_after=retry_after,
            duration_ms=int((time.monotonic() - started) * 1000), schedule=settings.webhook_retry_schedule_seconds,
            disable_after_seconds=settings.webhook_disable_after_seconds)
        self.app[METRICS].webhook_attempt(state)
        if state != "delivered":
            log.info("webhook %s to endpoint %s: %s (%s)", due.event_id, due.endpoint_id or "(job URL)", state,
                     error)


async def webhook_worker_ctx(app: web.Application) -> AsyncIterator[None]:
    """One delivery worker per process, with its own client session (and, unless private targets are allowed,
    the resolver that keeps only public addresses). Needs the task owner, so it goes after `tasks_ctx`."""
    settings = app[SETTINGS]
    resolver = None if settings.webhook_allow_private_targets else PublicResolver()
    connector = aiohttp.TCPConnector(resolver=resolver, limit=100) if resolver else aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:
        worker = Worker(app, session)
        app[WORKER] = worker
        loop = app[TASKS].background(every(settings.webhook_poll_seconds, worker.tick, "webhook delivery"),
                                     "webhook-worker")
        try:
            yield
        finally:
            # Stopped before its session closes. An attempt cut short here is not recorded: its lease runs out
            # and a process that is still running (or this one, restarted) makes it again.
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)


