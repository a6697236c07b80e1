"""Reading request input: JSON bodies, query parameters and their validation into clear 400s."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel

from gateway.errors import invalid

M = TypeVar("M", bound=BaseModel)


async def read_json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        raise invalid("The request body is empty; send a JSON object")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object")
    return data


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
