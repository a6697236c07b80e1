"""The OpenAPI document: served without credentials at /openapi.json, listing exactly the routes the server serves
(each with its declared contract), with security that matches what each route really demands, and request body
schemas that agree with the handlers' own validation. tests/test_contract_fuzz.py runs schemathesis against it."""

from __future__ import annotations

from typing import Any

import asyncpg
import jsonschema_rs
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_urldispatcher import PrefixedSubAppResource

from gateway import chat_request
from gateway.app import create_app
from gateway.chat_request import REFUSED, body_schema, parse_chat
from gateway.contract import Answer, operation
from gateway.errors import ApiError
from gateway.openapi import document
from gateway.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.factories import make_customer

METHODS = ("get", "post", "put", "patch", "delete")


def served(app: web.Application, prefix: str = "") -> set[tuple[str, str]]:
    """Every (method, path) the app answers, walked from its router here (not through gateway.openapi), except
    HEAD (aiohttp's mirror of GET) and the browser console."""
    found: set[tuple[str, str]] = set()
    for resource in app.router.resources():
        if isinstance(resource, PrefixedSubAppResource):
            info = resource.get_info()
            if info["prefix"] != "/console":
                found |= served(info["app"])
            continue
        for route in resource:
            if route.method != "HEAD":
                path = resource.canonical.replace("{model_id:.+}", "{model_id}")
                found.add((route.method.lower(), path))
    return found


def listed(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method, path) for path, item in doc["paths"].items() for method in item if method in METHODS}


async def test_the_document_is_served_without_credentials_and_lists_exactly_the_served_routes(
        client: TestClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    doc = await response.json()
    assert doc["openapi"] == "3.1.0"
    app = client.app
    assert app is not None
    routes = served(app)
    assert listed(doc) == routes
    # Every consumer route under both prefixes, the admin API, health and this document; no console page.
    assert ("post", "/v1/chat/completions") in routes and ("post", "/openai/v1/chat/completions") in routes
    assert {("get", "/healthz"), ("get", "/readyz"), ("get", "/openapi.json"), ("get", "/metrics"),
            ("post", "/admin/accounts")} <= routes
    assert not any(path.startswith("/console") for _, path in routes)
    assert len(routes) == 88
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids)) == 88


async def test_a_route_without_a_contract_stops_the_document_and_the_start(
        settings: Settings, pool: asyncpg.Pool) -> None:
    def app_with_undeclared_route() -> web.Application:
        app = create_app(settings)

        async def undeclared(request: web.Request) -> web.Response:
            return web.Response()

        app.router.add_get("/v1/undeclared", undeclared)
        return app

    with pytest.raises(LookupError, match=r"routes without a contract .*: GET /v1/undeclared$"):
        document(app_with_undeclared_route())
    server = TestServer(app_with_undeclared_route())
    try:
        with pytest.raises(LookupError, match=r"GET /v1/undeclared$"):
            await server.start_server()
    finally:
        await server.close()


async def test_a_route_added_with_its_contract_is_documented_from_that_one_line(settings: Settings) -> None:
    """As /metrics would be: plain text, no database, a handler that checks the admin token itself."""
    app = create_app(settings)

    @operation("Prometheus metrics", answer=Answer(media=("text/plain",)), database=False, security="adminToken")
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="")

    app.router.add_get("/metrics", metrics)
    op = document(app)["paths"]["/metrics"]["get"]
    assert (op["operationId"], op["summary"], op["security"]) == ("get_metrics", "Prometheus metrics",
                                                                  [{"adminToken": []}])
    assert {status: list(r["content"]) for status, r in op["responses"].items()} == {
        "200": ["text/plain"], "400": ["application/json"], "401": ["application/json"]}


async def test_security_in_the_document_is_what_each_route_demands(client: TestClient) -> None:
    """Called with no credentials, every operation that names a security scheme answers 401, and no other does;
    admin routes name the admin token, consumer routes the customer key."""
    doc = await (await client.get("/openapi.json")).json()
    assert set(doc["components"]["securitySchemes"]) == {"customerKey", "adminToken"}
    secured: dict[str, int] = {"customerKey": 0, "adminToken": 0, "none": 0}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            url = path.replace("{model_id}", "some-model")
            for name in ("account_id", "key_id", "video_id", "request_id", "conversation_id", "memory_id",
                         "endpoint_id", "event_id"):
                url = url.replace("{" + name + "}", "x_1")
            url = url.replace("{kind}", "ledger")
            response = await client.request(method.upper(), url)
            body = await response.text()
            schemes = [name for requirement in op["security"] for name in requirement]
            if schemes:
                assert (response.status, "AUTHENTICATION_FAILED") == (401, (await response.json())["error"]["code"]), \
                    (method, path, body)
                assert "401" in op["responses"]
                if path.startswith(("/admin/", "/v1/", "/openai/v1/")):
                    assert schemes == ["adminToken" if path.startswith("/admin/") else "customerKey"], (method, path)
                secured[schemes[0]] += 1
            else:
                assert response.status != 401, (method, path, body)
                secured["none"] += 1
    assert secured == {"customerKey": 53, "adminToken": 31, "none": 4}


async def test_every_error_response_names_its_codes_and_a_retry_after_where_it_is_sent(
        client: TestClient) -> None:
    doc = await (await client.get("/openapi.json")).json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]

    def codes(response: dict[str, Any]) -> list[str]:
        schema = response["content"]["application/json"]["schema"]
        return list(schema["properties"]["error"]["properties"]["code"]["enum"])

    assert sorted(chat) == ["200", "400", "401", "402", "404", "413", "429", "502", "503"]
    assert codes(chat["402"]) == ["INSUFFICIENT_BALANCE", "KEY_LIMIT_EXCEEDED"]
    assert codes(chat["404"]) == ["MODEL_NOT_FOUND", "CONVERSATION_NOT_FOUND"]
    assert codes(chat["503"]) == ["SERVICE_UNAVAILABLE", "UPSTREAM_NOT_CONFIGURED"]
    assert set(chat["429"]["headers"]) == {"X-Request-Id", "Retry-After"}
    assert set(chat["503"]["headers"]) == {"X-Request-Id", "Retry-After"}
    # Required where every error of the status sends it: a key's 429 and an outage's 503 do; an upstream's 429
    # and a missing upstream's 503 (which chat may also answer) do not.
    balance = doc["paths"]["/v1/balance"]["get"]["responses"]
    assert [r["headers"]["Retry-After"]["required"] for r in (balance["429"], balance["503"])] == [True, True]
    assert [r["headers"]["Retry-After"]["required"] for r in (chat["429"], chat["503"])] == [False, False]
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    health = doc["paths"]["/healthz"]["get"]["responses"]
    assert sorted(health) == ["200", "400"]  # no credentials, no database: only a NUL in the query is refused
    ready = doc["paths"]["/readyz"]["get"]["responses"]
    assert ready["503"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Readiness"}
    topup = doc["paths"]["/admin/accounts/{account_id}/topups"]["post"]
    assert [p["required"] for p in topup["parameters"] if p["in"] == "header"] == [True]
    assert codes(topup["responses"]["422"]) == ["IDEMPOTENCY_CONFLICT"]
    assert topup["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Topup"}


CHAT_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("minimal", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    ("every-own-field", {"model": "m", "messages": [{"role": "system", "content": [{"type": "text", "text": "x"}]}],
                         "stream": True, "stream_options": {"include_usage": True}, "n": 2, "user": "u",
                         "max_tokens": 5, "max_completion_tokens": 7, "memory": False,
                         "conversation_id": "6f1c1c52-4e0b-4b43-9d43-b0f52c7e6e0f"}),
    ("forwarded-and-nulls", {"model": "m", "messages": [{"role": "user", "content": None}], "temperature": 0.5,
                             "stop": ["a"], "reasoning_effort": "low", "service_tier": "auto", "tools": [],
                             "seed": None, "n": None, "modalities": ["text"]}),
    ("no-model", {"messages": [{"role": "user", "content": "hi"}]}),
    ("blank-model", {"model": " ", "messages": [{"role": "user", "content": "hi"}]}),
    ("no-messages", {"model": "m", "messages": []}),
    ("bad-role", {"model": "m", "messages": [{"role": "robot", "content": "hi"}]}),
    ("audio-input", {"model": "m", "messages": [{"role": "user", "content": "hi", "audio": {}}]}),
    ("audio-part", {"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
    ("n-zero", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 0}),
    ("n-above-max", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 5}),
    ("user-too-long", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": "u" * 257}),
    ("bad-effort", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "max"}),
    ("bad-tier", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "service_tier": "flex"}),
    ("unknown-field", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}),
    ("bad-stream-option", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                           "stream_options": {"include_usage": True, "extra": True}}),
    ("string-temperature", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": "1"}),
    ("not-a-uuid", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "conversation_id": "abc"}),
    *((f"refused-{name}", {"model": "m", "messages": [{"role": "user", "content": "hi"}], name: []})
      for name in REFUSED),
]


@pytest.mark.parametrize("body", [b for _, b in CHAT_BODIES], ids=[name for name, _ in CHAT_BODIES])
def test_the_chat_schema_accepts_exactly_what_parse_chat_accepts(body: dict[str, Any]) -> None:
    """The schema is built from parse_chat's own rules: on each body, valid by the schema iff parse_chat takes it."""
    validator = jsonschema_rs.validator_for(body_schema(max_choices=4, models=[]))
    try:
        parse_chat(body, max_choices=4)
        accepted = True
    except ApiError as exc:
        assert exc.status == 400
        accepted = False
    assert validator.is_valid(body) is accepted


def test_the_chat_schema_lists_every_field_parse_chat_knows() -> None:
    schema = body_schema(max_choices=16, models=["m"])
    assert set(schema["properties"]) == {*chat_request._OWN, *chat_request._FORWARDED}
    assert schema["required"] == ["model", "messages"] and schema["additionalProperties"] is False
    assert schema["properties"]["n"]["anyOf"][0]["maximum"] == 16
    assert schema["properties"]["model"]["examples"] == ["m"]


# Answers a longer schemathesis run found undocumented, each now in the document: (id, method, path, body, who,
# status, code).
FOUND: list[tuple[str, str, str, dict[str, Any] | None, str, int, str]] = [
    ("line-break-in-a-model-id", "GET", "/v1/models/a%0Ab", None, "customer", 404, "NOT_FOUND"),
    ("slash-in-a-video-id", "GET", "/v1/videos/a%2Fb/content", None, "customer", 404, "NOT_FOUND"),
    ("adjustment-past-the-balance", "POST", "/admin/accounts/{account_id}/adjustments",
     {"amount_micros": -2_000_000, "reason": "refund"}, "admin", 402, "INSUFFICIENT_BALANCE"),
]


@pytest.mark.parametrize(("method", "path", "body", "who", "status", "code"), [case[1:] for case in FOUND],
                         ids=[case[0] for case in FOUND])
async def test_answers_found_by_fuzzing_are_documented(
        client: TestClient, pool: asyncpg.Pool, method: str, path: str, body: dict[str, Any] | None, who: str,
        status: int, code: str) -> None:
    account_id, secret = await make_customer(pool, balance_micros=1_000_000)
    token = ADMIN_TOKEN if who == "admin" else secret
    response = await client.request(method, path.replace("{account_id}", account_id), json=body,
                                    headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "k-1"})
    assert (response.status, (await response.json())["error"]["code"]) == (status, code)
    doc = await (await client.get("/openapi.json")).json()
    template = {"/v1/models/a%0Ab": "/v1/models/{model_id}",
                "/v1/videos/a%2Fb/content": "/v1/videos/{video_id}/content"}.get(path, path)
    documented = doc["paths"][template][method.lower()]["responses"][str(status)]
    assert code in documented["content"]["application/json"]["schema"]["properties"]["error"]["properties"]["code"][
        "enum"]
