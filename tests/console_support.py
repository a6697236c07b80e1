"""Fixtures of the console tests: the gateway on a real socket, and Playwright driving Debian's Chromium.

Playwright's own browser download cannot work here, so the browser is the `chromium` binary Debian installs
(`.ci/run` installs it when missing; locally: `apt-get install -y chromium`), launched through `executable_path`.
Without it the browser tests are skipped with that instruction. Screenshots of the main pages are written to
`tests/artifacts/screenshots/` (not committed).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.app import create_app
from gateway.settings import Settings
from tests.serving import running

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "tests" / "artifacts" / "screenshots"


def chromium_path() -> str | None:
    named = os.environ.get("METERLINE_TEST_CHROMIUM")
    if named:
        return named
    return next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)


@pytest.fixture
async def console_base(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[str]:
    """The gateway serving on a loopback port; yields its base URL."""
    async with running(create_app(settings), handler_cancellation=False) as base:
        yield base


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium: install Debian's package (apt-get install -y chromium) to run the browser tests")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, headless=True,
                                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    tab = await context.new_page()
    try:
        yield tab
    finally:
        await context.close()


async def sign_in(page: Any, base: str, secret: str) -> None:
    await page.goto(f"{base}/console/login")
    await page.fill("input[name=token]", secret)
    await page.click("button[type=submit]")


async def screenshot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def money(text: str) -> int:
    """A console amount (`$12.500000`, `-$1.000000`) as micros."""
    match = re.fullmatch(r"(-?)\$(\d+)\.(\d{6})", text.strip())
    assert match, text
    micros = int(match[2]) * 1_000_000 + int(match[3])
    return -micros if match[1] else micros
