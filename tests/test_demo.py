"""`meterline demo` (issue 14): one real demo process on a fresh data directory and its own embedded PostgreSQL.
The lines it prints are run as printed (bash, curl, the OpenAI SDK): a billed chat call charged to the micro, a
dryRun equal to the real call's hold, a 402, then the balance spent down to another 402, every answer naming the
simulator, and `meterline verify` passing on the demo's database. The demo account's making and finding again is
checked in process, against the test database."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from billing import keys
from gateway import demo
from gateway.settings import SettingsError, load_settings
from tests.conftest import ROOT
from tests.serving import free_port

BASH = shutil.which("bash") or "/bin/bash"
# The demo's example call, by the simulator's rule (gateway.simulator): "Say hello" is 9 bytes, so 3 + 3 tokens for
# the message and 3 for the reply's header; the reply is 195 bytes, 49 tokens. At 3 and 15 micros a token:
CHAT_COST = 9 * 3 + 49 * 15  # 762 micros
STARTING = 1_000_000


def printed_commands(output: str) -> list[str]:
    """The shell commands the demo printed, in order: each `curl` (with its continuation lines), the SDK snippet
    (a here-document) and each `meterline` line."""
    commands: list[str] = []
    lines = output.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("python - <<'EOF'"):
            end = lines.index("EOF", index)
            commands.append("\n".join(lines[index:end + 1]))
            index = end + 1
            continue
        if line.startswith("curl ") or re.match(r"(\S+=\S* )+meterline ", line):
            command = [line]
            while command[-1].endswith("\\"):
                index += 1
                command.append(lines[index])
            commands.append("\n".join(command))
        index += 1
    return commands


def shell(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BASH, "-c", command], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)


def _serve(port: int, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def answer(command: str, env: dict[str, str]) -> Any:
    ran = shell(command, env)
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout)


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


async def _wait_for(output: Path, proc: asyncio.subprocess.Process, marker: str) -> str:
    for _ in range(1800):  # a bound on start-up (pgserver initialises a data directory), not a timing test
        text = _read(output)
        if marker in text:
            return text
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.1)
    raise AssertionError(f"the demo did not print {marker!r}:\n{_read(output)[-3000:]}")


@pytest.mark.timeout(300)
async def test_the_demo_bills_a_call_answers_a_dry_run_refuses_with_402_and_verifies(
        tmp_path: Path, database_url: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "meterline").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m gateway.cli "$@"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for shim in bin_dir.iterdir():
        shim.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env = {**clean, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    data_dir = tmp_path / "data"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    output = tmp_path / "demo.log"
    with output.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "demo", "--host", "127.0.0.1", "--port", str(port), cwd=ROOT,
            env={**env, "METERLINE_DATA_DIR": str(data_dir)}, stdout=out, stderr=out)
    try:
        printed = await _wait_for(output, proc, "Stop the demo with Ctrl+C")
        chat_line, sdk, dry_line, refused_line, balance_line, requests_line, verify_line, topup_line = (
            printed_commands(printed))
        key = re.search(r"API key +(ml-\S+)", printed).group(1)  # type: ignore[union-attr]
        state = json.loads((data_dir / "demo" / demo.STATE_FILE).read_text())
        assert state["key"] == key and stat.S_IMODE((data_dir / "demo" / demo.STATE_FILE).stat().st_mode) == 0o600
        assert f"available 1.000000 USD ({STARTING} micros)" in printed

        # A billed call, as curl prints it: the simulator's fixed answer and usage, charged exactly.
        chat = answer(chat_line, env)
        assert chat["provider"] == "Meterline simulator"
        assert chat["choices"][0]["message"]["content"].startswith("This answer comes from Meterline's simulator")
        assert {k: chat["usage"][k] for k in ("prompt_tokens", "completion_tokens", "cost_micros")} == {
            "prompt_tokens": 9, "completion_tokens": 49, "cost_micros": CHAT_COST}
        # The same call through the OpenAI SDK snippet, as printed.
        sdk_run = shell(sdk, env)
        assert sdk_run.returncode == 0, sdk_run.stderr
        assert "Meterline's simulator" in sdk_run.stdout and "completion_tokens=49" in sdk_run.stdout
        # The dryRun: nothing is charged, and its total is exactly what each real call held.
        dry = answer(dry_line, env)
        assert (dry["estimated"], dry["provider"], dry["available_micros"]) == (True, "simulator",
                                                                                STARTING - 2 * CHAT_COST)
        assert [(r["model"], r["cost_micros"]) for r in answer(requests_line, env)["data"]] == [
            ("simulator/chat", CHAT_COST)] * 2
        admin = {"Authorization": "Bearer " + (data_dir / "demo" / "admin-token").read_text().strip()}
        async with (aiohttp.ClientSession(headers=admin) as http,
                    http.get(f"{base}/admin/exports/requests", params={
                        "from": "2000-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z", "format": "jsonl"}) as resp):
            exported = [json.loads(line) for line in (await resp.text()).splitlines()]
        assert [(r["upstream"], r["hold_micros"], r["cost_micros"], r["upstream_cost_micros"]) for r in exported] == [
            ("simulator", dry["total_cost_micros"], CHAT_COST, CHAT_COST)] * 2
        # The printed 402: a 12-second video costs more than the balance.
        refused = answer(refused_line, env)["error"]
        assert (refused["code"], refused["required_micros"], refused["available_micros"]) == (
            "INSUFFICIENT_BALANCE", 1_200_000, STARTING - 2 * CHAT_COST)

        left = await _spend_the_balance(base, key, STARTING - 2 * CHAT_COST)
        assert answer(balance_line, env)["available_micros"] == left == 37_714

        verified = shell(verify_line, env)
        assert verified.returncode == 0 and verified.stdout.startswith("ledger verified"), verified.stderr
        assert "meterline topup --account acct_" in topup_line

        # `meterline serve` on the port the demo holds says so in a line, not with a traceback.
        clash = _serve(port, {**clean, "METERLINE_DATABASE_URL": database_url, "METERLINE_REMOTE_CATALOG": "false",
                              "METERLINE_ADMIN_TOKEN": "a-configured-token-0123456789",
                              "METERLINE_DATA_DIR": str(tmp_path / "other")})
        assert clash.returncode == 1 and "Traceback" not in clash.stderr
        assert f"meterline: cannot listen on 127.0.0.1:{port}: the address is already in use" in clash.stderr
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), timeout=60)
    assert proc.returncode == 0, output.read_text(errors="replace")[-3000:]
    assert not (data_dir / "demo" / "pgdata" / "postmaster.pid").exists()  # its PostgreSQL stopped with it
    assert not (data_dir / "pgdata").exists()  # and lived apart from the ordinary data directory


async def _spend_the_balance(base: str, key: str, available: int) -> int:
    """A streamed chat, a video followed to completion and four images, each answer naming the simulator, then an
    image the rest cannot cover (402). Returns what is left."""
    auth = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(base, headers=auth) as http:
        body = {"model": "simulator/chat", "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "Say hello"}]}
        async with http.post("/v1/chat/completions", json=body) as resp:
            events = [line[6:] for line in (await resp.text()).splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"])
        assert text.startswith("This answer comes from Meterline's simulator")
        assert chunks[-1]["usage"]["cost_micros"] == CHAT_COST
        available -= CHAT_COST

        async with http.post("/v1/videos", json={"model": "simulator/video", "prompt": "a lighthouse",
                                                  "seconds": "8"}) as resp:
            video = await resp.json()
            assert (resp.status, video["metadata"]["provider"], video["metadata"]["cost_estimate_micros"]) == (
                202, "simulator", 800_000)
        for _ in range(600):  # each retrieval polls the simulator, which finishes a job at its second poll
            async with http.get(f"/v1/videos/{video['id']}") as resp:
                video = await resp.json()
            if video["status"] == "completed":
                break
            await asyncio.sleep(0.1)
        assert (video["status"], video["metadata"]["cost_micros"]) == ("completed", 800_000)
        async with http.get(f"/v1/videos/{video['id']}/content") as resp:
            assert (await resp.text()).startswith("Meterline simulator: no video was made")
        available -= 800_000

        async with http.post("/v1/images/generations", json={"model": "simulator/image", "prompt": "a cat",
                                                              "n": 4}) as resp:
            images = await resp.json()
        assert resp.status == 200 and images["metadata"]["cost_micros"] == 160_000
        assert [i["revised_prompt"] for i in images["data"]] == ["[Meterline simulator] a stand-in for: a cat"] * 4
        available -= 160_000

        async with http.post("/v1/images/generations", json={"model": "simulator/image", "prompt": "a cat"}) as resp:
            refused = (await resp.json())["error"]
        assert (resp.status, refused["code"], refused["required_micros"], refused["available_micros"]) == (
            402, "INSUFFICIENT_BALANCE", 40_000, available)
    return available


async def test_the_demo_account_is_made_once_and_found_again(tmp_path: Path, pool: asyncpg.Pool) -> None:
    """A second start finds the account, its key and its one top-up; a revoked key is replaced, and so is a lost
    state file (the account is found by its name): the balance is never funded twice."""
    path = tmp_path / "demo" / demo.STATE_FILE
    first = await demo.ensure_account(pool, path)
    assert (first.available_micros, stat.S_IMODE(path.stat().st_mode)) == (STARTING, 0o600)
    again = await demo.ensure_account(pool, path)
    assert again == first
    await keys.revoke_key(pool, first.key_id)
    renewed = await demo.ensure_account(pool, path)
    assert (renewed.account_id, renewed.available_micros) == (first.account_id, STARTING)
    assert renewed.key != first.key and json.loads(path.read_text())["key"] == renewed.key
    path.unlink()
    found = await demo.ensure_account(pool, path)
    assert found.account_id == first.account_id and found.key not in (first.key, renewed.key)
    assert await pool.fetchval("SELECT count(*) FROM accounts WHERE kind = 'customer'") == 1
    assert await pool.fetchval("SELECT count(*) FROM transfers WHERE kind = 'topup'") == 1
    assert await pool.fetchval("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL") == 2


def test_the_demo_settings_are_its_own_whatever_is_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulator is its only upstream (an upstream configured in the environment does not creep back in), its
    data and database are its own even when a database is configured, and its catalog is read at no markup."""
    monkeypatch.setenv("METERLINE_UPSTREAMS__OPENROUTER__BASE_URL", "https://openrouter.example/api/v1")
    configured = load_settings(config=ROOT / "config" / "meterline.toml", data_dir=tmp_path, markup="0.05",
                               database_url="postgresql://db.example/meterline", admin_token="configured-0123456789")
    settings = demo.demo_settings(configured, simulator_url="http://127.0.0.1:1/v1")
    assert (list(settings.upstreams), settings.upstreams["simulator"].base_url, settings.text_upstream) == (
        ["simulator"], "http://127.0.0.1:1/v1", "simulator")
    assert sorted(settings.models) == ["simulator/image", "simulator/video"]
    assert (settings.data_dir, settings.database_url, settings.markup, settings.remote_catalog) == (
        tmp_path / "demo", None, 0, True)
    assert settings.admin_token is not None and settings.admin_token.get_secret_value() == "configured-0123456789"
    short = load_settings(config=ROOT / "config" / "meterline.toml", hold_ttl_seconds=700, upstreams={})
    with pytest.raises(SettingsError, match="hold_ttl_seconds"):
        demo.demo_settings(short.model_copy(update={"hold_ttl_seconds": 80}), simulator_url="http://127.0.0.1:1/v1")
