"""The demo's simulated upstream (gateway.simulator): its usage is a rule of the request, the same streamed or not,
its catalog prices parse as the gateway reads OpenRouter's, every answer names it, it answers only to its key, and
nothing but the demo starts it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from fractions import Fraction
from typing import Any

from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.catalog import remote_entry
from billing.pricing import TokenPrices
from gateway import simulator
from tests.conftest import ROOT

KEY = "simulator-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}

texts = st.text(st.characters(codec="utf-8"), max_size=200)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                           "content": texts}), min_size=1, max_size=6)


def _bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


@settings(deadline=None)
@given(messages, st.integers(1, 4), st.one_of(st.none(), st.integers(0, 80)))
def test_usage_is_the_documented_rule_of_the_request(msgs: list[dict[str, str]], n: int, limit: int | None) -> None:
    body: dict[str, Any] = {"model": simulator.CHAT_MODEL, "messages": msgs, "n": n}
    if limit is not None:
        body["max_tokens"] = limit
    usage = simulator.usage(body)
    text, finish, _ = simulator.completion(body)
    assert usage["prompt_tokens"] == sum(3 + math.ceil(_bytes(m["content"]) / 4) for m in msgs) + 3
    assert usage["completion_tokens"] == n * math.ceil(len(text) / 4)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # The reply is the fixed sentence, cut to the output limit (4 bytes a token) only when it is longer.
    whole = simulator.reply_text(msgs)
    assert whole.isascii() and "Meterline's simulator" in whole
    assert (text, finish) == ((whole, "stop") if limit is None or math.ceil(len(whole) / 4) <= limit
                              else (whole[: limit * 4], "length"))
    if limit is not None:
        assert usage["completion_tokens"] <= n * limit
    # The cost it reports is its own published price of that usage, exactly ($3 and $15 per million tokens).
    micros = usage["prompt_tokens"] * 3 + usage["completion_tokens"] * 15
    assert Fraction(str(usage["cost"])) == Fraction(micros, 1_000_000)
    assert simulator.usage(body) == usage  # deterministic


@given(st.text(max_size=300), st.integers(1, 10))
def test_stream_pieces_are_the_whole_text_in_order(text: str, count: int) -> None:
    parts = simulator.pieces(text, count)
    assert "".join(parts) == text and 1 <= len(parts) <= count


def test_the_smaller_of_two_output_limits_is_the_one_obeyed() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "max_completion_tokens": 3}
    assert simulator.completion(body)[1:] == ("length", 3)
    text_parts = [{"type": "text", "text": "one two"}, {"type": "image_url", "image_url": {"url": "x"}}]
    assert simulator.prompt_tokens([{"role": "user", "content": text_parts}]) == 3 + 2 + 3


def test_its_catalog_prices_parse_as_an_openrouter_catalog() -> None:
    (item,) = simulator.catalog()["data"]
    entry = remote_entry(item, upstream="simulator", markup=0)  # type: ignore[arg-type]
    assert entry is not None
    assert (entry.id, entry.prices, entry.max_output_tokens) == (
        simulator.CHAT_MODEL, TokenPrices(Fraction(3_000_000), Fraction(15_000_000), None), 4_096)


async def _client(aiohttp_client: Any) -> TestClient:
    return await aiohttp_client(simulator.Simulator(KEY).app())  # type: ignore[no-any-return]


async def test_it_answers_only_to_its_key_and_stamps_every_response(aiohttp_client: Any) -> None:
    client = await _client(aiohttp_client)
    for headers in ({}, {"Authorization": "Bearer not-the-key"}):
        resp = await client.get("/v1/models", headers=headers)
        assert (resp.status, (await resp.json())["error"]["type"]) == (401, "authentication_error")
        assert resp.headers[simulator.HEADER] == "true"
    resp = await client.get("/v1/models", headers=AUTH)
    assert (resp.status, resp.headers[simulator.HEADER]) == (200, "true")


async def test_a_streamed_answer_is_the_plain_answer_in_pieces_with_the_same_usage(aiohttp_client: Any) -> None:
    client = await _client(aiohttp_client)
    body = {"model": simulator.CHAT_MODEL, "messages": [{"role": "user", "content": "Say hello"}], "n": 2}
    plain = await (await client.post("/v1/chat/completions", json=body, headers=AUTH)).json()
    assert plain["provider"] == simulator.PROVIDER and len(plain["choices"]) == 2
    assert {k: plain["usage"][k] for k in ("prompt_tokens", "completion_tokens")} == {
        "prompt_tokens": 9, "completion_tokens": 2 * 49}
    resp = await client.post("/v1/chat/completions", headers=AUTH,
                             json={**body, "stream": True, "stream_options": {"include_usage": True}})
    events = [line[6:] for line in (await resp.text()).splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["provider"] == simulator.PROVIDER for c in chunks)
    for index in (0, 1):
        streamed = "".join(choice["delta"]["content"] for c in chunks for choice in c["choices"]
                           if choice["index"] == index)
        assert streamed == plain["choices"][index]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    # Without include_usage, no usage chunk (the gateway always asks for it).
    resp = await client.post("/v1/chat/completions", headers=AUTH, json={**body, "stream": True})
    assert '"usage"' not in await resp.text()


async def test_images_and_a_video_job_name_the_simulator(aiohttp_client: Any) -> None:
    client = await _client(aiohttp_client)
    images = await (await client.post("/v1/images/generations", headers=AUTH,
                                      json={"model": simulator.IMAGE_MODEL, "prompt": "a cat", "n": 3})).json()
    assert images["provider"] == simulator.PROVIDER and len(images["data"]) == 3
    assert images["data"][0]["revised_prompt"] == "[Meterline simulator] a stand-in for: a cat"
    video = await (await client.post("/v1/videos", headers=AUTH, json={
        "model": simulator.VIDEO_MODEL, "prompt": "a lighthouse", "size": "1280x720", "seconds": "8"})).json()
    assert (video["status"], video["provider"]) == ("queued", simulator.PROVIDER)
    early = await client.get(f"/v1/videos/{video['id']}/content", headers=AUTH)
    assert early.status == 404
    polled = [(await (await client.get(f"/v1/videos/{video['id']}", headers=AUTH)).json())["status"]
              for _ in range(3)]
    assert polled == ["in_progress", "completed", "completed"]
    content = await client.get(f"/v1/videos/{video['id']}/content", headers=AUTH)
    assert await content.text() == ("Meterline simulator: no video was made; this stands in for a video of 8 seconds "
                                    "at 1280x720, of: a lighthouse\n")
    # A job of an earlier run (this simulator never saw it) has finished; an id it never made is unknown.
    earlier = await client.get("/v1/videos/sim_video_00000000000000ff", headers=AUTH)
    assert (await earlier.json())["status"] == "completed"
    assert (await client.get("/v1/videos/video_unknown", headers=AUTH)).status == 404


def test_nothing_but_the_demo_starts_the_simulator() -> None:
    """`meterline serve` (the app, the CLI, the settings) never imports it, so cannot wire it in."""
    code = ("import sys, gateway.app, gateway.cli, gateway.settings; "
            "print(sorted(m for m in sys.modules if m in ('gateway.simulator', 'gateway.demo')))")
    ran = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True)
    assert ran.stdout.strip() == "[]"
