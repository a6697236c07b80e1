"""What every console page shares: the session key, rendering (with the session's CSRF token), error pages, form
fields, and the template filters that show money exactly."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp_jinja2
from aiohttp import web
from multidict import MultiDictProxy

from billing.console import Session
from billing.money import format_usd
from gateway.errors import ApiError, invalid
from gateway.keys import SETTINGS

COOKIE = "meterline_console"
SESSION = web.RequestKey("console_session", Session)
MAX_TEXT = 1_000


def admin_token(request: web.Request) -> str | None:
    configured = request.config_dict[SETTINGS].admin_token
    return configured.get_secret_value() if configured is not None and configured.get_secret_value() else None


def static(name: str) -> str:
    """A vendored or own static file's URL (its name carries its version where it has one)."""
    return f"/console/static/{name}"


def forbidden(message: str) -> ApiError:
    return ApiError(403, "FORBIDDEN", message)


def render(request: web.Request, template: str, context: Mapping[str, Any] | None = None, *,
           status: int = 200) -> web.Response:
    session = request.get(SESSION)
    base = {"session": session, "csrf": session.csrf if session is not None else "", "path": request.path,
            "query": request.rel_url.query, "static": static}
    return aiohttp_jinja2.render_template(template, request, {**base, **(context or {})}, status=status)


def see_other(location: str) -> web.Response:
    """303 to `location` (a path of ours): the answer to a form that changed something, so a reload does not
    post it again."""
    return web.Response(status=303, headers={"Location": location})


def render_error(request: web.Request, status: int, message: str, *, headers: Mapping[str, str] | None = None,
                 param: str | None = None) -> web.Response:
    response = render(request, "error.html", {"status": status, "message": message, "param": param}, status=status)
    if headers:
        response.headers.update(headers)
    return response


def text_field(form: MultiDictProxy[Any], name: str, *, required: bool = False,
               max_length: int = MAX_TEXT) -> str | None:
    value = form.get(name)
    text = value.strip() if isinstance(value, str) else ""
    if not text:
        if required:
            raise invalid(f"{name} is required", name)
        return None
    if len(text) > max_length:
        raise invalid(f"{name} is longer than {max_length} characters", name)
    if "\x00" in text:
        raise invalid(f"{name} must not contain NUL characters", name)
    return text


def int_field(form: MultiDictProxy[Any], name: str, *, low: int, high: int) -> int | None:
    text = text_field(form, name, max_length=20)
    if text is None:
        return None
    if not text.isascii() or not text.lstrip("-").isdigit():
        raise invalid(f"{name} must be a whole number", name)
    value = int(text)
    if not low <= value <= high:
        raise invalid(f"{name} must be between {low} and {high}", name)
    return value


def _usd(micros: int | None) -> str:
    """An exact amount: `$12.500000` (six places, as the ledger holds it), negative as `-$1.000000`."""
    if micros is None:
        return "—"
    return f"-${format_usd(-micros)}" if micros < 0 else f"${format_usd(micros)}"


def _when(value: datetime | str | None) -> str:
    """A time in UTC to the second; an ISO-8601 string (as an API answer renders one) reads as well."""
    if value is None:
        return "—"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _number(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def template_filters() -> dict[str, Any]:
    return {"usd": _usd, "when": _when, "number": _number}
