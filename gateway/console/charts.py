"""Periods and charts for the console: a period from the URL (whole UTC days), and the JSON a chart is drawn from
(console.js reads it from a `<script type="application/json">` block: the page's CSP allows no inline script)."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from aiohttp import web

from billing.rollups import MAX_DAYS
from gateway.errors import invalid

DEFAULT_DAYS = 30


def _day(request: web.Request, name: str) -> date | None:
    raw = (request.query.get(name) or "").strip()
    if not raw:
        return None
    try:
        return date.fromisoformat(raw[:10]) if len(raw) >= 10 else date.fromisoformat(raw)
    except ValueError:
        raise invalid(f"{name} must be a date such as 2026-03-01", name) from None


def period(request: web.Request, *, default_days: int = DEFAULT_DAYS) -> tuple[date, date]:
    """[start, end) from `from` and `to` (inclusive dates, UTC); by default the last `default_days` days to today."""
    today = datetime.now(UTC).date()
    last = _day(request, "to") or today
    first = _day(request, "from") or last - timedelta(days=default_days - 1)
    if last < first:
        raise invalid("to must not be before from", "to")
    if (last - first).days >= MAX_DAYS:
        raise invalid(f"a period is at most {MAX_DAYS} days", "from")
    if last >= date.max - timedelta(days=1):
        raise invalid("to is too far in the future", "to")
    return first, last + timedelta(days=1)


def chart(days: list[date], series: dict[str, list[int]], *, unit: str) -> str:
    """The JSON a chart is drawn from: x in unix seconds (UTC midnights), one integer series per label."""
    x = [int(datetime.combine(day, time(), tzinfo=UTC).timestamp()) for day in days]
    data = {"x": x, "series": [{"label": label, "values": values} for label, values in series.items()], "unit": unit}
    # In a <script> block, "</" must not appear: escape it (and the rest stays valid JSON).
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/")


def by_day(rows: list[dict[str, Any]], days: list[date]) -> dict[str, list[int]]:
    """Rows (day, grp, value), grp None for the groups beyond the largest, as one series per group over `days`
    (in the order the rows name them, largest first), with "other" last."""
    index = {day: i for i, day in enumerate(days)}
    series: dict[str, list[int]] = {}
    other: list[int] | None = None
    for row in rows:
        if row["grp"] is None:
            other = other or [0] * len(days)
            values = other
        else:
            values = series.setdefault(row["grp"] or "(none)", [0] * len(days))
        values[index[row["day"]]] += row["value"]
    if other is not None:
        series["other"] = other
    return series
