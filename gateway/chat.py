"""`POST chat/completions`: the billed request, non-streaming and streaming, and its `?dryRun=true` estimate.

route → key → validate (gateway.chat_request) → quote and hold (billing.text, billing.holds) → forward the body
built from the validated request, with the output limit the hold covers, to the model's providers in turn until one
serves it (gateway.failover) → settle from the upstream's usage (estimated only when it is absent) → answer. Every
hold ends settled or voided, whatever happens to the client or the handler (billing.holds).

Zero-completion insurance: an answer of zero completion tokens whose choices ended in an error or never finished
is not charged (its hold is voided, and its record says EMPTY_COMPLETION), as OpenRouter does it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web

from billing import pricing, text, tokens
from billing.catalog import CatalogEntry
from billing.catalog_config import TextModelConfig
from billing.conversations import Context
from billing.holds import Hold
from billing.records import Outcome, RequestRecord
from billing.text import HoldRules, TextQuote
from gateway import access, chat_state, models_api, upstream, wire
from gateway.auth import requires_key
from gateway.bodies import read_json_object
from gateway.chat_answer import AnswerEdits
from gateway.chat_request import ChatRequest, body_schema, parse_chat, upstream_body
from gateway.chat_stream import StreamRelay
from gateway.chat_usage import (
    choice_texts,
    empty_completion,
    estimated_usage,
    generation_id,
    priced_usage,
    usage_outcome,
)
from gateway.consumer import CONSUMER_PREFIXES
from gateway.contract import CONVERSATION_NOT_FOUND, PROVIDER_HEADERS, UPSTREAM_CALL, Answer, Body, operation
from gateway.errors import REQUEST_ID, ApiError, client_request_id
from gateway.failover import Routing
from gateway.keys import API_KEY, HOLDS, POOL, SETTINGS, TASKS
from gateway.models_api import resolve_model
from gateway.params import DRY_RUN
from gateway.render import json_response
from gateway.routing import Route
from gateway.settings import Settings

REDUCED_HEADER = "X-Max-Tokens-Reduced-To"


def hold_rules(settings: Settings) -> HoldRules:
    return HoldRules(safety_factor=settings.prompt_safety_factor, min_output_tokens=settings.min_output_tokens,
                     bound_above_chars=settings.prompt_bound_above_chars,
                     default_max_output_tokens=settings.default_max_output_tokens,
                     overhead_per_message=settings.prompt_overhead_per_message,
                     overhead_per_request=settings.prompt_overhead_per_request,
                     overhead_with_tools=settings.prompt_overhead_with_tools)


@operation(
    "Create a chat completion, billed from its usage (streamed as server-sent events with `stream`)",
    body=Body(lambda settings: body_schema(max_choices=settings.max_choices, models=[
        model for model, entry in settings.models.items() if isinstance(entry, TextModelConfig)])),
    query=(DRY_RUN,),
    answer=Answer((wire.ChatCompletion, wire.Estimate), media=("application/json", "text/event-stream"),
                  headers={"X-Cost-Micros": "The charge, in micros (not on a stream or a dryRun)",
                           REDUCED_HEADER: "The output limit the balance could cover, when lower than asked",
                           **PROVIDER_HEADERS},
                  description="The completion (or, with dryRun, the hold it would take)"),
    errors=(*UPSTREAM_CALL, CONVERSATION_NOT_FOUND))
@requires_key
async def chat_completions(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    is_dry_run = DRY_RUN.read(request)
    chat = parse_chat(await read_json_object(request), max_choices=settings.max_choices)
    key = request[API_KEY]
    entry = await resolve_model(app, chat.model, modality="text")
    access.model(request, entry.id)
    assert entry.prices is not None
    rules = hold_rules(settings)
    allowance = text.output_allowance(chat.max_output_tokens, entry.max_output_tokens, rules)
    # A key with Detailed Logging replays its conversation and recalls memory: both are prompt from here on.
    new_messages = chat.messages
    context = await chat_state.context_for(app, key, chat, entry, output_allowance=allowance, rules=rules)
    if context is not None:
        chat = chat.with_messages(context.messages(new_messages))
    # A model with providers reads the request's `provider` preference itself; others forward it upstream.
    routing = Routing.of_entry(app, entry, chat.forwarded.get("provider"))
    quote = await TextQuote.of(chat.prompt, entry.prices, max_output=allowance, n=chat.n, rules=rules)
    if is_dry_run:
        quote, available = await text.dry_run(app[POOL], quote, account_id=key.account_id, key_id=key.id)
        estimate = await chat_state.itemised(quote.estimate, entry.prices, context, rules)
        return json_response(estimate.as_dict(model=entry.id, provider=routing.first.name,
                                              available_micros=available))
    routing.check_configured()
    steps = None if context is None else chat_state.steps(app, context, key, entry, new_messages)
    hold = app[HOLDS].open(request[REQUEST_ID], account_id=key.account_id, key_id=key.id, record=RequestRecord(
        model=entry.id, modality="text", endpoint=request.path, upstream=entry.upstream, user=chat.user,
        client_request_id=client_request_id(request)),
        steps=steps, spend_limited=key.spend_limited)
    access.billed(request, hold)
    quote, _, output_tokens = await text.reserve(hold, quote)
    try:  # from here on the hold exists: every way out of this block ends it
        headers: dict[str, str] = {}
        if output_tokens < quote.max_output:
            headers[REDUCED_HEADER] = str(output_tokens)

        def payload(route: Route) -> dict[str, Any]:
            body = upstream_body(chat, model_id=route.model, output_tokens=output_tokens,
                                 output_field=entry.output_limit_field)
            if routing.routed:
                body.pop("provider", None)  # Meterline's own routing read it
            return body

        if chat.stream:
            return await _stream(request, hold, quote, chat, routing, payload, headers, entry, context)
        return await _complete(app, hold, quote, routing, payload, headers, entry, context)
    except asyncio.CancelledError:
        hold.void_soon("cancelled", Outcome(status="cancelled", error_code="CANCELLED"))
        raise
    finally:
        if not hold.resolved:
            # Only reached on an unexpected error: the hold must not outlive the request.
            await hold.void("gateway error", Outcome(status="upstream_failure", error_code="INTERNAL_ERROR"))


async def _failed(hold: Hold, exc: ApiError) -> None:
    await hold.void(exc.message, Outcome(status="upstream_failure", error_code=exc.code))


def _answer_message(answer: dict[str, Any]) -> dict[str, Any] | None:
    """Choice 0's message, as a stored conversation keeps it."""
    choices = answer.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if isinstance(choice, dict) and choice.get("index", 0) == 0 and isinstance(choice.get("message"), dict):
            return {"message": choice["message"]}
    return None


async def _complete(app: web.Application, hold: Hold, quote: TextQuote, routing: Routing,
                    payload: Callable[[Route], dict[str, Any]], headers: dict[str, str], entry: CatalogEntry,
                    context: Context | None) -> web.Response:

    async def send(route: Route, target: upstream.Upstream) -> dict[str, Any]:
        async with upstream.request(app, target, "POST", "chat/completions", json_body=payload(route)) as response:
            answer = await response.json()
        if not isinstance(answer, dict):
            raise upstream.UpstreamError(502, "UPSTREAM_ERROR", f"The upstream {target.name} sent a malformed "
                                         "response", upstream_status=response.status)
        return answer

    try:
        answer = await routing.run(hold, send)
    except upstream.UpstreamError as exc:
        await _failed(hold, exc)
        raise
    headers.update(routing.headers())
    edits = AnswerEdits(entry, routing.served.model if routing.served is not None else None)
    cost_prices = routing.served.cost_prices if routing.served is not None else None
    raw_usage = answer.get("usage")
    reported = pricing.parse_usage(raw_usage)
    stored = _answer_message(answer) if context is not None else None
    generation = generation_id(answer)
    usage: pricing.Usage
    if reported is None or not isinstance(raw_usage, dict):
        # The answer was delivered but carries no usage: counting it (and a bounded prompt) can take a while, in a
        # thread. A task the app owns counts and settles, so a handler cancelled meanwhile cannot void the call.
        hold.hand_off()
        usage, cost = await app[TASKS].shielded(
            _settle_estimate(hold, quote, answer, stored, cost_prices, generation), f"settle {hold.request_id}")
        raw_usage = None
    elif empty_completion(reported, answer.get("choices")):
        usage = reported
        cost = 0
        await hold.void("zero-completion insurance: nothing was generated", usage_outcome(
            usage, raw_usage, status="upstream_failure", error_code="EMPTY_COMPLETION", cost_prices=cost_prices,
            generation_id=generation))
    else:
        usage = reported
        cost = pricing.cost_micros(quote.prices, usage)
        await hold.settle(cost, outcome=usage_outcome(usage, raw_usage, cost_prices=cost_prices,
                                                      generation_id=generation), response=stored)
    answer["usage"] = priced_usage(raw_usage or estimated_usage(usage), cost)
    answer.update(chat_state.context_fields(entry, usage, context))
    headers["X-Cost-Micros"] = str(cost)
    return json_response(edits.answer(answer), headers=headers)


async def _settle_estimate(hold: Hold, quote: TextQuote, answer: dict[str, Any], stored: dict[str, Any] | None,
                           cost_prices: pricing.TokenPrices | None,
                           generation: str | None) -> tuple[pricing.Usage, int]:
    """Charge a delivered answer that reported no usage: the prompt and the generated text, counted (nothing when
    nothing was generated and the answer ended in an error: zero-completion insurance)."""
    completion = await tokens.count_completion(choice_texts(answer.get("choices"), "message"))
    usage = pricing.Usage(prompt_tokens=await quote.prompt_tokens(), completion_tokens=completion)
    if empty_completion(usage, answer.get("choices")):
        await hold.void("zero-completion insurance: nothing was generated", usage_outcome(
            usage, None, status="upstream_failure", error_code="EMPTY_COMPLETION", cost_prices=cost_prices,
            generation_id=generation))
        return usage, 0
    cost = pricing.cost_micros(quote.prices, usage)
    await hold.settle(cost, estimated=True, outcome=usage_outcome(usage, None, cost_prices=cost_prices,
                                                                  generation_id=generation), response=stored)
    return usage, cost


async def _stream(request: web.Request, hold: Hold, quote: TextQuote, chat: ChatRequest, routing: Routing,
                  payload: Callable[[Route], dict[str, Any]], headers: dict[str, str], entry: CatalogEntry,
                  context: Context | None) -> web.StreamResponse:
    app = request.app

    async def send(route: Route, target: upstream.Upstream) -> tuple[upstream.UpstreamResponse, upstream.EventReader]:
        opened = await upstream.open_response(app, target, "POST", "chat/completions", json_body=payload(route),
                                              headers={"Accept": "text/event-stream"})
        reader = upstream.EventReader(opened)
        if routing.routed:
            # Up to the first data event nothing has reached the client, so a failure until then can still try the
            # next provider. (A model with one provider sends its headers at once, and such a failure as an event.)
            try:
                await reader.first_data()
            except BaseException:
                opened.close()
                raise
        return opened, reader

    try:
        opened, reader = await routing.run(hold, send)
    except upstream.UpstreamError as exc:
        await _failed(hold, exc)
        raise
    headers.update(routing.headers())
    edits = AnswerEdits(entry, routing.served.model if routing.served is not None else None)
    relay = StreamRelay(opened, reader=reader,
                        cost_prices=routing.served.cost_prices if routing.served is not None else None,
                        hold=hold, tasks=app[TASKS], prices=quote.prices, prompt_tokens=quote.prompt_tokens,
                        include_usage=chat.include_usage, drain_seconds=app[SETTINGS].drain_seconds,
                        settle_wait_seconds=app[SETTINGS].stream_settle_wait_seconds,
                        final_fields=lambda usage: chat_state.context_fields(entry, usage, context),
                        keep_answer=context is not None, edit=edits.event)
    response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        await relay.run(request, response)
    except asyncio.CancelledError:
        # Cancelled because the client left (handler_cancellation), or because the server is stopping.
        relay.client_gone = request.transport is None or request.transport.is_closing()
        raise
    finally:
        # The upstream is drained (if the client left early) and the hold settled in a task the app owns. The
        # handler does not wait for it: a stream that ended was sent its last events once its charge committed
        # (or the wait for that commit ran out during an outage), and a client that left is not waiting; the
        # connection is free for the client's next request meanwhile.
        relay.finish_owned(app[TASKS])
    return response


def add_routes(app: web.Application) -> None:
    """Chat completions and the model catalog, under /v1 and /openai/v1."""
    for prefix in CONSUMER_PREFIXES:
        app.router.add_post(f"{prefix}/chat/completions", chat_completions)
    models_api.add_routes(app, CONSUMER_PREFIXES)
