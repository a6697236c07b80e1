"""`meterline serve --workers N`: N processes on one port, stopped together by one signal to the parent."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp

from tests.serving import ROOT, free_port


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
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env["METERLINE_DATABASE_URL"] = database_url
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--workers", "2",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(600):  # a bound on start-up, not a timing test
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            # Fresh connections, spread by the kernel over both listening workers.
            statuses = []
            for _ in range(20):
                async with aiohttp.ClientSession() as fresh, fresh.get(f"http://127.0.0.1:{port}/healthz") as r:
                    statuses.append(r.status)
        workers = _workers(proc.pid)
        assert statuses == [200] * 20
        assert len(workers) == 2
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
        assert all(_gone(pid) for pid in workers)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
