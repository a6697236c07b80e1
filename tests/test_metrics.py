"""Prometheus metrics (issue 14): after a known sequence of calls every counter equals the known count and micros
exactly; /metrics asks for the admin token on the API's port and not on its own listener; labels never carry a
key, an account or a raw path; and under `serve --workers 2` the figures of both processes add up."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from billing import keys, ledger, limits
from gateway import metrics
from gateway.app import create_app
from gateway.settings import Settings
from gateway.tasks import sweep_expired_holds
from tests.chat_support import MESSAGES, MODEL, UPSTREAM_KEY, cost
from tests.conftest import ADMIN_TOKEN, admin_headers
from tests.factories import make_account, make_customer, request_id
from tests.fakes.media_upstream import UPSTREAM_KEY as MEDIA_KEY
from tests.fakes.media_upstream import MediaUpstream, media_settings
from tests.fakes.upstream import FakeUpstream
from tests.metrics_support import Samples, parse, value
from tests.serving import ROOT, free_port, meterline_serve


async def scrape(client: TestClient) -> tuple[str, Samples]:
    resp = await client.get("/metrics", headers=admin_headers())
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "text/plain"
    text = await resp.text()
    return text, parse(text)


def label_values(samples: Iterable[tuple[str, frozenset[tuple[str, str]]]]) -> set[str]:
    return {v for _, labels in samples for _, v in labels}


def chat(client: TestClient, secret: str, **extra: Any) -> Any:
    return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                       json={"model": MODEL, "messages": MESSAGES, **extra})


async def test_counters_equal_a_known_sequence_of_calls_exactly(
        chat_client: TestClient, openrouter: FakeUpstream, pool: asyncpg.Pool) -> None:
    account_id, secret = await make_customer(pool, balance_micros=10_000_000)
    _, broke = await make_customer(pool, balance_micros=0)
    limited_account = await make_account(pool, balance_micros=1_000)
    row, limited = await keys.create_key(pool, account_id=limited_account, name="rated")
    await limits.set_key_limits(pool, row["id"], {"rpm_limit": 1, "rpd_limit": 1})

    for _ in range(2):  # two billed calls of known usage (12 prompt, 5 completion tokens)
        resp = await chat(chat_client, secret)
        assert resp.status == 200 and resp.headers["X-Cost-Micros"] == str(cost(12, 5))
    assert (await chat(chat_client, broke)).status == 402
    openrouter.status = 500
    assert (await chat(chat_client, secret)).status == 502  # its hold is voided
    openrouter.status = 429
    assert (await chat(chat_client, secret)).status == 429  # the upstream's refusal; voided too
    openrouter.status = None
    for expected in (200, 429):
        resp = await chat_client.get("/v1/balance", headers={"Authorization": f"Bearer {limited}"})
        assert resp.status == expected
    for _ in range(2):  # one top-up, and its replay (counted once)
        resp = await chat_client.post(f"/admin/accounts/{account_id}/topups", json={"amount_usd": "1.25"},
                                      headers=admin_headers(**{"Idempotency-Key": "metrics-topup-1"}))
        assert resp.status == 201
    assert (await chat_client.get("/v1/models/no/such-model", headers={"Authorization": f"Bearer {secret}"}
                                  )).status == 404
    assert (await chat_client.get(f"/v1/nowhere/{secret}")).status == 404

    text, samples = await scrape(chat_client)
    held = await pool.fetchval("SELECT sum(amount_micros) FROM holds WHERE account_id = $1", account_id)
    chat_route = {"route": "/v1/chat/completions", "method": "POST"}
    assert value(samples, "meterline_requests_total", **chat_route, status="200", model=MODEL) == 2
    assert value(samples, "meterline_requests_total", **chat_route, status="402", model=MODEL) == 1
    assert value(samples, "meterline_requests_total", **chat_route, status="502", model=MODEL) == 1
    assert value(samples, "meterline_requests_total", **chat_route, status="429", model=MODEL) == 1
    assert value(samples, "meterline_requests_total", route="/admin/accounts/{account_id}/topups", method="POST",
                 status="201", model="") == 2
    assert value(samples, "meterline_requests_total", route="/v1/balance", method="GET", status="429",
                 model="") == 1
    # An unknown model is no label: the route's template, and no model.
    assert value(samples, "meterline_requests_total", route="/v1/models/{model_id}", method="GET", status="404",
                 model="") == 1
    assert value(samples, "meterline_requests_total", route="unmatched", method="GET", status="404", model="") == 1
    assert value(samples, "meterline_request_duration_seconds_count", route="/v1/chat/completions") == 5
    assert value(samples, "meterline_upstream_duration_seconds_count", upstream="openrouter") == 4

    assert value(samples, "meterline_holds_total", event="reserved") == 4
    assert value(samples, "meterline_holds_total", event="settled") == 2
    assert value(samples, "meterline_holds_total", event="voided") == 2
    assert value(samples, "meterline_charged_micros_total") == 2 * cost(12, 5)
    assert value(samples, "meterline_held_micros_total") == held
    assert value(samples, "meterline_topped_up_micros_total") == 1_250_000

    assert value(samples, "meterline_refusals_total", status="402", reason="insufficient_balance") == 1
    assert value(samples, "meterline_refusals_total", status="429", reason="key_rate_limited") == 1
    assert value(samples, "meterline_refusals_total", status="429", reason="upstream_rate_limited") == 1
    assert value(samples, "meterline_upstream_errors_total", upstream="openrouter", kind="error_status") == 1
    assert value(samples, "meterline_upstream_errors_total", upstream="openrouter", kind="rate_limited") == 1
    # Five reservations (the refused one too) and two settlements went through the group commit.
    assert value(samples, "meterline_ledger_batch_size_sum", kind="reserve") == 5
    assert value(samples, "meterline_ledger_batch_size_sum", kind="settle") == 2
    assert value(samples, "meterline_ledger_batch_commit_seconds_count", kind="settle") == value(
        samples, "meterline_ledger_batch_size_count", kind="settle")
    assert value(samples, "meterline_processes") == 1
    assert value(samples, "meterline_db_pool_waiting") == 0
    assert value(samples, "meterline_catalog_age_seconds") == 0  # the tests' catalog is local only

    labels = label_values(samples)
    for secret_or_id in (secret, broke, limited, UPSTREAM_KEY, ADMIN_TOKEN, account_id, limited_account):
        assert secret_or_id not in text
    assert not any("nowhere" in label or "such-model" in label for label in labels)


async def test_the_hold_backlog_and_expiries_come_from_postgresql(
        aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool) -> None:
    """A hold left pending past its expiry is counted while no sweeper has run; once swept it counts as expired,
    and as expired unsettled, with no charge."""
    client: TestClient = await aiohttp_client(create_app(settings.model_copy(
        update={"sweep_interval_seconds": 3600})))  # the test sweeps, once
    account_id = await make_account(pool, balance_micros=5_000)
    for _ in range(2):
        await ledger.reserve(pool, request_id=request_id(), account_id=account_id, amount_micros=1_000,
                             ttl_seconds=0.001)
    for _ in range(200):  # until the database clock has passed both expiries (a bound, not a timing assertion)
        if await pool.fetchval("SELECT bool_and(expires_at < now()) FROM holds WHERE account_id = $1", account_id):
            break
    _, before = await scrape(client)
    assert value(before, "meterline_holds_pending_past_expiry") == 2
    assert value(before, "meterline_holds_expired_unsettled") == 0

    await sweep_expired_holds(client.app)
    _, after = await scrape(client)
    assert value(after, "meterline_holds_total", event="expired") == 2
    assert value(after, "meterline_holds_pending_past_expiry") == 0
    assert value(after, "meterline_holds_expired_unsettled") == 2
    assert value(after, "meterline_charged_micros_total") == 0


@pytest.mark.parametrize("authorization", [None, "Bearer not-the-admin-token", f"Basic {ADMIN_TOKEN}"],
                         ids=["missing", "wrong", "not-bearer"])
async def test_metrics_on_the_api_port_are_refused_without_the_admin_token_as_admin_is(
        client: TestClient, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    refused = await client.get("/metrics", headers=headers)
    admin = await client.get("/admin/accounts", headers=headers)
    assert refused.status == admin.status == 401
    body = await refused.json()
    assert body == await admin.json()
    assert body["error"]["code"] == "AUTHENTICATION_FAILED"
    assert "meterline_" not in json.dumps(body)


async def test_the_metrics_listener_answers_without_a_token(aiohttp_client: Any, client: TestClient) -> None:
    assert (await client.get("/healthz")).status == 200
    listener: TestClient = await aiohttp_client(metrics.listener_app(client.app))
    resp = await listener.get("/metrics")
    assert resp.status == 200
    samples = parse(await resp.text())
    assert value(samples, "meterline_requests_total", route="/healthz", method="GET", status="200", model="") == 1
    assert (await listener.get("/admin/accounts", headers=admin_headers())).status == 404  # only /metrics there


async def test_a_stream_is_counted_with_its_charge(chat_client: TestClient, pool: asyncpg.Pool) -> None:
    _, secret = await make_customer(pool, balance_micros=10_000_000)
    resp = await chat(chat_client, secret, stream=True, stream_options={"include_usage": True})
    assert resp.status == 200
    await resp.read()
    _, samples = await scrape(chat_client)
    assert value(samples, "meterline_requests_total", route="/v1/chat/completions", method="POST", status="200",
                 model=MODEL) == 1
    assert value(samples, "meterline_charged_micros_total") == cost(12, 5)
    assert value(samples, "meterline_holds_total", event="settled") == 1


def test_metrics_port_must_not_be_the_api_port(settings: Settings) -> None:
    with pytest.raises(ValueError, match="metrics_port"):
        Settings(**{**settings.model_dump(), "metrics_port": settings.port})


async def test_workers_add_up_their_figures(database_url: str, tmp_path: Path) -> None:
    """Two worker processes: the requests both served sum to the number sent, whichever worker answers the scrape
    (on the API's port with the token, or on the metrics listener without), and the processes gauge shows both.
    A stale file from an earlier run in the operator's directory is cleared before the workers start, and a
    stopped worker's live gauges are dropped."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    (directory / "counter_999999.db").write_bytes(b"not a metrics file")
    metrics_port = free_port()
    env = {"METERLINE_DATABASE_URL": database_url, "METERLINE_ADMIN_TOKEN": ADMIN_TOKEN,
           "METERLINE_REMOTE_CATALOG": "false", "METERLINE_METRICS_PORT": str(metrics_port),
           "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    async with meterline_serve(env, "--workers", "2") as (base, proc):
        async with aiohttp.ClientSession() as http:
            for _ in range(600):  # until the second worker is serving too (a bound on start-up, not a timing test)
                async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                    if value(parse(await resp.text()), "meterline_processes") == 2:
                        break
                await asyncio.sleep(0.05)
        for _ in range(20):
            async with aiohttp.ClientSession() as fresh, fresh.get(f"{base}/healthz") as resp:
                assert resp.status == 200
        scrapes = []
        for _ in range(4):  # fresh connections: the kernel spreads them over both workers
            async with aiohttp.ClientSession() as fresh:
                async with fresh.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                    assert resp.status == 200
                    scrapes.append(parse(await resp.text()))
                async with fresh.get(f"{base}/metrics", headers=admin_headers()) as resp:
                    assert resp.status == 200
                    scrapes.append(parse(await resp.text()))
                async with fresh.get(f"{base}/metrics") as resp:
                    assert resp.status == 401
        for samples in scrapes:
            assert value(samples, "meterline_requests_total", route="/healthz", method="GET", status="200",
                         model="") == 20
            assert value(samples, "meterline_processes") == 2
    assert proc.returncode == 0
    assert not (directory / "counter_999999.db").exists()
    assert len(list(directory.glob("counter_*.db"))) == 2  # each worker's counters outlive it
    assert list(directory.glob("gauge_live*.db")) == []


async def test_video_holds_are_counted_once_whoever_resolves_them(
        aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool, server: TestServer, fake: MediaUpstream,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A job the background poller completes is a settlement of its price; a job the upstream refuses is a void;
    an Idempotency-Key replay made no hold and is no reservation."""
    monkeypatch.setenv("MEDIA_API_KEY", MEDIA_KEY)
    client: TestClient = await aiohttp_client(create_app(media_settings(settings, server, video_poll_seconds=0.02)))
    _, secret = await make_customer(pool, balance_micros=20_000_000)
    headers = {"Authorization": f"Bearer {secret}", "Idempotency-Key": "metrics-video-1"}
    for _ in range(2):  # the second is a replay of the first
        resp = await client.post("/v1/videos", json={"model": "sora-2", "prompt": "a capybara", "seconds": "4"},
                                 headers=headers)
        assert resp.status == 202
    for _ in range(1500):  # until the poller has completed it (a bound, not a timing assertion)
        if await pool.fetchval("SELECT status FROM videos") == "completed":
            break
        await asyncio.sleep(0.02)
    fake.status = 500
    resp = await client.post("/v1/videos", json={"model": "sora-2", "prompt": "x", "seconds": "4"},
                             headers={"Authorization": f"Bearer {secret}"})
    assert resp.status == 502
    _, samples = await scrape(client)
    assert value(samples, "meterline_holds_total", event="reserved") == 2
    assert value(samples, "meterline_holds_total", event="settled") == 1
    assert value(samples, "meterline_holds_total", event="voided") == 1
    assert value(samples, "meterline_charged_micros_total") == 4 * 100_000  # sora-2 at 720x1280, per second
    assert value(samples, "meterline_held_micros_total") == 2 * 4 * 100_000
    assert value(samples, "meterline_requests_total", route="/v1/videos", method="POST", status="202",
                 model="sora-2") == 2


def test_the_grafana_dashboard_reads_only_metrics_that_exist() -> None:
    """docs/grafana/meterline.json: a dashboard with a Prometheus datasource variable, every panel on it, and every
    query naming only series Meterline exports (a renamed metric fails here)."""
    dashboard = json.loads((ROOT / "docs" / "grafana" / "meterline.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    exported: set[str] = set()
    for family in text_string_to_metric_families(metrics.Metrics().exposition().decode()):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}[family.type]
        exported.update(family.name + suffix for suffix in suffixes)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    named: set[str] = set()
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\bmeterline_[a-z_]+", target["expr"]))
            assert used and used <= exported, (panel["title"], used - exported)
            named |= used
    # Every figure the issue lists has a panel.
    for needed in ("meterline_requests_total", "meterline_request_duration_seconds_bucket",
                   "meterline_upstream_duration_seconds_bucket", "meterline_holds_total",
                   "meterline_charged_micros_total", "meterline_held_micros_total", "meterline_topped_up_micros_total",
                   "meterline_refusals_total", "meterline_ledger_batch_size_sum",
                   "meterline_ledger_batch_commit_seconds_bucket", "meterline_db_pool_in_use",
                   "meterline_db_pool_waiting", "meterline_upstream_errors_total", "meterline_catalog_age_seconds",
                   "meterline_stream_drains_total", "meterline_webhook_deliveries_total",
                   "meterline_holds_pending_past_expiry", "meterline_holds_expired_unsettled"):
        assert needed in named, needed


def test_a_figure_that_cannot_be_recorded_never_fails_the_step_that_reported_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """Multiprocess mode writes figures to files that grow; on a full disk that raises OSError. The hold (or the
    request) that reported the figure goes on, and the loss is said once."""

    class FullDisk(metrics.Metrics):
        @metrics._guarded
        def expired(self, count: int) -> None:
            raise OSError(28, "No space left on device")

    figures = FullDisk()
    figures.expired(3)
    figures.expired(4)
    assert figures.failing
    warnings = [r for r in caplog.records if r.name == "meterline.metrics"]
    assert len(warnings) == 1 and "No space left on device" in warnings[0].getMessage()


async def test_the_exposition_has_no_created_series(client: TestClient) -> None:
    """One process exports the series N processes do (multiprocess mode has no `_created` series)."""
    assert (await client.get("/healthz")).status == 200
    text, samples = await scrape(client)
    assert "_created" not in text
    assert value(samples, "meterline_requests_total", route="/healthz", method="GET", status="200", model="") == 1
