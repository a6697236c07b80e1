"""A fixture for tests that read what was logged: every line as `meterline serve` writes it off a terminal."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from gateway import logs


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Every log line, as `meterline serve` writes it off a terminal (JSON), for the test's duration."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.ContextFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield out
    finally:
        root.removeHandler(handler)
