"""Real servers for tests: an app on a loopback port, served as `meterline serve` serves it (gateway.server) with a
chosen `handler_cancellation`, and a whole `meterline serve` process.

aiohttp's TestServer always turns handler cancellation on, but `meterline serve` runs with aiohttp's default
(off): there a client that leaves is noticed by a failed write, not by cancellation. Tests that care about the
difference serve the app through this instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway import server

ROOT = Path(__file__).resolve().parent.parent


@contextlib.asynccontextmanager
async def running(app: web.Application, *, handler_cancellation: bool) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1 with the given handler_cancellation; yields the base URL."""
    runner = server.runner(app, handler_cancellation=handler_cancellation)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def meterline_serve(
    env: dict[str, str], *args: str, command: list[str] | None = None, cwd: Path = ROOT,
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """A real `meterline serve [args]` process on a free port, with the caller's METERLINE_* (and upstream key)
    variables and none inherited; yields its base URL once /readyz answers, and its process (a test may kill
    it). Stopped with SIGINT, as an operator would, when the block ends. `command` replaces
    `python -m gateway.cli` (an installed `meterline` script, say) and `cwd` the repository as working directory."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    with tempfile.TemporaryFile() as log:
        proc = await asyncio.create_subprocess_exec(
            *(command or [sys.executable, "-m", "gateway.cli"]), "serve", "--host", "127.0.0.1", "--port",
            str(port), *args, cwd=cwd, env={**clean, **env}, stdout=log, stderr=log,
        )
        base = f"http://127.0.0.1:{port}"

        def output() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")[-3000:]

        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(600):  # a bound on waiting for start-up (pgserver may initialise), not a timing test
                    if proc.returncode is not None:
                        raise AssertionError(f"meterline serve exited before it was ready:\n{output()}")
                    try:
                        async with http.get(f"{base}/readyz") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError(f"meterline serve did not become ready:\n{output()}")
            yield base, proc
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
                try:
                    await asyncio.wait_for(proc.wait(), timeout=20)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
