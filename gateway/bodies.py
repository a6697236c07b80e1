"""Reading request input: JSON bodies, headers and query parameters, validated into clear 400s.

Text is checked before it can reach PostgreSQL or an upstream: a JSON body may not hold a lone UTF-16 surrogate
(`\\ud800` unpaired: not Unicode text, and unencodable), a NUL character (PostgreSQL text cannot hold one) or
an integer beyond 64 bits, anywhere; the 400 names the field. A header read as text must be valid UTF-8 without
control characters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel

from gateway.errors import invalid

M = TypeVar("M", bound=BaseModel)

# What a JSON text must contain for a decoded string to hold a lone surrogate or a NUL (an escape: raw UTF-8 cannot
# encode either): only bodies that match are walked. A regex led by a literal is a fast scan in C (about 30 us for
# 100 KB of ASCII); integers are checked as the parser meets them.
_SUSPECT = re.compile(rb"\\u(?:[dD][89a-fA-F]|0000)")
_SURROGATE = re.compile("[\ud800-\udfff]")
_INT64 = 2**63
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")  # a tab is allowed in a header value


class _Oversized(Exception):
    """An integer beyond 64 bits met while parsing: the body is walked again to name its field."""


def _integer(text: str) -> int:
    value = int(text)  # past sys.get_int_max_str_digits this raises ValueError (a 400 of its own)
    if not -_INT64 <= value < _INT64:
        raise _Oversized
    return value


async def read_json_object(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.read()
    except web.RequestPayloadError:
        raise invalid("The request body could not be read: its Content-Encoding does not decode") from None
    if not raw:
        raise invalid("The request body is empty; send a JSON object")
    try:
        try:
            data = json.loads(raw, parse_int=_integer)
        except _Oversized:
            check_text(json.loads(raw), "")  # raises, naming the field
            raise invalid("The request body holds an integer beyond 64 bits") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"The request body is not valid JSON: {exc}") from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise invalid("The request body holds an integer too large to be a number any field takes") from None
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object")
    if _SUSPECT.search(raw):
        check_text(data, "")
    return data


def check_text(value: Any, where: str) -> None:
    """Raise a 400 naming the first field (dotted path) holding a lone surrogate, a NUL or an integer past 64
    bits. Keys are checked like values."""
    if isinstance(value, str):
        _check_string(value, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_string(key, f"{where}.{key}" if where else key)
            check_text(item, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_text(item, f"{where}.{index}" if where else str(index))
    elif isinstance(value, int) and not isinstance(value, bool) and not -_INT64 <= value < _INT64:
        raise invalid(f"{where or 'the body'}: is an integer beyond 64 bits", where or None)


def _check_string(value: str, where: str) -> None:
    if "\x00" in value:
        raise invalid(f"{where or 'the body'}: must not contain NUL characters", where or None)
    if not value.isascii() and _SURROGATE.search(value):
        raise invalid(f"{where or 'the body'}: holds a lone UTF-16 surrogate, which is not valid Unicode text",
                      where or None)


def header(request: web.Request, name: str) -> str | None:
    """A header read as text, or None when absent: 400 naming it when it is not valid UTF-8 or holds a control
    character (its value is never echoed)."""
    value = request.headers.get(name)
    if value is None:
        return None
    if not value.isascii() and _SURROGATE.search(value):
        raise invalid(f"The {name} header is not valid UTF-8", name)
    if _CONTROL.search(value):
        raise invalid(f"The {name} header holds a control character", name)
    return value


async def read_model(request: web.Request, model: type[M]) -> M:
    return model.model_validate(await read_json_object(request))


def query_int(request: web.Request, name: str, *, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid(f"{name} must be an integer", name) from None
    if not low <= value <= high:
        raise invalid(f"{name} must be between {low} and {high}", name)
    return value


_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0", ""})


def dry_run(query: Mapping[str, str]) -> bool:
    """`?dryRun=true` asks for an estimate only (every POST that bills); anything but a clear true/false is
    refused rather than guessed."""
    raw = query.get("dryRun")
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise invalid(f"dryRun must be true or false, got {raw!r}", "dryRun")
