"""POST images/generations (JSON) and images/edits (multipart), billed per image returned.

Flow: validate every field and price (size, quality, n) → dryRun answers here → claim the Idempotency-Key (a
replay answers here) → hold n times the unit price (billing.holds) → forward a body rebuilt from the validated
fields, with what was priced stated explicitly, to the model's providers in turn until one serves it
(gateway.failover) → settle on the images returned (never more than n: any beyond are neither delivered nor
billed), or void on any failure.

Fields outside the ones below are refused with a 400 naming them, as OpenAI refuses an unrecognised argument:
they would reach the upstream unpriced. An alias (`upstream_model`) is forwarded under the upstream's id; its
answer names the alias.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from billing import idempotency as idem
from billing import ledger
from billing.catalog_config import ImageModelConfig
from billing.media_pricing import MAX_IMAGES, ImageQuote, MediaPriceError, image_quote
from billing.records import Outcome, RequestRecord
from gateway import access, media, wire
from gateway.auth import requires_key
from gateway.bodies import read_json_object
from gateway.chat_usage import generation_id
from gateway.consumer import CONSUMER_PREFIXES
from gateway.contract import IDEMPOTENCY_CONFLICT, PROVIDER_HEADERS, UPSTREAM_CALL, Answer, Body, operation
from gateway.errors import REQUEST_ID, client_request_id, invalid
from gateway.failover import Routing
from gateway.keys import API_KEY, HOLDS, POOL, SETTINGS
from gateway.multipart import Form, multipart_body, read_form
from gateway.params import DRY_RUN, IDEMPOTENCY_KEY
from gateway.render import json_response, usd_number
from gateway.routing import Route
from gateway.settings import Settings
from gateway.upstream import Upstream, UpstreamError
from gateway.upstream import request as upstream_request

log = logging.getLogger("meterline.images")

IMAGE_FILES = frozenset({"image", "image[]"})
# The fields forwarded besides model, prompt, n, size and quality (which are priced and always sent), each a
# string (output_compression an integer from 0 to 100), none of which changes what an image is charged.
_GENERATION_OPTIONS = frozenset({"response_format", "style", "user", "background", "moderation", "output_format",
                                 "output_compression"})
_EDIT_OPTIONS = frozenset({"response_format", "user", "background", "output_format", "output_compression",
                           "input_fidelity"})
_PRICED = ("model", "prompt", "n", "size", "quality")
# Send = the upstream call to one provider: it gets the provider and its upstream, returns the upstream's answer.
Send = Callable[[Route, Upstream], Awaitable[Any]]


def _schema(settings: Settings, options: frozenset[str], *, multipart: bool) -> dict[str, Any]:
    """The body's schema, from the fields priced (`_PRICED`, with the sizes and qualities the configured image
    models offer) and the route's table of options: every field the route accepts, nothing else."""
    models = media.media_models(settings, ImageModelConfig)
    n: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": MAX_IMAGES}
    properties: dict[str, Any] = {
        "model": media.one_of(list(models), nullable=False), "prompt": media.PROMPT,
        "n": {"anyOf": [n, {"type": "null"}]},
        "size": media.one_of([size for entry in models.values() for size in entry.sizes]),
        "quality": media.one_of([quality for entry in models.values() for quality in entry.qualities]),
        "stream": {"enum": [False, None]},  # streaming image generation is refused
    }
    for name in sorted(options):
        option = {"type": "integer", "minimum": 0, "maximum": 100} if name == "output_compression" else {
            "type": "string"}
        properties[name] = {"anyOf": [option, {"type": "null"}]}
    required = ["model", "prompt"]
    if multipart:
        image = {"type": "string", "format": "binary"}
        properties.update({"image": image, "image[]": {"type": "array", "items": image}, "mask": image})
        required.append("image")
    return media.form_schema(properties, required)


_IMAGES = Answer((wire.Images, wire.Estimate), headers={
    "X-Cost-Micros": "The charge, in micros (not on a dryRun)",
    "Idempotent-Replayed": "true when this answers an earlier request with the same Idempotency-Key",
    **PROVIDER_HEADERS},
    description="The images (or, with dryRun, the hold the call would take)")
_IMAGE_ERRORS = (*UPSTREAM_CALL, IDEMPOTENCY_CONFLICT)


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


def _options(body: dict[str, Any], allowed: frozenset[str], *, multipart: bool) -> dict[str, Any]:
    """The validated optional fields; anything not priced and not in `allowed` is refused."""
    options: dict[str, Any] = {}
    for name, value in body.items():
        if name in _PRICED or value is None or (name == "stream" and value in (False, "false")):
            continue
        if name in ("stream", "partial_images"):
            raise invalid(f"{name}: streaming image generation is not supported", name)
        if name not in allowed:
            raise invalid(f"Unrecognized request argument supplied: {name}", name)
        if name == "output_compression":
            number = int(value) if multipart and isinstance(value, str) and value.isdigit() else value
            if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= 100:
                raise invalid("output_compression: must be an integer from 0 to 100", name)
            options[name] = value
            continue
        if not isinstance(value, str):
            raise invalid(f"{name}: must be a string", name)
        options[name] = value
    return options


def _priced(model: str, prompt: str, quote: ImageQuote) -> dict[str, Any]:
    """What was priced, stated explicitly (an omitted size or quality is sent as the one it was priced at)."""
    return {"model": model, "prompt": prompt, "n": quote.n, "size": quote.size, "quality": quote.quality}


@operation("Generate images, billed per image returned",
           body=Body(lambda settings: _schema(settings, _GENERATION_OPTIONS, multipart=False)),
           query=(DRY_RUN,), headers=(IDEMPOTENCY_KEY,), answer=_IMAGES, errors=_IMAGE_ERRORS)
@requires_key
async def generations(request: web.Request) -> web.Response:
    dry = DRY_RUN.read(request)
    body = await read_json_object(request)
    model, entry = media.media_entry(request, body.get("model"), ImageModelConfig)
    prompt = media.required_prompt(body)
    quote = _quote(entry, model, body)
    options = _options(body, _GENERATION_OPTIONS, multipart=False)
    routing = media.media_routing(request, model, entry)
    if dry:
        return await media.estimate_response(request, quote.estimate(), model=model, provider=routing.first.name)
    routing.check_configured()

    async def send(route: Route, up: Upstream) -> Any:
        outgoing = {**_priced(route.model, prompt, quote), **options}
        async with upstream_request(request.app, up, "POST", "images/generations", json_body=outgoing) as resp:
            return _delivered(await resp.json(), quote)

    fingerprint = ledger.request_fingerprint("images/generations", body)
    return await _billed(request, model=model, quote=quote, routing=routing, fingerprint=fingerprint, send=send)


@operation("Edit images (multipart upload), billed per image returned",
           body=Body(lambda settings: _schema(settings, _EDIT_OPTIONS, multipart=True),
                     media=("multipart/form-data",)),
           query=(DRY_RUN,), headers=(IDEMPOTENCY_KEY,), answer=_IMAGES, errors=_IMAGE_ERRORS)
@requires_key
async def edits(request: web.Request) -> web.Response:
    dry = DRY_RUN.read(request)
    form = await read_form(request, media.upload_limits(request), repeatable=IMAGE_FILES)
    try:
        body = form.fields
        model, entry = media.media_entry(request, body.get("model"), ImageModelConfig)
        if not form.files_named(*IMAGE_FILES):
            raise invalid("image: is required (one or more image files)", "image")
        for upload in form.files:
            if upload.name not in IMAGE_FILES and upload.name != "mask":
                raise invalid(f"Unrecognized file supplied: {upload.name}", upload.name)
        prompt = media.required_prompt(body)
        quote = _quote(entry, model, body)
        options = _options(body, _EDIT_OPTIONS, multipart=True)
        routing = media.media_routing(request, model, entry)
        if dry:
            return await media.estimate_response(request, quote.estimate(), model=model,
                                                 provider=routing.first.name)
        routing.check_configured()

        async def send(route: Route, up: Upstream) -> Any:
            fields = [(name, str(value)) for name, value in {**_priced(route.model, prompt, quote),
                                                             **options}.items()]
            return _delivered(await _send_form(request, up, form, fields), quote)

        return await _billed(request, model=model, quote=quote, routing=routing,
                             fingerprint=ledger.request_fingerprint("images/edits", form.digest.hex()), send=send)
    finally:
        form.close()


async def _send_form(request: web.Request, upstream: Upstream, form: Form, fields: list[tuple[str, str]]) -> Any:
    body = multipart_body(fields, form)
    async with upstream_request(request.app, upstream, "POST", "images/edits", data=body) as resp:
        return await resp.json()


def _delivered(answer: Any, quote: ImageQuote) -> tuple[dict[str, Any], list[Any]]:
    """The answer and the images it delivers: at most n (those beyond were not paid for, so are not passed on)."""
    if not isinstance(answer, dict) or not isinstance(answer.get("data", []), list):
        raise UpstreamError(502, "UPSTREAM_ERROR", "The upstream sent an image response without a data list",
                            upstream_status=200)
    data = answer.get("data") or []
    if len(data) > quote.n:
        log.warning("the upstream returned %d images for n=%d; only %d are delivered", len(data), quote.n, quote.n)
    return answer, data[: quote.n]


async def _billed(request: web.Request, *, model: str, quote: ImageQuote, routing: Routing,
                  fingerprint: bytes, send: Send) -> web.Response:
    """Hold, forward, settle (or void), under the Idempotency-Key when one was sent."""
    app = request.app
    key = request[API_KEY]
    idem_key = media.idempotency_key(request)
    claim = None
    if idem_key is not None:
        claim = idem.Claim(idem.scope("images", key.account_id), idem_key)
        # A first request ends (upstream timeout) well within its hold's lifetime: a claim older than that
        # was orphaned by a process that died mid-request.
        stored = await idem.claim(app[POOL], claim, fingerprint=fingerprint,
                                  stale_after_seconds=app[SETTINGS].hold_ttl_seconds)
        if stored is not None:
            return json_response(stored.response, status=stored.status_code,
                                 headers={"Idempotent-Replayed": "true"})
    hold = app[HOLDS].open(request[REQUEST_ID], account_id=key.account_id, key_id=key.id,
                           steps=app[HOLDS].claimed(claim),
                           record=RequestRecord(model=model, modality="image", endpoint=request.path,
                                                upstream=routing.routes[0].upstream, quantity=quote.n,
                                                client_request_id=client_request_id(request)))
    access.billed(request, hold)
    failure, outcome = "the request did not complete", Outcome(status="cancelled", error_code="CANCELLED")
    try:
        await hold.reserve(quote.hold_micros)
        answer, images = await routing.run(hold, send)
        served = routing.served
        assert served is not None
        charge = quote.charge_micros(len(images))
        metadata = answer.get("metadata")
        extra: dict[str, Any] = metadata if isinstance(metadata, dict) else {}
        delivered = {**answer, "data": images, "metadata": {**extra, "cost_micros": charge,
                                                            "cost": usd_number(charge), "request_id": hold.request_id}}
        if served.model != model and "model" in answer:  # the upstream names the id it was sent, not the one asked
            delivered["model"] = model
        await hold.settle(charge, outcome=Outcome(quantity=len(images), upstream_cost_micros=served.media_cost_micros(
            len(images)), generation_id=generation_id(answer)), response=delivered)
    except UpstreamError as exc:
        failure, outcome = exc.message, Outcome(status="upstream_failure", error_code=exc.code)
        raise
    finally:
        if not hold.resolved:
            await hold.void(failure, outcome)
    return json_response(delivered, headers={"X-Cost-Micros": str(charge), **routing.headers()})


def add_routes(app: web.Application) -> None:
    for prefix in CONSUMER_PREFIXES:
        app.router.add_post(f"{prefix}/images/generations", generations)
        app.router.add_post(f"{prefix}/images/edits", edits)
