"""Query parameters and request headers as values: each one reads itself from a request (a clear 400 naming it
when it is bad) and describes itself as an OpenAPI parameter, so what a handler reads and what the document says
it reads are one definition (gateway.contract). Timestamps are parsed here (`parse_time`), for the API and the
console alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.bodies import dry_run, header, query_int
from gateway.errors import invalid


def query_time(request: web.Request, name: str, *, required: bool = False) -> datetime | None:
    """An ISO-8601 timestamp query parameter ("2026-03-15T14:32:10Z"); one without a zone is taken as UTC."""
    raw = request.query.get(name, "").strip()
    if not raw:
        if required:
            raise invalid(f"{name} is required (an ISO-8601 timestamp such as 2026-03-01T00:00:00Z)", name)
        return None
    return parse_time(raw, name)


def parse_time(raw: str, name: str) -> datetime:
    """An ISO-8601 timestamp or date as an aware UTC datetime (no zone: UTC); a 400 naming `name` otherwise."""
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
        # Normalised to UTC here, so an offset that pushes it past year 1..9999 is a 400, not a driver error.
        return value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise invalid(f"{name} must be an ISO-8601 timestamp such as 2026-03-01T00:00:00Z", name) from None


@dataclass(frozen=True, slots=True)
class Param:
    """A query parameter (or, `where="header"`, a request header) and what it means."""

    name: str
    description: str
    required: bool = False
    where: str = "query"

    def schema(self) -> dict[str, Any]:
        return {"type": "string"}

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "in": self.where, "required": self.required, "description": self.description,
                "schema": self.schema()}


@dataclass(frozen=True, slots=True)
class IntParam(Param):
    default: int = 0
    low: int = 0
    high: int = 0

    def schema(self) -> dict[str, Any]:
        return {"type": "integer", "minimum": self.low, "maximum": self.high, "default": self.default}

    def read(self, request: web.Request) -> int:
        return query_int(request, self.name, default=self.default, low=self.low, high=self.high)


@dataclass(frozen=True, slots=True)
class TimeParam(Param):
    def schema(self) -> dict[str, Any]:
        # A date alone is accepted too (its midnight, UTC); no zone means UTC.
        return {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "string", "format": "date"}],
                "examples": ["2026-03-01T00:00:00Z", "2026-03-01"]}

    def read(self, request: web.Request) -> datetime | None:
        return query_time(request, self.name, required=self.required)

    def read_required(self, request: web.Request) -> datetime:
        value = query_time(request, self.name, required=True)
        assert value is not None
        return value


@dataclass(frozen=True, slots=True)
class TextParam(Param):
    """Free text (an id, a cursor, a filter): empty means absent; longer than `max_length` is a 400."""

    max_length: int | None = None
    pattern: str | None = None  # for the document: what a value the handler takes looks like

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "string"}
        if self.max_length is not None:
            schema["maxLength"] = self.max_length
        if self.pattern is not None:
            schema["pattern"] = self.pattern
        return schema

    def read(self, request: web.Request) -> str | None:
        value = request.query.get(self.name) or None
        if value is not None and self.max_length is not None and len(value) > self.max_length:
            raise invalid(f"{self.name} is longer than {self.max_length} characters", self.name)
        return value


_BOOLEANS = ("true", "false", "1", "0")


@dataclass(frozen=True, slots=True)
class BoolParam(Param):
    def schema(self) -> dict[str, Any]:
        return {"type": "string", "enum": list(_BOOLEANS), "default": "false"}

    def read(self, request: web.Request) -> bool:
        raw = request.query.get(self.name, "false").lower()
        if raw not in _BOOLEANS:
            raise invalid(f"{self.name} must be true or false", self.name)
        return raw in ("true", "1")


@dataclass(frozen=True, slots=True)
class ChoiceParam(Param):
    choices: tuple[str, ...] = ()
    default: str = ""

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "enum": list(self.choices), "default": self.default}

    def read(self, request: web.Request) -> str:
        return self._checked(request.query.get(self.name, self.default))

    def read_path(self, request: web.Request) -> str:
        return self._checked(request.match_info[self.name])

    def _checked(self, value: str) -> str:
        if value not in self.choices:
            raise invalid(f"{self.name} must be one of {', '.join(self.choices)}", self.name)
        return value


@dataclass(frozen=True, slots=True)
class DryRunParam(Param):
    def schema(self) -> dict[str, Any]:
        # Case and surrounding spaces are ignored; anything but these is a 400.
        return {"type": "string", "enum": ["true", "false", "1", "0", ""], "default": "false"}

    def read(self, request: web.Request) -> bool:
        return dry_run(request.query)


@dataclass(frozen=True, slots=True)
class HeaderParam(Param):
    max_length: int = 255

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "minLength": 1, "maxLength": self.max_length}

    def read(self, request: web.Request) -> str | None:
        return header(request, self.name)


DRY_RUN = DryRunParam("dryRun", "true: validate and answer the hold the call would take (the most it may cost), "
                      "calling nothing and holding nothing")
CURSOR = TextParam("cursor", "next_cursor of the previous page")
IDEMPOTENCY_KEY = HeaderParam("Idempotency-Key", "A retry with the same key and body answers the first result "
                              "(with Idempotent-Replayed: true) instead of charging again", where="header")


def limit(default: int, high: int) -> IntParam:
    return IntParam("limit", f"Items per page (1 to {high})", default=default, low=1, high=high)
