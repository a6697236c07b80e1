"""`meterline serve --workers N`: N processes on one port, stopped together by one signal to the parent."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp

from tests.serving import ROOT, free_port, meterline_serve


def _workers(parent: int) -> list[int]:
    """The parent's spawned workers (not multiprocessing's resource tracker)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == parent and b"spawn_main" in cmdline:
                found.append(int(entry))
    return found


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    except OSError:
        return True


async def test_two_workers_share_the_port_and_stop_on_one_sigint(database_url: str) -> None:
    async with meterline_serve({"METERLINE_DATABASE_URL": database_url}, "--workers", "2") as (base, proc):
        # Fresh connections, spread by the kernel over both listening workers.
        statuses = []
        for _ in range(20):
            async with aiohttp.ClientSession() as fresh, fresh.get(f"{base}/healthz") as resp:
                statuses.append(resp.status)
        workers = _workers(proc.pid)
        assert statuses == [200] * 20
        assert len(workers) == 2
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
        assert all(_gone(pid) for pid in workers)


async def test_a_stop_while_workers_are_still_starting_is_a_clean_exit(database_url: str) -> None:
    """SIGINT at once, while the workers are importing: exit status 0 and no worker left behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env["METERLINE_DATABASE_URL"] = database_url
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--port", str(free_port()), "--workers", "2",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(3_000):  # until both workers exist (a bound of 30 s, not a timing assertion)
            workers = _workers(proc.pid)
            if len(workers) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(workers) == 2
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), timeout=60) == 0
        assert all(_gone(pid) for pid in workers)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
