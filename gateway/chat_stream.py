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
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from billing import pricing, tokens
from billing.holds import Hold
from billing.pricing import TokenPrices, Usage
from billing.records import Outcome
from billing.tasks import TaskOwner
from gateway.chat_usage import choice_texts, priced_usage, usage_outcome
from gateway.errors import ApiError
from gateway.render import dumps
from gateway.upstream import EventReader, UpstreamError, UpstreamResponse

log = logging.getLogger("meterline.chat")

_DATA = b"data:"
_DONE = b"[DONE]"


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
                 settle_wait_seconds: float, edit: Callable[[bytes], bytes]) -> None:
        self.opened = opened
        self.reader = EventReader(opened)
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
        self.ended = False  # the upstream stream is over (finished, failed or cut)
        self.failure: ApiError | None = None
        self.client_gone = False
        self.settling: asyncio.Task[None] | None = None  # the settlement, once started
        self.waited = False  # the stream has waited for its settlement's commit

    async def run(self, request: web.Request, response: web.StreamResponse) -> None:
        """Relay until the upstream ends or the client leaves. A client that leaves makes writes raise
        ConnectionError (aiohttp's ClientConnectionResetError is one); that ends the relay, not the call."""
        reader = self.reader
        inspect = self._inspect
        delivered = self.delivered
        try:
            await response.prepare(request)
            while True:
                try:
                    event = await reader.next()
                except UpstreamError as exc:
                    self.ended = True
                    self.failure = exc
                    await self._settled()
                    await response.write(error_event(exc))
                    return
                if event is None:
                    self.ended = True
                    await self._settled()
                    await response.write_eof()
                    return
                out = inspect(event)
                if self.settling is None and (self.usage is not None
                                              or (_DONE in event and _payload(event) == _DONE)):
                    await self._settled()  # the usage chunk or [DONE] goes out once the charge is committed
                if out is not None:
                    await response.write(out)
                    delivered.append(out)
        except ConnectionError:
            self.client_gone = True

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
        if self.include_usage:
            data["usage"] = priced_usage(raw, self.cost or 0)
            return _encode(data)
        if data.get("choices"):
            del data["usage"]
            return _encode(data)
        return None  # the usage-only chunk the client did not ask for

    def _error_event(self, event: bytes) -> None:
        data = self._parse(event)
        error = data.get("error") if isinstance(data, dict) else None
        if error is None:
            return
        message = error.get("message") if isinstance(error, dict) else error
        self.failure = ApiError(502, "UPSTREAM_ERROR",
                                self.opened.upstream.redact(str(message or "The upstream failed mid-stream")),
                                type="upstream_error")

    def finish_owned(self, tasks: TaskOwner) -> asyncio.Task[None]:
        """Hand the hold to a task the app owns, which drains the upstream if needed and settles."""
        self.hold.hand_off()
        return tasks.drained(self.finish(), f"finish stream {self.hold.request_id}")

    async def _drain(self) -> None:
        """Read on (writing nothing) until the usage chunk or the end, for at most `drain_seconds`."""
        try:
            async with asyncio.timeout(self.drain_seconds):
                while self.usage is None:
                    event = await self.reader.next()
                    if event is None:
                        break
                    self._inspect(event)
        except TimeoutError:
            log.warning("stream %s: no usage within %gs of the client leaving; billing an estimate",
                        self.hold.request_id, self.drain_seconds)
        except UpstreamError as exc:
            self.failure = self.failure or exc

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
        if self.usage is not None and self.cost is not None:
            await self.hold.settle(self.cost, outcome=usage_outcome(
                self.usage, self.usage_raw, status=status, error_code=code, error_message=message))
            return
        texts = self.delivered_texts()
        if self.failure is not None and not any(texts):
            # Failed before any output: nothing was delivered, so nothing is charged.
            await self.hold.void(self.failure.message, Outcome(status=status, error_code=code,
                                                               error_message=message))
            return
        usage = Usage(prompt_tokens=await self.prompt_tokens(),
                      completion_tokens=await tokens.count_completion(texts))
        await self.hold.settle(pricing.cost_micros(self.prices, usage), estimated=True, outcome=usage_outcome(
            usage, None, status=status, error_code=code, error_message=message))

    def reader_done(self) -> bool:
        return self.opened.raw.content.at_eof()

    def delivered_texts(self) -> list[str]:
        texts: list[str] = []
        for event in self.delivered:
            data = self._parse(event) if event.startswith(_DATA) else None
            if isinstance(data, dict):
                texts.extend(choice_texts(data.get("choices"), "delta"))
        return texts
