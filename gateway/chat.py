"""`POST chat/completions`: the billed request, non-streaming and streaming, and its `?dryRun=true` estimate.

route → key → validate → price the hold (billing.pricing) → reserve (possibly less, with a lower max_tokens)
→ forward with the upstream's key → settle from the upstream's usage (estimated only when it is absent) → answer.
Every hold ends settled or voided, whatever happens to the client or the handler (see gateway.settlement).
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

from aiohttp import web

from billing import ledger, pricing, tokens
from billing.catalog import CatalogEntry
from billing.errors import InsufficientBalance, KeyLimitExceeded
from billing.keys import ApiKey
from billing.ledger import Reservation
from billing.pricing import TokenPrices
from gateway import models_api, upstream
from gateway.auth import requires_key
from gateway.bodies import dry_run, read_json_object
from gateway.chat_request import ChatRequest, parse_chat, upstream_body
from gateway.chat_stream import StreamRelay
from gateway.chat_usage import choice_texts, estimated_usage, priced_usage, usage_record
from gateway.consumer import CONSUMER_PREFIXES
from gateway.errors import REQUEST_ID, ApiError
from gateway.keys import API_KEY, POOL, SETTINGS
from gateway.models_api import resolve_model
from gateway.render import json_response
from gateway.settings import Settings
from gateway.settlement import Bill, shielded

REDUCED_HEADER = "X-Max-Tokens-Reduced-To"


class Priced:
    """A validated request with its model, prompt count and hold.

    `counted` is tiktoken's count, or (`exact` False), for a prompt longer than `prompt_bound_above_chars`, its
    upper bound (tokens.Prompt.bound): that holds at least as much as the count would, without counting (~40 ns a
    byte) before the upstream is even called. A bound is only used for a hold covered in full; see `_hold`.
    """

    __slots__ = ("chat", "counted", "entry", "estimate", "exact", "max_output", "minimum", "padded", "prices",
                 "prompt")

    def __init__(self, chat: ChatRequest, entry: CatalogEntry, prompt: tokens.Prompt, counted: int, *,
                 exact: bool, safety_factor: Decimal, min_output: int) -> None:
        assert entry.prices is not None
        self.chat = chat
        self.entry = entry
        self.prices: TokenPrices = entry.prices
        self.prompt = prompt
        self.counted = counted
        self.exact = exact
        self.padded = pricing.padded_prompt_tokens(counted, safety_factor)
        # The model's limit, else (a remote model publishing neither) the minimum: the hold must be finite.
        self.max_output = chat.max_output_tokens or entry.max_output_tokens or min_output
        allowance = self.max_output * chat.n
        self.estimate = pricing.token_estimate(self.prices, counted_prompt_tokens=counted,
                                               padded_prompt_tokens=self.padded, max_output_tokens=allowance)
        self.minimum = pricing.hold_micros(self.prices, prompt_tokens=self.padded,
                                           max_output_tokens=min(min_output, self.max_output) * chat.n)

    async def prompt_tokens(self) -> int:
        """tiktoken's count of the prompt, for a charge estimated because the upstream reported no usage."""
        return self.counted if self.exact else await self.prompt.count()

    def output_cap(self, granted_micros: int, min_output: int) -> int | None:
        """The per-choice max_tokens the granted hold affords, or None when the full allowance was granted."""
        if granted_micros >= self.estimate.total_micros:
            return None
        total = pricing.affordable_output_tokens(self.prices, granted_micros=granted_micros,
                                                 prompt_tokens=self.padded,
                                                 ceiling=self.max_output * self.chat.n)
        # The minimum hold is rounded like any cost, so the floor can land a token short of the minimum.
        return max(total // self.chat.n, min(min_output, self.max_output))


def _priced(chat: ChatRequest, entry: CatalogEntry, prompt: tokens.Prompt, counted: int, *, exact: bool,
            settings: Settings) -> Priced:
    return Priced(chat, entry, prompt, counted, exact=exact, safety_factor=settings.prompt_safety_factor,
                  min_output=settings.min_output_tokens)


async def _counted(priced: Priced, settings: Settings) -> Priced:
    """A bounded request priced again on its prompt's tiktoken count."""
    return _priced(priced.chat, priced.entry, priced.prompt, await priced.prompt.count(), exact=True,
                   settings=settings)


async def _hold(bill: Bill, priced: Priced, key: ApiKey, settings: Settings) -> tuple[Priced, Reservation]:
    """Reserve the hold; returns the pricing it was taken on. A bounded prompt is first held in full on its
    bound; only if the balance or the key's limit cannot cover that is the prompt counted, so that the answer
    (a reduced max_tokens, or a 402) is the one the count gives. A refused hold writes nothing, so the second
    attempt uses the same request id."""
    if not priced.exact:
        try:
            total = priced.estimate.total_micros
            return priced, await bill.reserve(account_id=key.account_id, key_id=key.id, amount_micros=total,
                                              min_micros=total)
        except (InsufficientBalance, KeyLimitExceeded):
            priced = await _counted(priced, settings)
    return priced, await bill.reserve(account_id=key.account_id, key_id=key.id,
                                      amount_micros=priced.estimate.total_micros, min_micros=priced.minimum)


def _grants(left: int | None, amount: int) -> bool:
    """Whether meterline_reserve grants `amount` in full from `left` (None: no limit applies)."""
    return left is None or (left >= amount and left >= 0)


async def _estimate(request: web.Request, priced: Priced, key: ApiKey, settings: Settings) -> web.Response:
    """dryRun: exactly the hold the real call would take now, which for a bounded prompt depends (as in `_hold`)
    on whether the balance and the key's limit cover its bound in full."""
    available, key_left = await ledger.coverable_micros(request.app[POOL], key.account_id, key.id)
    total = priced.estimate.total_micros
    if not priced.exact and not (_grants(available, total) and _grants(key_left, total)):
        priced = await _counted(priced, settings)
    return json_response(priced.estimate.as_dict(model=priced.entry.id, provider=priced.entry.upstream,
                                                 available_micros=available))


@requires_key
async def chat_completions(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    is_dry_run = dry_run(request.query)
    chat = parse_chat(await read_json_object(request))
    entry = await resolve_model(app, chat.model, modality="text")
    prompt = tokens.Prompt.of(chat.messages, chat.tools)
    if len(prompt.text) > settings.prompt_bound_above_chars:
        priced = _priced(chat, entry, prompt, prompt.bound(), exact=False, settings=settings)
    else:
        priced = _priced(chat, entry, prompt, await prompt.count(), exact=True, settings=settings)
    key = request[API_KEY]
    if is_dry_run:
        return await _estimate(request, priced, key, settings)
    target = upstream.upstream_named(app, entry.upstream)
    request_id = request[REQUEST_ID]
    bill = Bill(app, request_id=request_id, record={
        "model": entry.id, "modality": "text", "endpoint": request.path, "upstream": entry.upstream,
        "user": chat.user,
    })
    priced, reservation = await _hold(bill, priced, key, settings)
    cap = priced.output_cap(reservation.granted_micros, settings.min_output_tokens)
    headers: dict[str, str] = {}
    if cap is not None:
        headers[REDUCED_HEADER] = str(cap)
    payload = upstream_body(chat, model_id=entry.id, output_cap=cap)
    started = time.monotonic()
    try:
        if chat.stream:
            return await _stream(request, bill, priced, target, payload, headers, started)
        return await _complete(bill, priced, target, payload, headers, started, app)
    except asyncio.CancelledError:
        bill.void_soon(reason="cancelled", record={"status": "cancelled", "error_code": "CANCELLED"})
        raise
    finally:
        if not bill.resolved:
            # Only reached on an unexpected error: the hold must not outlive the request.
            await bill.void(reason="gateway error", record={"status": "upstream_failure",
                                                            "error_code": "INTERNAL_ERROR"})


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


async def _failed(bill: Bill, exc: ApiError, started: float) -> None:
    await bill.void(reason=exc.message, record={
        "status": "upstream_failure", "error_code": exc.code, "duration_ms": _elapsed_ms(started),
    })


async def _complete(bill: Bill, priced: Priced, target: upstream.Upstream, payload: dict[str, Any],
                    headers: dict[str, str], started: float, app: web.Application) -> web.Response:
    try:
        async with upstream.request(app, target, "POST", "chat/completions", json_body=payload) as response:
            answer = await response.json()
        if not isinstance(answer, dict):
            raise upstream.UpstreamError(502, "UPSTREAM_ERROR", f"The upstream {target.name} sent a malformed "
                                         "response", upstream_status=response.status)
    except upstream.UpstreamError as exc:
        await _failed(bill, exc, started)
        raise
    raw_usage = answer.get("usage")
    usage = pricing.parse_usage(raw_usage)
    if usage is None or not isinstance(raw_usage, dict):
        # The answer was delivered but carries no usage: counting it (and a bounded prompt) can take a while, in a
        # thread. A task the app owns counts and settles, so a handler cancelled meanwhile cannot void the call.
        bill.hand_off()
        usage = await shielded(app, _settle_estimate(bill, priced, answer, started), f"settle {bill.request_id}")
        raw_usage = None
    cost = pricing.cost_micros(priced.prices, usage)
    if raw_usage is not None:
        await bill.settle(actual_micros=cost, estimated=False, record={
            **usage_record(usage, raw_usage), "status": "completed", "duration_ms": _elapsed_ms(started),
        })
    answer["usage"] = priced_usage(raw_usage or estimated_usage(usage), cost)
    headers["X-Cost-Micros"] = str(cost)
    return json_response(answer, headers=headers)


async def _settle_estimate(bill: Bill, priced: Priced, answer: dict[str, Any], started: float) -> pricing.Usage:
    """Charge a delivered answer that reported no usage: the prompt and the generated text, counted."""
    completion = await tokens.count_completion(choice_texts(answer.get("choices"), "message"))
    usage = pricing.Usage(prompt_tokens=await priced.prompt_tokens(), completion_tokens=completion)
    await bill.settle(actual_micros=pricing.cost_micros(priced.prices, usage), estimated=True, record={
        **usage_record(usage, None), "status": "completed", "duration_ms": _elapsed_ms(started),
    })
    return usage


async def _stream(request: web.Request, bill: Bill, priced: Priced, target: upstream.Upstream,
                  payload: dict[str, Any], headers: dict[str, str], started: float) -> web.StreamResponse:
    app = request.app
    try:
        opened = await upstream.open_response(app, target, "POST", "chat/completions", json_body=payload,
                                              headers={"Accept": "text/event-stream"})
    except upstream.UpstreamError as exc:
        await _failed(bill, exc, started)
        raise
    relay = StreamRelay(opened, bill=bill, prices=priced.prices, prompt_tokens=priced.prompt_tokens,
                        include_usage=priced.chat.include_usage, started=started,
                        drain_seconds=app[SETTINGS].drain_seconds)
    response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    cancelled = False
    try:
        await relay.run(request, response)
    except asyncio.CancelledError:
        cancelled = True
        # Cancelled because the client left (handler_cancellation), or because the server is stopping.
        relay.client_gone = request.transport is None or request.transport.is_closing()
        raise
    finally:
        # The upstream is drained (if the client left early) and the hold settled in a task the app owns;
        # the handler waits for it unless it is being cancelled.
        finishing = relay.finish_owned(app)
        if not cancelled:
            await asyncio.shield(finishing)
    return response


def add_routes(app: web.Application) -> None:
    """Chat completions and the model catalog, under /v1 and /openai/v1."""
    for prefix in CONSUMER_PREFIXES:
        app.router.add_post(f"{prefix}/chat/completions", chat_completions)
    models_api.add_routes(app, CONSUMER_PREFIXES)
