"""Structured logs: JSON lines when the log does not go to a terminal (a service, a container, a file), readable
text on a terminal; `log_format` (auto, json, text) chooses.

Every line logged while a request is handled carries its `request_id` (and `client_request_id` when the client sent
a usable X-Request-Id of its own), and `account_id` and `key_id` once the key is known, from a context variable the
error middleware and authentication set. Tasks started while handling the request (a settlement, a stream drained
after its client left) copy the context, so their lines carry them too.
Nothing secret is put in the context: ids only.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

# The ids of the request being handled (empty outside one).
CONTEXT: ContextVar[dict[str, str]] = ContextVar("meterline_log_context", default={})  # noqa: B039 - never mutated
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def start(request_id: str, client_request_id: str | None = None) -> None:
    """A new request: its context starts afresh (a connection's next request must not inherit the last one's).
    `client_request_id` is the client's own X-Request-Id, already checked to be a plain id."""
    CONTEXT.set({"request_id": request_id} if client_request_id is None
                else {"request_id": request_id, "client_request_id": client_request_id})


def bind(**ids: str | None) -> None:
    """Add ids to this request's log context (a new dict: contexts copied into tasks keep what they had)."""
    CONTEXT.set({**CONTEXT.get(), **{name: value for name, value in ids.items() if value is not None}})


class ContextFilter(logging.Filter):
    """Puts the request's ids on every record, for both formats."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in CONTEXT.get().items():
            setattr(record, name, value)
        return True


# A record's structured fields: `log.info(..., extra={FIELDS: {...}})` puts them in the JSON line as they are (the
# access log's method, route, status...); a text line shows only the message, which should say them readably.
FIELDS = "fields"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO-8601), level, logger, message, the request's ids, the record's
    structured fields, the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
        }
        for name in ("request_id", "client_request_id", "account_id", "key_id"):
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            for name, value in fields.items():
                line.setdefault(name, value)  # never over the line's own keys
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{text} [{request_id}]" if request_id else text


def configure(log_format: str = "auto", *, stream: Any = None) -> None:
    """The root logger's one handler, at INFO, in the chosen format (auto: JSON unless on a terminal)."""
    out = stream or sys.stderr
    use_json = log_format == "json" or (log_format == "auto" and not (hasattr(out, "isatty") and out.isatty()))
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
