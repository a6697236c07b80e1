"""The web console under /console: server-rendered pages (Jinja2 through aiohttp-jinja2) for admins and finance,
and a read-only view for customers; htmx for partial updates and uPlot for charts, both vendored in `static/` with
their licences. Pages read without JavaScript; charts need it. With it, a filter or period form swaps only the
page's `<main>` (htmx `hx-get`, `hx-select`) and pushes its URL, so filters stay in the address bar either way.

Sessions (billing.console): signing in with the admin token or an API key opens a session held in an HttpOnly,
SameSite=Strict cookie (Secure over HTTPS) that expires; every POST carries the session's CSRF token, and the
sign-in form a double-submit one. Failed sign-ins are limited per client. No secret is ever put in a page (but the
new key's, once, on the page answering its creation), a URL or a log line.

Errors become HTML pages with the status the API would give (a database outage: 503 with Retry-After), never a
traceback.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web
from pydantic import ValidationError

from billing import console as sessions
from billing.errors import BillingError, DatabaseUnavailable
from gateway.console import admin_pages, conversation_pages, customer_pages, finance_pages, requests_pages, signin
from gateway.console.common import (
    COOKIE,
    SESSION,
    admin_token,
    forbidden,
    render_error,
    template_filters,
)
from gateway.errors import ApiError, database_unavailable, from_billing, from_validation
from gateway.keys import POOL

log = logging.getLogger("meterline.console")

STATIC = Path(__file__).resolve().parent / "static"
_PUBLIC = ("/console/login", "/console/static/")
# What every console response says to the browser: nothing cached, nothing framed, no referrer, and scripts and
# styles only from the console itself (chart data travels in JSON script blocks, which are not executed).
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
}


@web.middleware
async def console_middleware(request: web.Request, handler: signin.Handler) -> web.StreamResponse:
    try:
        response = await _guarded(request, handler)
    except ApiError as exc:
        response = render_error(request, exc.status, exc.message, headers=exc.headers, param=exc.param)
    except DatabaseUnavailable:
        outage = database_unavailable()
        response = render_error(request, outage.status, outage.message, headers=outage.headers)
    except BillingError as exc:
        api = from_billing(exc)
        response = render_error(request, api.status, api.message)
    except ValidationError as exc:
        response = render_error(request, 400, from_validation(exc).message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = render_error(request, exc.status, exc.reason)
    except Exception:
        # As the API's error middleware does: logged with its traceback, the browser told nothing more.
        log.exception("unhandled error on %s %s", request.method, request.path)
        response = render_error(request, 500, "Internal error")
    if not request.path.startswith("/console/static/"):
        response.headers.update(_HEADERS)
    return response


async def _guarded(request: web.Request, handler: signin.Handler) -> web.StreamResponse:
    if request.path.startswith(_PUBLIC):
        return await handler(request)
    token = request.cookies.get(COOKIE)
    session = None
    if token:
        session = await sessions.find_session(request.config_dict[POOL], token, admin_token=admin_token(request))
    if session is None:
        if request.method == "GET":
            raise web.HTTPSeeOther("/console/login")
        raise forbidden("You are not signed in (or your session has ended)")
    if request.method not in ("GET", "HEAD"):
        form = await request.post()
        sent = str(form.get("csrf") or request.headers.get("X-CSRF-Token") or "")
        if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            raise forbidden("The form's CSRF token is missing or wrong: reload the page and try again")
    customer_page = request.path == "/console/me" or request.path.startswith("/console/me/")
    if session.admin and customer_page:
        raise web.HTTPSeeOther("/console")
    if not session.admin and not customer_page and request.path != "/console/logout":
        if request.method == "GET":
            raise web.HTTPSeeOther("/console/me")
        raise forbidden("This page is for admins")
    request[SESSION] = session
    return await handler(request)


def console_app() -> web.Application:
    app = web.Application(middlewares=[console_middleware])
    env = aiohttp_jinja2.setup(app, loader=jinja2.PackageLoader("gateway.console", "templates"),
                               autoescape=jinja2.select_autoescape(default=True),
                               undefined=jinja2.StrictUndefined)
    env.filters.update(template_filters())
    app.router.add_static("/static", STATIC, name="static")
    signin.add_routes(app)
    admin_pages.add_routes(app)
    finance_pages.add_routes(app)
    customer_pages.add_routes(app)
    requests_pages.add_routes(app)
    conversation_pages.add_routes(app)
    return app
