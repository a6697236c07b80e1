"""POST videos (JSON, or multipart with `input_reference`) → 202 with a video object; GET videos/{id}; GET
videos/{id}/content streamed from the upstream.

Creation holds seconds times the per-second price together with storing the job (and its Idempotency-Key),
then asks the upstream to start it. The hold lives longer than the maximum job time; the job settles when the
upstream reports it completed and is voided when it fails or runs too long (see gateway.media_poller). An alias
(`upstream_model`) is started under the upstream's id; the job, its record and the video object name the alias.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import aiohttp
from aiohttp import web

from billing import idempotency as idem
from billing import ledger, videos
from billing.catalog_config import VideoModelConfig
from billing.media_pricing import MediaPriceError, VideoQuote, video_quote
from billing.records import Outcome, RequestRecord
from gateway import access, media, wire
from gateway.auth import requires_key
from gateway.bodies import read_json_object
from gateway.consumer import CONSUMER_PREFIXES
from gateway.contract import (
    IDEMPOTENCY_CONFLICT,
    INVALID,
    NOT_FOUND,
    PROVIDER_HEADERS,
    UPSTREAM_CALL,
    UPSTREAM_ERROR,
    UPSTREAM_NOT_CONFIGURED,
    UPSTREAM_RATE_LIMITED,
    VIDEO_NOT_READY,
    Answer,
    Body,
    operation,
)
from gateway.errors import REQUEST_ID, ApiError, client_request_id, invalid, not_found
from gateway.failover import MODEL_HEADER, PROVIDER_HEADER, Routing
from gateway.keys import API_KEY, HOLDS, POOL, SETTINGS
from gateway.media_poller import LEASE_SECONDS, POLLER_ID, progress_of, refresh
from gateway.multipart import Form, multipart_body, read_form
from gateway.params import DRY_RUN, IDEMPOTENCY_KEY, TextParam
from gateway.render import json_response
from gateway.routing import Route
from gateway.settings import Settings
from gateway.upstream import Upstream, UpstreamError, upstream_named
from gateway.upstream import request as upstream_request
from gateway.video_object import event_data, video_object
from gateway.webhook_worker import check_target

log = logging.getLogger("meterline.videos")

_CONTENT_CHUNK = 64 * 1024
_VIDEO_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_CREATION_MARGIN_SECONDS = 30.0


def render(request: web.Request, job: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI video object, with Lumenfall's metadata, as this request's route shows it."""
    return video_object(job, str(request.url.with_path(_prefix(request)).with_query(None)))


def _prefix(request: web.Request) -> str:
    return request.path.split("/videos", 1)[0]


# The creation fields besides the priced ones (size, seconds): what a video is charged does not depend on them.
# Any other field is refused with a 400 naming it, as OpenAI refuses an unrecognised argument.
_FIELDS = frozenset({"model", "prompt", "size", "seconds", "webhook_url"})
_FILES = frozenset({"input_reference"})


def _schema(settings: Settings, *, multipart: bool) -> dict[str, Any]:
    """The body's schema, from `_FIELDS` and `_FILES`, with the sizes and durations the configured video models
    offer (`seconds` as OpenAI sends it, a string, or an integer)."""
    models = media.media_models(settings, VideoModelConfig)
    seconds = sorted({s for entry in models.values() for s in entry.seconds})
    properties: dict[str, Any] = {
        "model": media.one_of(list(models), nullable=False), "prompt": media.PROMPT,
        "size": media.one_of([size for entry in models.values() for size in entry.sizes]),
        "seconds": {"anyOf": [{"type": "integer", "enum": seconds}, media.one_of([str(s) for s in seconds])]},
        "webhook_url": {"anyOf": [{"type": "string", "format": "uri"}, {"type": "null"}],
                        "description": "Where the job's video.* events are sent, besides the account's endpoints"},
    }
    assert set(properties) == _FIELDS
    if multipart:
        properties.update({name: {"type": "string", "format": "binary"} for name in _FILES})
    return media.form_schema(properties, ["model", "prompt"])


_VARIANT = TextParam("variant", "Which file of the video (the upstream's variants, e.g. thumbnail)")


async def _read_body(request: web.Request) -> tuple[dict[str, Any], Form | None, bytes]:
    """The creation fields, the uploaded form (when multipart) and a fingerprint of the whole request."""
    if request.content_type.startswith("multipart/"):
        form = await read_form(request, media.upload_limits(request))
        try:
            for upload in form.files:
                if upload.name not in _FILES:
                    raise invalid(f"Unrecognized file supplied: {upload.name}", upload.name)
            _known(form.fields)
        except BaseException:
            form.close()
            raise
        return dict(form.fields), form, ledger.request_fingerprint("videos", form.digest.hex())
    body = await read_json_object(request)
    _known(body)
    return body, None, ledger.request_fingerprint("videos", body)


def _known(body: dict[str, Any]) -> None:
    for name in body:
        if name not in _FIELDS:
            raise invalid(f"Unrecognized request argument supplied: {name}", name)


def _quote(entry: VideoModelConfig, model: str, body: dict[str, Any]) -> VideoQuote:
    try:
        return video_quote(entry, model=model, size=media.optional_str(body, "size"), seconds=body.get("seconds"))
    except MediaPriceError as exc:
        raise media.price_error(exc) from None


@operation("Start a video job: its price is held now and charged when it completes",
           body=Body(lambda settings: _schema(settings, multipart=False),
                     multipart=lambda settings: _schema(settings, multipart=True)),
           query=(DRY_RUN,), headers=(IDEMPOTENCY_KEY,),
           answer=(Answer(wire.Video, status=202, description="The job, started", headers={
               "Idempotent-Replayed": "true when this answers an earlier request with the same Idempotency-Key",
               **PROVIDER_HEADERS}),
               Answer(wire.Estimate, description="With dryRun: the hold the call would take")),
           errors=(*UPSTREAM_CALL, IDEMPOTENCY_CONFLICT))
@requires_key
async def create(request: web.Request) -> web.Response:
    dry = DRY_RUN.read(request)
    body, form, fingerprint = await _read_body(request)
    try:
        model, entry = media.media_entry(request, body.get("model"), VideoModelConfig)
        prompt = media.required_prompt(body)
        quote = _quote(entry, model, body)
        routing = media.media_routing(request, model, entry)
        if dry:
            return await media.estimate_response(request, quote.estimate(), model=model,
                                                 provider=routing.first.name)
        routing.check_configured()
        return await _create(request, body=body, form=form, fingerprint=fingerprint, model=model, prompt=prompt,
                             quote=quote, routing=routing)
    finally:
        if form is not None:
            form.close()


async def _create(request: web.Request, *, body: dict[str, Any], form: Form | None, fingerprint: bytes,
                  model: str, prompt: str, quote: VideoQuote, routing: Routing) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    key = request[API_KEY]
    idem_key = media.idempotency_key(request)
    webhook_url = media.optional_str(body, "webhook_url")
    if webhook_url is not None:
        refused = check_target(webhook_url, allow_private=settings.webhook_allow_private_targets)
        if refused is not None:
            raise invalid(refused, "webhook_url")
    steps = videos.VideoCreation(
        app[POOL],
        videos.NewVideo(request_id=request[REQUEST_ID], account_id=key.account_id, key_id=key.id, model=model,
                        upstream=routing.routes[0].upstream, endpoint=request.path, prompt=prompt, size=quote.size,
                        seconds=quote.seconds, price_micros=quote.hold_micros, webhook_url=webhook_url,
                        client_request_id=client_request_id(request)),
        event_data=event_data(app),
        idempotency=(idem.scope("videos", key.account_id), idem_key, fingerprint) if idem_key else None,
        # The hold outlives the longest job plus the time to notice it finished, so it never expires first.
        hold_ttl_seconds=settings.video_max_job_seconds + settings.hold_ttl_seconds,
        max_job_seconds=settings.video_max_job_seconds,
        lease_owner=app[POLLER_ID],
        # The creator's lease covers trying every provider in turn.
        lease_seconds=sum(settings.upstreams[route.upstream].timeout_seconds for route in routing.routes
                          if route.upstream in settings.upstreams) + _CREATION_MARGIN_SECONDS,
    )
    hold = app[HOLDS].open(request[REQUEST_ID], account_id=key.account_id, key_id=key.id, steps=steps,
                           record=RequestRecord(model=model, modality="video", endpoint=request.path,
                                                upstream=routing.routes[0].upstream, quantity=quote.seconds,
                                                client_request_id=client_request_id(request)))
    access.billed(request, hold)
    await hold.reserve(quote.hold_micros)
    assert steps.job is not None
    if steps.replayed:
        hold.nothing_to_resolve()
        return json_response(render(request, steps.job), status=202, headers={"Idempotent-Replayed": "true"})
    started: dict[str, Any] | None = None
    failure: UpstreamError | None = None
    try:

        async def send(route: Route, up: Upstream) -> tuple[dict[str, Any], str]:
            answer = await _send(request, up, route.model, body, form, quote)
            upstream_id = answer.get("id") if isinstance(answer, dict) else None
            if not isinstance(upstream_id, str) or not upstream_id:
                raise UpstreamError(502, "UPSTREAM_ERROR", "The upstream accepted the video without an id",
                                    upstream_status=200)
            return answer, upstream_id

        answer, upstream_id = await routing.run(hold, send)
        served = routing.served
        assert served is not None
        status = answer.get("status") if isinstance(answer.get("status"), str) else None
        started = await videos.started(
            app[POOL], steps.job["id"], upstream_id=upstream_id,
            status=status if status in videos.UNFINISHED else "queued", progress=progress_of(answer, 0),
            output=answer, owner=app[POLLER_ID], poll_seconds=settings.video_poll_seconds,
            provider=videos.Provider(name=served.name, upstream=served.upstream, model=served.model,
                                     upstream_cost_micros=served.media_cost_micros(quote.seconds),
                                     attempts=hold.record.attempts),
        ) or await videos.get(app[POOL], steps.job["id"], account_id=key.account_id)
        if status == "completed":  # an upstream that made it at once: charge it now rather than at the next poll
            await hold.settle(quote.hold_micros, outcome=Outcome(
                upstream_cost_micros=served.media_cost_micros(quote.seconds), generation_id=upstream_id),
                response=answer)
            started = steps.job
    except UpstreamError as exc:
        failure = exc
        raise
    finally:
        if started is None:
            # No upstream job to follow (it failed, or we were cancelled before learning its id): release the
            # hold now. A job the upstream did start without our hearing of it is not billed.
            if failure is not None:
                await hold.void(failure.message, Outcome(status="upstream_failure", error_code=failure.code))
            else:
                await hold.void("the request was cancelled", Outcome(status="cancelled", error_code="cancelled"))
    return json_response(render(request, started or steps.job), status=202, headers=routing.headers())


async def _send(request: web.Request, upstream: Upstream, model: str, body: dict[str, Any], form: Form | None,
                quote: VideoQuote) -> Any:
    """Start the job upstream with a body rebuilt from the validated fields: the model id the upstream knows it by,
    what was priced (size, seconds) explicitly, and the reference image (when uploaded) as it came."""
    outgoing = {"model": model, "prompt": body["prompt"], "size": quote.size, "seconds": str(quote.seconds)}
    if form is None:
        async with upstream_request(request.app, upstream, "POST", "videos", json_body=outgoing) as resp:
            return await resp.json()
    data = multipart_body(list(outgoing.items()), form)
    async with upstream_request(request.app, upstream, "POST", "videos", data=data) as resp:
        return await resp.json()


async def _job(request: web.Request) -> dict[str, Any]:
    video_id = request.match_info["video_id"]
    job = None
    if _VIDEO_ID.fullmatch(video_id):  # anything else cannot be one of ours (and may not even be valid text)
        job = await videos.get(request.app[POOL], video_id, account_id=request[API_KEY].account_id)
    if job is None:
        raise not_found(f"No video with id {request.match_info['video_id']!r}")
    return job


@operation("A video job's state", answer=Answer(wire.Video, headers=PROVIDER_HEADERS), errors=(NOT_FOUND,))
@requires_key
async def retrieve(request: web.Request) -> web.Response:
    """The job's current state; an unfinished job this process can lease is polled upstream first."""
    job = await _job(request)
    if job["status"] in videos.UNFINISHED:
        leased = await videos.claim_one(request.app[POOL], job["id"], account_id=job["account_id"],
                                        owner=request.app[POLLER_ID], lease_seconds=LEASE_SECONDS)
        if leased is not None:
            job = await refresh(request.app, leased)
    return json_response(render(request, job), headers=_provider_headers(job))


def _provider_headers(job: dict[str, Any]) -> dict[str, str]:
    """X-Meterline-Provider and X-Meterline-Model of the provider that has the job (a job from before providers
    were recorded: its upstream and model)."""
    return {PROVIDER_HEADER: job["provider"] or job["upstream"], MODEL_HEADER: job["provider_model"] or job["model"]}


@operation("A completed video's file, streamed from the upstream", query=(_VARIANT,),
           answer=Answer(media=("*/*",), description="The file, with the upstream's content type (video/mp4)",
                         headers=PROVIDER_HEADERS),
           errors=(NOT_FOUND, VIDEO_NOT_READY, UPSTREAM_ERROR, UPSTREAM_NOT_CONFIGURED, UPSTREAM_RATE_LIMITED,
                   INVALID))
@requires_key
async def content(request: web.Request) -> web.StreamResponse:
    """The finished file, relayed chunk by chunk as the upstream sends it (never buffered whole)."""
    job = await _job(request)
    if job["status"] != "completed":
        raise ApiError(409, "VIDEO_NOT_READY", f"The video is {job['status']}; its content exists once completed")
    upstream = upstream_named(request.app, job["upstream"])
    variant = _VARIANT.read(request)
    params = {"variant": variant} if variant is not None else None
    async with upstream_request(request.app, upstream, "GET", f"videos/{job['upstream_id']}/content",
                                params=params, headers={"Accept": "*/*"}) as resp:
        response = web.StreamResponse(headers={
            "Content-Type": resp.raw.headers.get("Content-Type", "video/mp4"), **_provider_headers(job)})
        if resp.raw.content_length is not None:
            response.content_length = resp.raw.content_length
        await response.prepare(request)
        try:
            async for chunk in resp.raw.content.iter_chunked(_CONTENT_CHUNK):
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError):
            # The status line is sent: all we can do is end the body short, which the client sees as a
            # truncated download (the Content-Length promised more).
            log.warning("video %s content broke off upstream", job["id"])
            return response
        except ConnectionError:
            return response  # the client left mid-download: nothing more to send, nothing to bill
        await response.write_eof()
        return response


def add_routes(app: web.Application) -> None:
    for prefix in CONSUMER_PREFIXES:
        app.router.add_post(f"{prefix}/videos", create)
        app.router.add_get(f"{prefix}/videos/{{video_id}}", retrieve)
        app.router.add_get(f"{prefix}/videos/{{video_id}}/content", content)

