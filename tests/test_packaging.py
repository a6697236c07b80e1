"""`pip install .` (not editable) followed by `meterline serve` works: the schema travels inside the package as
numbered migrations, and the installed copy, not this checkout, is what runs."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from billing import schema
from tests.conftest import ROOT, _with_database
from tests.serving import meterline_serve


def _run(*command: str | Path, cwd: Path) -> str:
    done = subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


async def test_the_built_wheel_installs_and_serves_from_any_directory(tmp_path: Path, server_url: str,
                                                                       fresh_database: Any) -> None:
    source, dist, venv, elsewhere = (tmp_path / name for name in ("source", "dist", "venv", "elsewhere"))
    elsewhere.mkdir()
    # Built from a copy of what the package is made of, so the build leaves nothing in the checkout.
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("gateway", "billing"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    await asyncio.to_thread(_run, sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, source,
                            cwd=tmp_path)
    [wheel] = dist.glob("meterline-*.whl")
    # The venv sees the test environment's dependencies (aiohttp, asyncpg, ...), so nothing is downloaded; the
    # wheel itself is installed into it, and it is the copy that runs (checked below).
    await asyncio.to_thread(_run, sys.executable, "-m", "venv", "--system-site-packages", venv, cwd=tmp_path)
    await asyncio.to_thread(_run, venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                            wheel, cwd=tmp_path)
    where = _run(venv / "bin" / "python", "-c", "import billing, gateway; print(billing.__file__, gateway.__file__)",
                 cwd=elsewhere)
    assert all(path.startswith(str(venv)) for path in where.split()), where

    database: asyncpg.Connection = await fresh_database()
    url = _with_database(server_url, await database.fetchval("SELECT current_database()"))
    env = {"METERLINE_DATABASE_URL": url, "METERLINE_REMOTE_CATALOG": "false"}
    async with meterline_serve(env, command=[str(venv / "bin" / "meterline")], cwd=elsewhere) as (base, _proc), \
            aiohttp.ClientSession() as http:
        async with http.get(f"{base}/readyz") as ready:
            assert ready.status == 200
        # The console's templates and vendored scripts travel in the wheel too.
        async with http.get(f"{base}/console/login") as login:
            assert login.status == 200 and "Sign in" in await login.text()
        async with http.get(f"{base}/console/static/uPlot-1.6.32.iife.min.js") as script:
            assert script.status == 200 and len(await script.read()) > 10_000
        assert await schema.applied(database) == [m.version for m in schema.migrations()]
        assert await database.fetchval("SELECT count(*) FROM accounts WHERE kind <> 'customer'") == 5
