"""JSON rendering for responses: one encoder, UTC ISO-8601 timestamps, USD shown from exact micros."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from aiohttp import web

from billing.money import micros_to_usd


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes | memoryview):
        raise TypeError("refusing to render raw bytes")
    raise TypeError(f"cannot render {type(value).__name__}")


def iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


_SURROGATE = re.compile("[\ud800-\udfff]")


def dumps(data: Any) -> str:
    """Compact JSON text. A lone surrogate (an upstream may send one as an escape) cannot be written as UTF-8, so
    then the text is escaped (`\\ud800`), which is what the upstream sent."""
    text = json.dumps(data, default=_default, separators=(",", ":"), ensure_ascii=False)
    if not text.isascii() and _SURROGATE.search(text):
        return json.dumps(data, default=_default, separators=(",", ":"))
    return text


def json_response(
    data: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(text=dumps(data), status=status, headers=headers, content_type="application/json")


def usd_number(micros: int) -> float:
    """A USD amount for wire fields that other APIs define as JSON numbers (Lumenfall's `available.amount`,
    OpenRouter's `usage.cost`). The value is computed exactly as a Decimal; the float is only its JSON spelling,
    and for any amount below $1e9 its shortest repr is that exact decimal. The integer `*_micros` fields beside
    it are the authoritative amounts."""
    return float(micros_to_usd(micros))
