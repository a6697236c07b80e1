"""POST images/generations (JSON) and images/edits (multipart), billed per image returned.

Flow: validate and price (size, quality, n) → dryRun answers here → claim the Idempotency-Key (a replay
answers here) → hold n times the unit price → forward with the upstream's key → settle on the images actually
returned, or void on any failure. The hold and its settlement run in app-owned tasks (gateway.settlement), so
a cancelled handler cannot skip them and a shutdown waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from billing import idempotency as idem
from billing import ledger
from billing.catalog_config import ImageModelConfig
from billing.errors import UnknownHold
from billing.media_pricing import ImageQuote, MediaPriceError, image_quote
from gateway import bodies, media, settlement
from gateway.auth import requires_key
from gateway.bodies import read_json_object
from gateway.consumer import CONSUMER_PREFIXES
from gateway.errors import REQUEST_ID, invalid
from gateway.keys import API_KEY, POOL, SETTINGS
from gateway.multipart import Form, multipart_body, read_form
from gateway.render import json_response, usd_number
from gateway.upstream import Upstream, UpstreamError
from gateway.upstream import request as upstream_request

log = logging.getLogger("meterline.images")

IMAGE_FIELDS = ("image", "image[]")
# Send = the upstream call for one route: it gets the upstream and returns the upstream's JSON answer.
Send = Callable[[Upstream], Awaitable[Any]]


def _n(value: object) -> int:
    if value is None:
        return 1
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():  # multipart fields are text
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid("n: must be an integer", "n")
    return value


def _quote(entry: ImageModelConfig, model: str, body: dict[str, Any]) -> ImageQuote:
    try:
        return image_quote(entry, model=model, size=media.optional_str(body, "size"),
                           quality=media.optional_str(body, "quality"), n=_n(body.get("n")))
    except MediaPriceError as exc:
        raise media.price_error(exc) from None


def _priced_fields(body: dict[str, Any], quote: ImageQuote) -> dict[str, str]:
    """Size and quality the client left out are sent explicitly, so what is generated is what was priced."""
    return {name: value for name, value in (("size", quote.size), ("quality", quote.quality))
            if body.get(name) is None}


@requires_key
async def generations(request: web.Request) -> web.Response:
    dry = bodies.dry_run(request.query)
    body = await read_json_object(request)
    model, entry = media.media_entry(request, body.get("model"), ImageModelConfig)
    media.required_prompt(body)
    quote = _quote(entry, model, body)
    upstream = media.media_upstream(request, entry)
    if dry:
        return await media.estimate_response(request, quote.estimate(), model=model, upstream=upstream)
    if body.get("stream"):
        raise invalid("stream: streaming image generation is not supported", "stream")
    outgoing = {**body, **_priced_fields(body, quote)}

    async def send(up: Upstream) -> Any:
        async with upstream_request(request.app, up, "POST", "images/generations",
                                    json_body=outgoing) as resp:
            return await resp.json()

    fingerprint = ledger.request_fingerprint("images/generations", body)
    return await _billed(request, model=model, quote=quote, upstream=upstream, fingerprint=fingerprint,
                         send=send)


@requires_key
async def edits(request: web.Request) -> web.Response:
    dry = bodies.dry_run(request.query)
    form = await read_form(request, max_bytes=request.app[SETTINGS].max_upload_bytes)
    try:
        body = form.as_dict()
        model, entry = media.media_entry(request, body.get("model"), ImageModelConfig)
        images = form.files_named(*IMAGE_FIELDS)
        if not images:
            raise invalid("image: is required (one or more image files)", "image")
        media.required_prompt(body)
        quote = _quote(entry, model, body)
        upstream = media.media_upstream(request, entry)
        if dry:
            return await media.estimate_response(request, quote.estimate(), model=model, upstream=upstream)
        if body.get("stream") not in (None, "false"):
            raise invalid("stream: streaming image edits are not supported", "stream")
        fields = form.fields + list(_priced_fields(body, quote).items())
        return await _billed(request, model=model, quote=quote, upstream=upstream,
                             fingerprint=ledger.request_fingerprint("images/edits", form.digest.hex()),
                             send=lambda up: _send_form(request, up, form, fields))
    finally:
        form.close()


async def _send_form(request: web.Request, upstream: Upstream, form: Form,
                     fields: list[tuple[str, str]]) -> Any:
    body = multipart_body(fields, form.files)
    async with upstream_request(request.app, upstream, "POST", "images/edits", data=body) as resp:
        return await resp.json()


def _returned(answer: Any) -> tuple[dict[str, Any], int]:
    if not isinstance(answer, dict) or not isinstance(answer.get("data", []), list):
        raise UpstreamError(502, "UPSTREAM_ERROR", "The upstream sent an image response without a data list",
                            upstream_status=200)
    return answer, len(answer.get("data") or [])


async def _billed(request: web.Request, *, model: str, quote: ImageQuote, upstream: Upstream,
                  fingerprint: bytes, send: Send) -> web.Response:
    """Hold, forward, settle (or void), under the Idempotency-Key when one was sent."""
    app = request.app
    pool = app[POOL]
    key = request[API_KEY]
    idem_key = media.idempotency_key(request)
    scope = idem.scope("images", key.account_id)
    if idem_key is not None:
        # A first request ends (upstream timeout) well within its hold's lifetime: a claim older than that
        # was orphaned by a process that died mid-request.
        stored = await idem.claim(pool, scope=scope, key=idem_key, fingerprint=fingerprint,
                                  stale_after_seconds=app[SETTINGS].hold_ttl_seconds)
        if stored is not None:
            return json_response(stored.response, status=stored.status_code,
                                 headers={"Idempotent-Replayed": "true"})
    request_id = request[REQUEST_ID]
    started = time.monotonic()
    record: dict[str, Any] = {
        "model": model, "modality": "image", "endpoint": request.path, "upstream": upstream.name,
        "quantity": quote.n,
    }
    outcome: dict[str, Any] | None = None  # set once the upstream answered: the response to store and send
    charge = 0
    failure = "the request did not complete"
    # The hold is taken in an app-owned task: if this handler is cancelled while it is being taken, the hold
    # still comes into being and `_resolve`, which waits for that task, voids it.
    reservation = settlement.own(app, ledger.reserve(
        pool, request_id=request_id, account_id=key.account_id, amount_micros=quote.hold_micros,
        ttl_seconds=app[SETTINGS].hold_ttl_seconds, key_id=key.id,
    ), f"reserve {request_id}")
    try:
        await asyncio.shield(reservation)
        answer, returned = _returned(await send(upstream))
        charge = quote.charge_micros(returned)
        record["quantity"] = min(returned, quote.n)
        metadata = answer.get("metadata")
        extra: dict[str, Any] = metadata if isinstance(metadata, dict) else {}
        outcome = {**answer, "metadata": {**extra, "cost_micros": charge,
                                          "cost": usd_number(charge), "request_id": request_id}}
    except UpstreamError as exc:
        failure = exc.message
        record.update(status="upstream_failure", error_code=exc.code)
        raise
    finally:
        record["duration_ms"] = int((time.monotonic() - started) * 1000)
        await settlement.shielded(app, _resolve(
            app, request_id=request_id, reservation=reservation, charge=charge, outcome=outcome, record=record,
            failure=failure, scope=scope, idem_key=idem_key), f"resolve {request_id}")
    return json_response(outcome, headers={"X-Cost-Micros": str(charge)})


async def _resolve(app: web.Application, *, request_id: str, reservation: asyncio.Task[ledger.Reservation],
                   charge: int, outcome: dict[str, Any] | None, record: dict[str, Any], failure: str, scope: str,
                   idem_key: str | None) -> None:
    """Settle what the upstream delivered, or void the hold; store or free the Idempotency-Key to match."""
    pool = app[POOL]
    await asyncio.wait([reservation])  # never raises the reservation's own error: that is the handler's answer

    async def once() -> None:
        # Settle, void and the key's store/release are all exactly-once or idempotent, so the whole transaction
        # may be retried after a lost connection (durably) without charging twice.
        async with pool.acquire() as conn, conn.transaction():
            if outcome is not None:  # the upstream delivered, so the hold exists
                await ledger.settle(conn, request_id=request_id, actual_micros=charge,
                                    record={**record, "status": "completed"})
            else:
                # Nothing delivered: void the hold if one was made (a reservation can fail after its commit).
                with contextlib.suppress(UnknownHold):
                    await ledger.void(conn, request_id=request_id, reason=failure,
                                      record={"status": "cancelled", **record})
            if idem_key is not None:
                if outcome is not None:
                    await idem.store(conn, scope=scope, key=idem_key, status_code=200, response=outcome)
                else:
                    await idem.release(conn, scope=scope, key=idem_key)

    await settlement.durably(once)


def add_routes(app: web.Application) -> None:
    for prefix in CONSUMER_PREFIXES:
        app.router.add_post(f"{prefix}/images/generations", generations)
        app.router.add_post(f"{prefix}/images/edits", edits)
