"""Relaying a streamed chat completion: upstream SSE events go to the client as they arrive, and the call is
settled from the upstream's usage chunk before the stream's last events are sent.

A completed stream implies a durable charge: when the usage chunk arrives (or, without one, at `[DONE]` or the end
of the stream), the settlement starts, and the usage chunk, `[DONE]` and the end of the stream are written only
once it has committed. So a client that received a whole stream was billed, even if the process dies right after.
During a database outage the relay waits for the commit at most `settle_wait_seconds`, then finishes the stream
while the settlement goes on retrying.

Hot path: an event the gateway does not change is written as the same bytes it arrived in; only the usage chunk
(and an error event) is parsed, and `edit` (gateway.chat_answer) picks out with byte tests the few events it
changes. If the client leaves, the relay stops writing and `finish` keeps reading the upstream until its usage
arrives (at most `drain_seconds`) so the charge is exact; without usage, the charge is the prompt plus the text
actually delivered, counted with tiktoken and flagged as estimated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from billing import pricing, tokens
from billing.holds import Hold
from billing.pricing import TokenPrices, Usage
from billing.records import Outcome
from billing.tasks import TaskOwner
from gateway.chat_usage import (
    choice_texts,
    empty_completion,
    finish_reasons,
    generation_id,
    priced_usage,
    usage_outcome,
)
from gateway.errors import ApiError
from gateway.render import dumps
from gateway.upstream import EventReader, UpstreamError, UpstreamResponse

log = logging.getLogger("meterline.chat")

_DATA = b"data:"
_DONE = b"[DONE]"
# A chunk that finishes a choice (a finish_reason that is a string, not null).
_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')


def _payload(event: bytes) -> bytes:
    """The data of an SSE event (its `data:` lines joined), without parsing JSON."""
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(_DATA)]
    return b"\n".join(lines)


def _encode(data: Any) -> bytes:
    return b"data: " + dumps(data).encode() + b"\n\n"


def error_event(exc: ApiError) -> bytes:
    """The SSE event a client gets when the upstream fails after the 200 is sent (OpenAI SDKs raise on it)."""
    return _encode(exc.body())


class StreamRelay:
    def __init__(self, opened: UpstreamResponse, *, hold: Hold, tasks: TaskOwner, prices: TokenPrices,
                 prompt_tokens: Callable[[], Awaitable[int]], include_usage: bool, drain_seconds: float,
                 settle_wait_seconds: float, final_fields: Callable[[Usage | None], dict[str, Any]],
                 edit: Callable[[bytes], bytes], keep_answer: bool = False, reader: EventReader | None = None,
                 cost_prices: TokenPrices | None = None) -> None:
        self.opened = opened
        self.reader = reader or EventReader(opened)  # one that already read ahead keeps what it read
        self.cost_prices = cost_prices  # the serving provider's configured cost price, if it has one
        self.hold = hold
        self.tasks = tasks
        self.prices = prices
        self.prompt_tokens = prompt_tokens  # counts the prompt, for an estimate if usage never comes
        self.include_usage = include_usage
        self.drain_seconds = drain_seconds
        self.settle_wait_seconds = settle_wait_seconds
        self.edit = edit  # what the client is shown of a data event (AnswerEdits.event)
        self.delivered: list[bytes] = []  # events written to the client, for an estimate if usage never comes
        self.usage_raw: dict[str, Any] | None = None
        self.usage: Usage | None = None
        self.cost: int | None = None
        self.insured = False  # nothing was generated and the stream ended in an error: not charged
        self.ended = False  # the upstream stream is over (finished, failed or cut)
        self.failure: ApiError | None = None
        self.client_gone = False
        self.settling: asyncio.Task[None] | None = None  # the settlement, once started
        self.waited = False  # the stream has waited for its settlement's commit
        # The fields the stream's last chunk carries (context_total and context_left, the conversation's), from
        # the usage charged (None: not known yet).
        self.final_fields = final_fields
        self.charged_usage: Usage | None = None  # the usage the settlement charged, once known
        self.keep_answer = keep_answer  # the settlement stores the answer as delivered (a stored conversation)
        # A client that did not ask for the usage chunk gets the fields on the chunk that finishes the answer:
        # that chunk waits here until the usage is known (an event arriving first sends it on as it is).
        self.finishing: bytes | None = None
        self.sending: list[bytes] = []  # events about to be written once the settlement commits

    async def run(self, request: web.Request, response: web.StreamResponse) -> None:
        """Relay until the upstream ends or the client leaves. A client that leaves makes writes raise
        ConnectionError (aiohttp's ClientConnectionResetError is one); that ends the relay, not the call."""
        reader = self.reader
        inspect = self._inspect
        delivered = self.delivered
        hold_finish = not self.include_usage
        try:
            await response.prepare(request)
            while True:
                try:
                    event = await reader.next()
                except UpstreamError as exc:
                    self.ended = True
                    self.failure = exc
                    await self._send_finish(response, final=False)
                    await self._settled()
                    await response.write(error_event(exc))
                    return
                if event is None:
                    self.ended = True
                    self.sending = [self.finishing] if self.finishing is not None else []
                    await self._settled()
                    await self._send_finish(response, final=True)
                    await response.write_eof()
                    return
                out = inspect(event)
                if self.settling is None and (self.usage is not None
                                              or (_DONE in event and _payload(event) == _DONE)):
                    # The usage chunk or [DONE] goes out once the charge is committed.
                    self.sending = [e for e in (self.finishing, out) if e is not None]
                    await self._settled()
                    await self._send_finish(response, final=True)
                elif out is not None and self.finishing is not None:
                    await self._send_finish(response, final=False)
                if out is not None:
                    if hold_finish and self.settling is None and _FINISHED.search(out) is not None:
                        self.finishing = out
                        continue
                    await response.write(out)
                    delivered.append(out)
        except ConnectionError:
            self.client_gone = True

    async def _send_finish(self, response: web.StreamResponse, *, final: bool) -> None:
        """Write the held finishing chunk: with the final fields when it is the stream's last one."""
        event, self.finishing = self.finishing, None
        if event is None:
            return
        if final:
            event = self._with_final_fields(event)
        await response.write(event)
        self.delivered.append(event)

    def _with_final_fields(self, event: bytes) -> bytes:
        data = self._parse(event)
        if not isinstance(data, dict):
            return event
        data.update(self.final_fields(self.charged_usage or self.usage))
        return _encode(data)

    async def _settled(self) -> None:
        """Start the settlement (if not started) and wait for its commit, at most `settle_wait_seconds`."""
        if self.settling is None:
            self.hold.hand_off()
            self.settling = self.tasks.drained(self._resolve(), f"settle stream {self.hold.request_id}")
        if not self.settling.done() and not self.waited:
            self.waited = True  # the bound is for the whole stream: once spent, the stream finishes
            _, late = await asyncio.wait({self.settling}, timeout=self.settle_wait_seconds)
            if late:
                log.warning("stream %s: its charge has not committed within %gs; finishing the stream while the "
                            "settlement retries", self.hold.request_id, self.settle_wait_seconds)

    def _inspect(self, event: bytes) -> bytes | None:
        """What to send the client for this upstream event (None: nothing). Cheap byte tests pick out the
        few events that need parsing."""
        if not event.startswith(_DATA):
            return event  # comments (OpenRouter's keep-alives) and other fields pass as they are
        event = self.edit(event)
        if b'"usage"' in event and b'"usage":null' not in event and b'"usage": null' not in event:
            return self._usage_event(event)
        if b'"error"' in event:
            self._error_event(event)
        return event

    def _parse(self, event: bytes) -> Any:
        payload = _payload(event)
        if payload == _DONE:
            return None
        try:
            return json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return None

    def _usage_event(self, event: bytes) -> bytes | None:
        data = self._parse(event)
        raw = data.get("usage") if isinstance(data, dict) else None
        usage = pricing.parse_usage(raw)
        if usage is None or not isinstance(raw, dict) or not isinstance(data, dict):
            return event
        if self.usage is None:  # the first usage chunk is the one charged
            self.usage_raw, self.usage = raw, usage
            self.cost = pricing.cost_micros(self.prices, usage)
            if usage.completion_tokens == 0 and empty_completion(usage, finish_reasons(self._parsed(
                    self.delivered + ([self.finishing] if self.finishing is not None else [])))):
                self.insured, self.cost = True, 0  # zero-completion insurance: the client is shown no charge
        if self.include_usage:
            data["usage"] = priced_usage(raw, self.cost or 0)
            data.update(self.final_fields(self.usage))
            return _encode(data)
        if data.get("choices"):
            del data["usage"]
            if self.finishing is None:  # no finishing chunk waits for the fields: this one is the last
                data.update(self.final_fields(self.usage))
            return _encode(data)
        return None  # the usage-only chunk the client did not ask for

    def _error_event(self, event: bytes) -> None:
        data = self._parse(event)
        error = data.get("error") if isinstance(data, dict) else None
        if error is None:
            return
        message = error.get("message") if isinstance(error, dict) else error
        self.opened.upstream.failed("stream_error")
        self.failure = ApiError(502, "UPSTREAM_ERROR",
                                self.opened.upstream.redact(str(message or "The upstream failed mid-stream")),
                                type="upstream_error")

    def finish_owned(self, tasks: TaskOwner) -> asyncio.Task[None]:
        """Hand the hold to a task the app owns, which drains the upstream if needed and settles."""
        self.hold.hand_off()
        return tasks.drained(self.finish(), f"finish stream {self.hold.request_id}")

    async def _drain(self) -> None:
        """Read on (writing nothing) until the usage chunk or the end, for at most `drain_seconds`."""
        outcome = "usage"
        try:
            async with asyncio.timeout(self.drain_seconds):
                while self.usage is None:
                    event = await self.reader.next()
                    if event is None:
                        outcome = "ended_without_usage"
                        break
                    self._inspect(event)
        except TimeoutError:
            outcome = "timeout"
            log.warning("stream %s: no usage within %gs of the client leaving; billing an estimate",
                        self.hold.request_id, self.drain_seconds)
        except UpstreamError as exc:
            outcome = "upstream_error"
            self.failure = self.failure or exc
        metrics = self.opened.upstream.metrics
        if metrics is not None:
            metrics.drained(outcome)

    async def finish(self) -> None:
        interrupted = not self.ended and self.settling is None
        try:
            if interrupted and self.usage is None:
                await self._drain()
        finally:
            if self.ended or (self.usage is not None and self.reader_done()):
                self.opened.release()
            else:
                self.opened.close()
        if self.settling is None:
            await self._resolve(interrupted=interrupted)
        else:
            await self.settling

    async def _resolve(self, *, interrupted: bool = False) -> None:
        """Settle from the usage, or (without one) void a call that failed before any output, or charge an
        estimate of the prompt and the text delivered."""
        status, code, message = "completed", None, None
        if self.failure is not None:
            status, code, message = "upstream_failure", self.failure.code, self.failure.message
        elif interrupted:
            status, code = "cancelled", "CLIENT_DISCONNECTED" if self.client_gone else "CANCELLED"
        generation = self._generation_id()
        if self.usage is not None and self.cost is not None:
            if self.insured:
                await self.hold.void("zero-completion insurance: nothing was generated", usage_outcome(
                    self.usage, self.usage_raw, status="upstream_failure", error_code="EMPTY_COMPLETION",
                    error_message=message, cost_prices=self.cost_prices, generation_id=generation))
                return
            self.charged_usage = self.usage
            await self.hold.settle(self.cost, outcome=usage_outcome(
                self.usage, self.usage_raw, status=status, error_code=code, error_message=message,
                cost_prices=self.cost_prices, generation_id=generation), response=self._answer())
            return
        texts = self.delivered_texts()
        if self.failure is not None and not any(texts):
            # Failed before any output: nothing was delivered, so nothing is charged.
            await self.hold.void(self.failure.message, Outcome(status=status, error_code=code,
                                                               error_message=message))
            return
        usage = Usage(prompt_tokens=await self.prompt_tokens(),
                      completion_tokens=await tokens.count_completion(texts))
        self.charged_usage = usage
        await self.hold.settle(pricing.cost_micros(self.prices, usage), estimated=True, outcome=usage_outcome(
            usage, None, status=status, error_code=code, error_message=message, cost_prices=self.cost_prices,
            generation_id=generation), response=self._answer())

    def _answer(self) -> dict[str, Any] | None:
        """The answer as the client received it (choice 0), for a stored conversation."""
        if not self.keep_answer:
            return None
        return {"message": streamed_message(self._parsed(self.delivered + self.sending))}

    def _generation_id(self) -> str | None:
        """The upstream's id of the completion, from the first data chunk delivered (one parse, not the stream's)."""
        first = next((event for event in self.delivered + self.sending if event.startswith(_DATA)), None)
        return generation_id(self._parse(first)) if first is not None else None

    def reader_done(self) -> bool:
        return self.opened.raw.content.at_eof()

    def _parsed(self, events: list[bytes]) -> list[dict[str, Any]]:
        chunks: list[dict[str, Any]] = []
        for event in events:
            data = self._parse(event) if event.startswith(_DATA) else None
            if isinstance(data, dict):
                chunks.append(data)
        return chunks

    def delivered_texts(self) -> list[str]:
        """The generated text the client received (or is about to, once the charge commits)."""
        texts: list[str] = []
        for data in self._parsed(self.delivered + self.sending):
            texts.extend(choice_texts(data.get("choices"), "delta"))
        return texts


def streamed_message(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Choice 0's message put back together from its stream deltas: content, reasoning, refusal and tool calls
    (each call's name and arguments joined across chunks, by its index)."""
    texts: dict[str, list[str]] = {"content": [], "reasoning": [], "refusal": []}
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            for name, parts in texts.items():
                if isinstance(value := delta.get(name), str):
                    parts.append(value)
            for call in delta.get("tool_calls") or []:
                if not isinstance(call, dict):
                    continue
                index = call.get("index", 0)
                merged = calls.setdefault(index if isinstance(index, int) else 0,
                                          {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                for name in ("id", "type"):
                    if isinstance(call.get(name), str):
                        merged[name] = call[name]
                function = call.get("function")
                if isinstance(function, dict):
                    for name in ("name", "arguments"):
                        if isinstance(function.get(name), str):
                            merged["function"][name] += function[name]
    content = "".join(texts["content"]) if texts["content"] or not calls else None
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    for name in ("reasoning", "refusal"):
        if texts[name]:
            message[name] = "".join(texts[name])
    return message
