"""`GET /openapi.json`: the OpenAPI 3.1 document of every API route, generated from the app's route table and the
contract each handler declares (gateway.contract), with request and answer schemas from the pydantic models and
field tables the handlers validate with. Nothing in it is written beside the server, so it cannot drift.

What is derived rather than declared: the paths (walked from the router, sub-apps included), path parameters
(from the path), security (the admin sub-app's middleware: the admin token; `requires_key`: a customer key), and
the errors every route shares: 400 for a NUL in the path or query (the error middleware refuses it everywhere),
404 where a path parameter may hold what the router cannot match, 401 and 429 where a key or token is checked, 413
where a body is read, and 503 with Retry-After where the database is used. The web console (HTML pages for
browsers) is not part of the API and is left out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import PrefixedSubAppResource
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from gateway import contract, wire
from gateway.auth import admin_middleware, needs_key
from gateway.contract import Failure, Operation
from gateway.errors import REQUEST_ID_HEADER
from gateway.keys import SETTINGS
from gateway.render import dumps
from gateway.settings import Settings

# Sub-apps that are not the API: the console serves HTML pages to browsers.
UNDOCUMENTED = frozenset({"/console"})
_NOT_WORD = re.compile(r"[^a-z0-9]+")
_PATH_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")
_COMPONENTS = "#/components/schemas/{model}"
# The models the document refers to, each with the way it is used (request bodies validate, answers serialize).
Models = dict[type[BaseModel], JsonSchemaMode]


@dataclass(frozen=True, slots=True)
class Route:
    """A served route: its method, its path as OpenAPI writes it, its handler and who may call it."""

    method: str
    path: str
    handler: Any
    security: str | None  # "adminToken", "customerKey" or None


def routes(app: web.Application) -> Iterator[Route]:
    """Every API route the app serves (HEAD, which aiohttp adds beside each GET, mirrors its GET)."""
    yield from _walk(app, admin=False)


def _walk(app: web.Application, *, admin: bool) -> Iterator[Route]:
    for resource in app.router.resources():
        if isinstance(resource, PrefixedSubAppResource):
            info = resource.get_info()
            if info["prefix"] in UNDOCUMENTED:
                continue
            sub: web.Application = info["app"]
            yield from _walk(sub, admin=admin or admin_middleware in sub.middlewares)
            continue
        for route in resource:
            if route.method == "HEAD" or resource.canonical is None:
                continue
            handler = route.handler
            declared = contract.declared(handler)
            security = ("adminToken" if admin else "customerKey" if needs_key(handler)
                        else declared.security if declared is not None else None)
            yield Route(route.method, resource.canonical, handler, security)


def check_declared(app: web.Application) -> None:
    """Raise LookupError naming every route whose handler declares no contract."""
    missing = [f"{route.method} {route.path}" for route in routes(app) if contract.declared(route.handler) is None]
    if missing:
        raise LookupError(f"routes without a contract (gateway.contract.operation): {', '.join(missing)}")


def document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document of `app`. Raises LookupError naming any route whose handler declares no contract."""
    check_declared(app)
    settings = app[SETTINGS]
    models: Models = {wire.Error: "serialization"}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes(app):
        declared = contract.declared(route.handler)
        assert declared is not None
        paths.setdefault(_PATH_PARAM.sub(r"{\1}", route.path), {})[route.method.lower()] = _operation(
            route, declared, settings, models)
    _, schemas = models_json_schema(sorted(models.items(), key=lambda item: item[0].__name__),
                                    ref_template=_COMPONENTS)
    defs = schemas.get("$defs", {})
    clashes = sorted(m.__name__ for m in models if m.__name__ not in defs)
    if clashes:  # pydantic renames models that share a name, which would break the references made above
        raise LookupError(f"two request or answer models share a name: {', '.join(clashes)}")
    return {
        "openapi": "3.1.0",
        "info": {"title": "Meterline", "version": "1",
                 "description": "A metered-billing gateway for OpenAI-compatible AI APIs. Amounts are integer "
                                "micros (1/1,000,000 USD)."},
        "servers": [{"url": settings.public_url or "/"}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": defs,
            "securitySchemes": {
                "customerKey": {"type": "http", "scheme": "bearer", "bearerFormat": "ml-...",
                                "description": "A customer API key (`Authorization: Bearer ml-...`)"},
                "adminToken": {"type": "http", "scheme": "bearer",
                               "description": "The operator's admin token (`admin_token`)"},
            },
        },
    }


def _ref(model: type[BaseModel], models: Models, mode: JsonSchemaMode = "serialization") -> dict[str, Any]:
    """A reference to `model`'s schema: as it validates a request body, or as an answer is rendered."""
    models[model] = mode
    return {"$ref": _COMPONENTS.format(model=model.__name__)}


def _operation(route: Route, op: Operation, settings: Settings,
               models: Models) -> dict[str, Any]:
    declared = {p.name: p for p in op.path}
    section = route.path.strip("/").split("/")[0]
    path = _PATH_PARAM.sub(r"{\1}", route.path)
    spec: dict[str, Any] = {
        # From the method and path, so unique by construction: post_v1_chat_completions, get_admin_accounts_account_id
        "operationId": _NOT_WORD.sub("_", f"{route.method} {path}".lower()).strip("_"),
        "summary": op.summary,
        "tags": [{"v1": "consumer", "openai": "consumer (/openai/v1)", "admin": "admin"}.get(section, "health")],
        "parameters": [
            *(declared[p].spec() if p in declared else
              {"name": p, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
              for p in _PATH_PARAM.findall(route.path)),
            *(p.spec() for p in (*op.query, *op.headers)),
        ],
        "responses": _responses(route, op, models),
        "security": [{route.security: []}] if route.security else [],
    }
    doc = (getattr(route.handler, "__doc__", None) or "").strip()
    if doc:
        spec["description"] = doc
    if op.body is not None:
        schema = (_ref(op.body.schema, models, "validation") if isinstance(op.body.schema, type)
                  else op.body.schema(settings))
        content = {media: {"schema": schema} for media in op.body.media}
        if op.body.multipart is not None:
            content["multipart/form-data"] = {"schema": op.body.multipart(settings)}
        spec["requestBody"] = {"required": op.body.required, "content": content}
    return spec


def _failures(route: Route, op: Operation) -> list[Failure]:
    shared = [contract.INVALID]  # a NUL in the path or query is refused on every route
    if _PATH_PARAM.search(route.path):
        shared.append(contract.NO_ROUTE)  # a path parameter the router cannot match (a "/" or a line break in it)
    if route.security is not None:
        shared.append(contract.UNAUTHENTICATED)
    if route.security == "customerKey":
        shared.append(contract.RATE_LIMITED)
    if op.body is not None:
        shared.append(contract.TOO_LARGE)
    if op.database:
        shared.append(contract.DATABASE_UNAVAILABLE)
    return [*shared, *op.errors]


_HEADER = {"schema": {"type": "string"}}


def _answer_schema(model: type[BaseModel] | tuple[type[BaseModel], ...],
                   models: Models) -> dict[str, Any]:
    if isinstance(model, tuple):
        return {"anyOf": [_ref(m, models) for m in model]}
    return _ref(model, models)


def _responses(route: Route, op: Operation, models: Models) -> dict[str, Any]:
    request_id = {REQUEST_ID_HEADER: {**_HEADER, "required": True, "description": "This request's id"}}
    responses: dict[str, Any] = {}
    for answer in op.answers:
        content = {media: {"schema": _answer_schema(answer.model, models)} if answer.model is not None
                   and media == "application/json" else {} for media in answer.media}
        headers = {**request_id,
                   **{name: {**_HEADER, "description": text} for name, text in answer.headers.items()}}
        responses[str(answer.status)] = {"description": answer.description, "headers": headers, "content": content}
    by_status: dict[int, list[Failure]] = {}
    for failure in _failures(route, op):
        by_status.setdefault(failure.status, []).append(failure)
    for status, failures in sorted(by_status.items()):
        if str(status) in responses:
            continue  # a declared answer with that status (readiness's 503) describes it
        codes = list(dict.fromkeys(f.code for f in failures))
        error_headers = dict(request_id)
        for failure in failures:
            for name in failure.headers:
                # Required where every error of this status sends it (a database outage's 503 does; a missing
                # upstream's does not).
                error_headers[name] = {**_HEADER, "description": "Seconds to wait before retrying",
                                       "required": all(name in f.headers for f in failures)}
        schema = {"allOf": [_ref(wire.Error, models)],
                  "properties": {"error": {"properties": {"code": {"enum": codes}}}}}
        responses[str(status)] = {
            "description": "; ".join(f"{f.code}: {f.when}" for f in dict.fromkeys(failures)),
            "headers": error_headers,
            "content": {"application/json": {"schema": schema}},
        }
    return responses


class _Rendered:
    """The document's JSON text, made at the first request for it (tens of milliseconds, which every start of
    every process and test app would otherwise pay) and kept: the routes and settings it reflects never change
    while the app runs."""

    text: str | None = None


RENDERED = web.AppKey("openapi_rendered", _Rendered)


@contract.operation("This OpenAPI document", answer=contract.Answer(description="The OpenAPI 3.1 document"),
                    database=False)
async def openapi_json(request: web.Request) -> web.Response:
    """Served without authentication, as OpenRouter and Lumenfall publish theirs."""
    rendered = request.app[RENDERED]
    if rendered.text is None:
        rendered.text = dumps(document(request.app))
    return web.Response(text=rendered.text, content_type="application/json")


async def _check(app: web.Application) -> None:
    """At start, when every route (sub-apps' too) is registered: a route without a contract stops the start here
    rather than at the first request for the document (a walk of the routes, no schema built)."""
    check_declared(app)


def add_routes(app: web.Application) -> None:
    app[RENDERED] = _Rendered()
    app.router.add_get("/openapi.json", openapi_json)
    app.on_startup.insert(0, _check)  # before the cleanup contexts open anything a refused start would leave open
