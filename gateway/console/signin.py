"""Signing in and out of the console.

The sign-in form takes the admin token or an API key (`ml-…`) in its body, never in a URL. It is protected by a
double-submit token (a cookie and a hidden field that must match), since there is no session yet. Every attempt is
counted per client before it is checked (billing.console); past `console_signin_limit` attempts in
`console_signin_window_seconds` the answer is 429 until the window turns, and a success clears the count.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

from billing import console as sessions
from gateway.console.common import COOKIE, admin_token, forbidden, render, see_other, text_field
from gateway.errors import ApiError
from gateway.keys import KEY_STORE, POOL, SETTINGS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = logging.getLogger("meterline.console")

LOGIN_COOKIE = "meterline_console_login"


def _cookie_options(request: web.Request) -> dict[str, object]:
    return {"httponly": True, "samesite": "Strict", "secure": request.secure, "path": "/console"}


async def login_page(request: web.Request) -> web.Response:
    token = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(32)
    response = render(request, "login.html", {"login_csrf": token, "failed": None})
    response.set_cookie(LOGIN_COOKIE, token, max_age=3600, **_cookie_options(request))  # type: ignore[arg-type]
    return response


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    sent = str(form.get("login_csrf") or "")
    expected = request.cookies.get(LOGIN_COOKIE) or ""
    if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise forbidden("The sign-in form expired: reload the page and sign in again")
    settings = request.config_dict[SETTINGS]
    pool = request.config_dict[POOL]
    client = request.remote or "unknown"
    if not await sessions.signin_allowed(pool, client, limit=settings.console_signin_limit,
                                         window_seconds=settings.console_signin_window_seconds):
        log.warning("console sign-in refused: too many attempts from %s", client)
        raise ApiError(429, "RATE_LIMITED", "Too many sign-in attempts: wait a few minutes and try again",
                       headers={"Retry-After": str(settings.console_signin_window_seconds)})
    secret = text_field(form, "token", max_length=512) or ""
    lifetime = settings.console_session_hours * 3600
    configured = admin_token(request)
    if configured is not None and hmac.compare_digest(secret.encode(), configured.encode()):
        token, _ = await sessions.open_session(pool, kind="admin", admin_token=configured, lifetime_seconds=lifetime)
        target = "/console"
    else:
        key = await request.config_dict[KEY_STORE].authenticate(secret)
        if key is None:
            log.info("console sign-in failed from %s", client)
            return render(request, "login.html", {"login_csrf": expected,
                                                  "failed": "That is not the admin token or a live API key."},
                          status=401)
        token, _ = await sessions.open_session(pool, kind="customer", key_id=key.id, account_id=key.account_id,
                                               lifetime_seconds=lifetime)
        target = "/console/me"
    await sessions.signed_in(pool, client)
    response = see_other(target)
    response.set_cookie(COOKIE, token, max_age=int(lifetime), **_cookie_options(request))  # type: ignore[arg-type]
    response.del_cookie(LOGIN_COOKIE, path="/console")
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    token = request.cookies.get(COOKIE)
    if token:
        await sessions.close_session(request.config_dict[POOL], token)
    response = see_other("/console/login")
    response.del_cookie(COOKIE, path="/console")
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
