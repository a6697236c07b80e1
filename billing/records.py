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
    generation_id: str | None = None  # the upstream's own id of the call (OpenRouter's gen-..., a video job's id)


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
    client_request_id: str | None = None  # the caller's own X-Request-Id (gateway.errors.client_request_id)
    # Which provider served the call (a model with several: gateway.failover), under which model id, and every
    # provider tried: [{provider, upstream_status, error_code, duration_ms}].
    provider: str | None = None
    provider_model: str | None = None
    attempts: list[dict[str, Any]] | None = None
    generation_id: str | None = None

    def as_json(self, outcome: Outcome | None = None, *, duration_ms: int | None = None) -> dict[str, Any]:
        """The jsonb `meterline_record` reads: this record's set fields with the outcome's laid over them (an
        outcome's None leaves the record's value), text cleaned and bounded; `duration_ms` when neither gives one."""
        out: dict[str, Any] = {}
        for name in _RECORD_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = _text(value) if isinstance(value, str) else value
        if outcome is not None:
            for name in _OUTCOME_FIELDS:
                value = getattr(outcome, name)
                if value is not None:
                    out[name] = _text(value) if isinstance(value, str) else value
        if duration_ms is not None:
            out.setdefault("duration_ms", duration_ms)
        return out


_RECORD_FIELDS = tuple(field.name for field in dataclasses.fields(RequestRecord))
_OUTCOME_FIELDS = tuple(field.name for field in dataclasses.fields(Outcome))


def _text(value: str) -> str:
    return clean_text(value[:MAX_TEXT])
