"""The request record: one row per billed call, written by the ledger in the same transaction as its settlement
or void. Built in one place: a call's `RequestRecord` is made when its hold is opened, and its `Outcome` is laid
over it when the hold is resolved. The fields are exactly what `meterline_record` reads (a test compares them);
the money fields (cost, hold, overrun, estimated) always come from the ledger, never from here.

Text that reached here was validated at the edge; `as_json` still cleans it (NUL, lone surrogates), because a
record must never be able to abort the settlement it rides with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from billing.db import clean_text

# Longest text kept in a record's free-text fields (an upstream's error message, a `user` string).
MAX_TEXT = 1_000


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a call ended: its status and what the upstream reported."""

    status: str = "completed"  # completed | upstream_failure | cancelled
    error_code: str | None = None
    error_message: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    quantity: int | None = None  # images returned, seconds of video: None keeps the record's own
    upstream_cost_micros: int | None = None
    usage: dict[str, Any] | None = None
    duration_ms: int | None = None


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What is known of a call before it is forwarded, and (once `finished`) how it ended."""

    model: str | None = None
    modality: str | None = None
    endpoint: str | None = None
    upstream: str | None = None
    user: str | None = None
    quantity: int | None = None
    status: str = "pending"
    error_code: str | None = None
    error_message: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    upstream_cost_micros: int | None = None
    usage: dict[str, Any] | None = None
    duration_ms: int | None = None

    def finished(self, outcome: Outcome) -> RequestRecord:
        changes = {field.name: getattr(outcome, field.name) for field in dataclasses.fields(outcome)}
        if changes["quantity"] is None:
            del changes["quantity"]
        return dataclasses.replace(self, **changes)

    def as_json(self) -> dict[str, Any]:
        """The jsonb `meterline_record` reads: set fields only, text cleaned and bounded."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if isinstance(value, str):
                value = _text(value)
            out[field.name] = value
        return out


def _text(value: str) -> str:
    return clean_text(value[:MAX_TEXT])
