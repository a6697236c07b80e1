"""Schemathesis against a live gateway: every operation of /openapi.json, with inputs generated from the document
(valid ones and, where the document allows it, invalid ones), sent over a real socket to a gateway on the test
database whose upstreams are the fakes. Every answer must be no 5xx, have a documented status, content type and
required headers, and conform to the documented schema.

Half the generated cases have their path ids replaced with ids that exist (an account, a key, a request record, a
video, a conversation, a webhook endpoint), so the handlers past the lookup are reached too. The credentials are
valid (the admin token, a funded key with Detailed Logging), so calls reach past authentication; the account whose
ids are offered is not the caller's, so the generated top-ups, adjustments and revocations cannot starve the
caller. Hypothesis runs derandomized (the same cases every run), a few examples per operation and mode, without
shrinking, so the whole run stays within tens of seconds.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import aiohttp
import asyncpg
import hypothesis
import pytest
import requests
import schemathesis
from aiohttp.test_utils import TestServer
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.app import create_app
from gateway.settings import Settings
from tests.chat_support import MODEL, UPSTREAM_KEY, UPSTREAM_KEY_ENV, point_at
from tests.conftest import ADMIN_TOKEN
from tests.factories import make_account, make_customer, make_key
from tests.fakes.media_upstream import media_settings
from tests.fakes.stripe import stripe_on, with_stripe
from tests.outage import StoppablePostgres
from tests.serving import running

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
EXAMPLES = 6  # per operation and generation mode
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
# Operations no generated case may get a 2xx from: an object deleted by the first of its deletions (under /admin)
# is not found by the others, and a key's settings are strict integers, which generated JSON rarely gives.
MAY_NEVER_SUCCEED = {
    *(f"DELETE {prefix}/{kind}" for prefix in ("/v1", "/openai/v1")
      for kind in ("conversations/{conversation_id}", "memories/{memory_id}", "webhooks/{endpoint_id}")),
    "PATCH /admin/keys/{key_id}",
    "POST /webhooks/stripe",  # only Stripe's signature (made with the endpoint secret) gets past the check
    # a rule needs whole cents within the [stripe] bounds (settings, not in the document) and a payment method
    "PUT /v1/billing/auto-topup", "PUT /admin/accounts/{account_id}/auto-topup",
}
SETTINGS = hypothesis.settings(
    max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, print_blob=False,
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    suppress_health_check=list(hypothesis.HealthCheck),
)


async def _known_ids(base: str, pool: asyncpg.Pool, account_id: str, secret: str) -> dict[str, str]:
    """Ids that exist, made through the API as a client makes them (and an account of the test's own)."""
    other = await make_account(pool, balance_micros=1_000_000, name="someone else")
    known = {"account_id": other, "model_id": MODEL}
    await make_key(pool, other)
    key = await pool.fetchval("SELECT id FROM api_keys WHERE account_id = $1", other)
    known["key_id"] = key
    auth = {"Authorization": f"Bearer {secret}"}
    async with aiohttp.ClientSession(headers=auth) as http:
        async with http.post(f"{base}/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hello"}], "memory": True}) as resp:
            assert resp.status == 200, await resp.text()
            known["request_id"] = resp.headers["X-Request-Id"]
            known["conversation_id"] = (await resp.json())["conversation_id"]
        async with http.post(f"{base}/v1/videos", json={"model": "sora-2", "prompt": "a capybara"}) as resp:
            assert resp.status == 202, await resp.text()
            known["video_id"] = (await resp.json())["id"]
        for _ in range(2):  # the fake media upstream completes a job on its second poll
            async with http.get(f"{base}/v1/videos/{known['video_id']}") as resp:
                status = (await resp.json())["status"]
        assert status == "completed"
        async with http.post(f"{base}/v1/webhooks", json={"url": "https://hooks.example.com/m",
                                                          "events": ["*"]}) as resp:
            assert resp.status == 201, await resp.text()
            known["endpoint_id"] = (await resp.json())["id"]
        async with http.post(f"{base}/admin/accounts/{account_id}/topups", json={"amount_micros": 5},
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Idempotency-Key": "fuzz"}) as resp:
            assert resp.status == 201, await resp.text()
    known["event_id"] = await pool.fetchval("SELECT id FROM webhook_events WHERE type = 'topup.posted'")
    known["memory_id"] = str(await pool.fetchval("SELECT id FROM memories"))
    assert known["event_id"] and known["memory_id"] != "None", known
    return known


def _with_known_ids(known: dict[str, str]) -> Callable[[tuple[schemathesis.Case, bool]], schemathesis.Case]:
    def fill(drawn: tuple[schemathesis.Case, bool]) -> schemathesis.Case:
        case, use_known = drawn
        if not use_known:
            return case
        for name in list(case.path_parameters or {}):
            if name in known:
                case.path_parameters[name] = known[name]
        if case.path.endswith("/chat/completions") and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = known["model_id"]  # any string is a model id by the schema; few are priced
        return case

    return fill


def _checker(strategy: st.SearchStrategy[schemathesis.Case], *, base: str, session: requests.Session,
             headers: dict[str, str], statuses: Counter[int]) -> Callable[[], None]:
    """The Hypothesis test of one operation in one mode: call the live server, count the status, check it."""

    @SETTINGS
    @hypothesis.given(case=strategy)
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=base, session=session, headers=headers, timeout=60)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS, headers=headers)

    return check


def _fuzz(base: str, secret: str, known: dict[str, str]) -> tuple[dict[str, Counter[int]], list[str]]:
    """Run every operation in every mode; returns the statuses each operation answered, and the failures."""
    document = requests.get(f"{base}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(document)
    credentials = {"adminToken": f"Bearer {ADMIN_TOKEN}", "customerKey": f"Bearer {secret}"}
    failures: list[str] = []
    answered: dict[str, Counter[int]] = {}
    with requests.Session() as session:
        # Deletions last, so the objects whose ids are offered exist for every other operation; a memory before
        # the conversations (deleting one takes its memories with it).
        operations = sorted((result.ok() for result in schema.get_all_operations()),
                            key=lambda op: (op.method.upper() == "DELETE", "conversations" in op.path, op.label))
        for operation in operations:
            statuses = answered.setdefault(operation.label, Counter())
            declared = document["paths"][operation.path][operation.method.lower()]
            security = [name for requirement in declared["security"] for name in requirement]
            headers = {"Authorization": credentials[security[0]]} if security else {}
            for mode in MODES:
                strategy = st.tuples(operation.as_strategy(generation_mode=mode), st.booleans()).map(
                    _with_known_ids(known))

                try:
                    _checker(strategy, base=base, session=session, headers=headers, statuses=statuses)()
                except hypothesis.errors.Unsatisfiable:
                    continue  # nothing to make invalid (no parameters, no body): the positive run covers it
                except (Exception, FailureGroup) as exc:  # collected, so one run reports every operation's
                    failures.append(f"{operation.label} ({mode.value}): {exc}"[:3000])
    return answered, failures


@pytest.mark.timeout(300)
async def test_every_operation_holds_to_the_document_under_generated_input(
        settings: Settings, openrouter_server: TestServer, server: TestServer, stripe_server: TestServer,
        pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    monkeypatch.setenv("MEDIA_API_KEY", "media-key")
    stripe_on(monkeypatch)
    app = create_app(with_stripe(media_settings(point_at(settings, openrouter_server), server), stripe_server))
    account_id, secret = await make_customer(pool, balance_micros=1_000_000_000, detailed_logging=True)
    async with running(app, handler_cancellation=False) as base:
        known = await _known_ids(base, pool, account_id, secret)
        answered, failures = await asyncio.to_thread(_fuzz, base, secret, known)
        document = (await asyncio.to_thread(requests.get, f"{base}/openapi.json", timeout=30)).json()
    assert failures == [], "\n\n".join(failures)
    # Every operation was called, and each reached past validation at least once (a 2xx), bar the few named above.
    assert len(answered) == sum(len(item) for item in document["paths"].values()) >= 76
    assert all(statuses for statuses in answered.values())
    never_succeeded = {label for label, statuses in answered.items() if not any(200 <= s < 300 for s in statuses)}
    assert never_succeeded <= MAY_NEVER_SUCCEED, repr({label: dict(answered[label]) for label in never_succeeded})


async def test_a_database_outage_answers_as_documented(
        settings: Settings, stoppable_postgres: StoppablePostgres, outage_pool: asyncpg.Pool) -> None:
    """The outage answers generated input cannot provoke, checked by the same checks (but the one refusing every
    5xx: these are the documented ones): a consumer call's 503 SERVICE_UNAVAILABLE with Retry-After, and
    readiness's own 503."""
    app = create_app(settings.model_copy(update={"database_url": stoppable_postgres.url}))
    _, secret = await make_customer(outage_pool, balance_micros=1_000)
    async with running(app, handler_cancellation=False) as base:
        document = (await asyncio.to_thread(requests.get, f"{base}/openapi.json", timeout=30)).json()
        await stoppable_postgres.stopped()

        def call(path: str, headers: dict[str, str]) -> tuple[int, str | None, str]:
            case = schemathesis.openapi.from_dict(document)[path]["GET"].Case(headers=headers)
            response = case.call(base_url=base, headers=headers, timeout=60)
            case.validate_response(response, checks=[c for c in CHECKS if c is not not_a_server_error],
                                   headers=headers)
            return response.status_code, (response.headers.get("retry-after") or [None])[0], response.text

        balance = await asyncio.to_thread(call, "/v1/balance", {"Authorization": f"Bearer {secret}"})
        ready = await asyncio.to_thread(call, "/readyz", {})
    assert balance[:2] == (503, "2") and '"code":"SERVICE_UNAVAILABLE"' in balance[2]
    assert ready[:2] == (503, None) and '"database":"unavailable"' in ready[2]
