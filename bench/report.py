"""Targets of issue 6 judged against a run's figures, printed as a table, saved as JSON, written into README."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import ROOT

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    value: str
    met: bool | None  # None: not measured in this run (the arm or the route is missing)

    def verdict(self) -> str:
        return {True: "met", False: "NOT MET", None: "n/a"}[self.met]


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cores": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}", "commit": commit or None}


def _get(data: dict[str, Any], *path: str) -> Any:
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _check(value: float | None, ok: bool | None, text: str) -> tuple[str, bool | None]:
    if value is None:
        return "not measured", None
    return text, ok


def targets(results: dict[str, Any], meterline: str = "meterline", peer: str = "litellm") -> list[Target]:
    out: list[Target] = []

    def add(name: str, goal: str, value: float | None, test: Any, text: str) -> None:
        shown, met = _check(value, None if value is None else bool(test(value)), text)
        out.append(Target(name, goal, shown, met))

    # Issue 17's targets are ratios to the bare relay measured in the same run: absolute figures move up to threefold
    # between machines of the same kind.
    best = _get(results, "sweep", "best") or {}
    cpu, b_cpu = _get(best, meterline, "cpu_us_per_request"), _get(best, "bare-proxy", "cpu_us_per_request")
    db_cpu = _get(best, meterline, "db_cpu_us_per_request")
    m_rps, b_rps = _get(best, meterline, "max_rps"), _get(best, "bare-proxy", "max_rps")
    share = m_rps / b_rps if m_rps and b_rps else None
    add("Throughput vs bare relay", "≥ 60%", share, lambda v: v >= 0.6,
        f"{(share or 0) * 100:.0f}% ({m_rps or 0:.0f} vs {b_rps or 0:.0f} req/s)")
    times = cpu / b_cpu if cpu and b_cpu else None
    add("Gateway CPU per billed request", "≤ 1.5× the bare relay's", times, lambda v: v <= 1.5,
        f"{times or 0:.2f}× ({cpu or 0:.0f} vs {b_cpu or 0:.0f} µs)")
    pg = db_cpu / b_cpu if db_cpu is not None and b_cpu else None
    add("PostgreSQL CPU per billed request", "≤ 1.0× the bare relay's CPU", pg, lambda v: v <= 1.0,
        f"{pg or 0:.2f}× ({db_cpu or 0:.0f} vs {b_cpu or 0:.0f} µs)")
    c1 = _get(results, "latency_c1", "summary", meterline) or {}
    relay = _get(results, "latency_c1", "summary", "bare-proxy") or {}
    commit = results.get("commit_ms")
    limit = relay["added_p50_ms"] + commit + 0.3 if relay.get("added_p50_ms") is not None and commit else None
    added, added99 = c1.get("added_p50_ms"), c1.get("added_p99_ms")
    add("Added p50 at concurrency 1", "≤ the relay's + one commit + 0.3 ms",
        added - limit if added is not None and limit is not None else None, lambda v: v <= 0,
        f"{added or 0:.2f} ms vs {limit or 0:.2f} ms ({relay.get('added_p50_ms') or 0:.2f} + {commit or 0:.2f}"
        " fdatasync + 0.3)")
    add("Added p99 at concurrency 1", "≤ 2× that", added99 - 2 * limit if added99 is not None and limit else None,
        lambda v: v <= 0, f"{added99 or 0:.2f} ms vs {2 * (limit or 0):.2f} ms")
    o = _get(results, "open_50ms", "summary", meterline) or {}
    rate = _get(results, "open_50ms", "rate") or 0
    add("50 ms upstream, p50 vs direct", "≤ 1.03×", o.get("p50_ratio"), lambda v: v <= 1.03,
        f"{o.get('p50_ratio') or 0:.3f}× at {rate:.0f} req/s")
    add("50 ms upstream, p99 vs direct", "≤ 1.10×", o.get("p99_ratio"), lambda v: v <= 1.10,
        f"{o.get('p99_ratio') or 0:.3f}× at {rate:.0f} req/s")
    s, bs = (_get(results, "streaming", "summary", arm) or {} for arm in (meterline, "bare-proxy"))
    ttft, b_ttft = s.get("added_ttft_p50_ms"), bs.get("added_ttft_p50_ms")
    add("Streaming: added time to first token", "≤ the relay's + 0.3 ms",
        ttft - b_ttft - 0.3 if ttft is not None and b_ttft is not None else None, lambda v: v <= 0,
        f"{ttft or 0:.2f} ms vs {(b_ttft or 0) + 0.3:.2f} ms")
    chunk, b_chunk = s.get("cpu_us_per_chunk"), bs.get("cpu_us_per_chunk")
    per = chunk / b_chunk if chunk and b_chunk else None
    add("Streaming: CPU per relayed chunk", "≤ 1.2× the relay's", per, lambda v: v <= 1.2,
        f"{per or 0:.2f}× ({chunk or 0:.1f} vs {b_chunk or 0:.1f} µs, all CPU of the stream / chunks)")
    add("Streaming: every chunk delivered", "0 streams short", s.get("bad_streams"), lambda v: v == 0,
        f"{s.get('bad_streams')} of {s.get('streams')} streams short ({s.get('chunks')} chunks)")
    w = results.get("workers") or {}
    add("--workers 2 over --workers 1", "more throughput", w.get("ratio"), lambda v: v > 1.0,
        f"{w.get('ratio') or 0:.2f}× ({w.get('two_rps') or 0:.0f} vs {w.get('one_rps') or 0:.0f} req/s, unpinned)")
    hv = results.get("accounts") or {}
    add("One hot account vs 1,000 accounts", "≥ 80%", hv.get("ratio"), lambda v: v >= 0.8,
        f"{(hv.get('ratio') or 0) * 100:.0f}% ({hv.get('hot_rps') or 0:.0f} vs {hv.get('spread_rps') or 0:.0f} req/s)")
    p_rps = _get(best, peer, "max_rps")
    over = m_rps / p_rps if m_rps and p_rps else None
    add("Throughput vs LiteLLM", "≥ 20×", over, lambda v: v >= 20,
        f"{over or 0:.1f}× ({m_rps or 0:.0f} vs {p_rps or 0:.0f} req/s)")
    mine, theirs = c1.get("added_p50_ms"), _get(results, "latency_c1", "summary", peer, "added_p50_ms")
    part = mine / theirs if mine is not None and theirs else None
    add("Added p50 vs LiteLLM's", "≤ 1/5", part, lambda v: v <= 0.2,
        f"{(part or 0):.3f} ({mine or 0:.2f} vs {theirs or 0:.2f} ms)")
    rss = results.get("rss") or {}
    growth = rss.get("growth_mb")
    full = rss.get("requests", 0) >= 200_000  # a shorter run (--quick) shows the figure without a verdict
    add("RSS growth", "< 30 MB / 200,000 requests", growth if full else None, lambda v: v < 30, "")
    out[-1] = Target(out[-1].name, out[-1].goal,
                     f"{growth or 0:+.1f} MB over {rss.get('requests', 0):,} requests" if growth is not None
                     else "not measured", out[-1].met)
    ps = _get(results, "prompts", "summary", meterline) or {}
    add("100 KB prompt over 1 KB", "≤ 2 ms", ps.get("extra_100KB_over_1KB_ms"), lambda v: v <= 2.0,
        f"{ps.get('extra_100KB_over_1KB_ms') or 0:.2f} ms")
    return out


def table(found: list[Target]) -> str:
    rows = [("Target", "Goal", "Measured", "Verdict")] + [(t.name, t.goal, t.value, t.verdict()) for t in found]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(found: list[Target], results: dict[str, Any]) -> str:
    m = results.get("machine") or {}
    arms = ", ".join(results.get("arms", []))
    lines = [
        f"Measured {m.get('date')} on {m.get('cores')} cores ({m.get('cpu')}), Python {m.get('python')}, "
        f"{m.get('system')}, commit {m.get('commit')}; profile `{results.get('profile')}`; arms: {arms}.",
        "",
        "| Target | Goal | Measured | Verdict |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {t.name} | {t.goal} | {t.value} | {t.verdict()} |" for t in found]
    rows = arm_rows(results)
    lines += ["", "| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def write_readme(text: str, readme: Path = ROOT / "README.md") -> None:
    """Replace what lies between the bench markers in README (the markers must be there already)."""
    content = readme.read_text(encoding="utf-8")
    if BEGIN not in content or END not in content:
        raise SystemExit(f"{readme} has no {BEGIN} … {END} markers to write between")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    readme.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", content, count=1), encoding="utf-8")


def arm_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per-arm figures behind the targets (medians of round medians), with a header row."""
    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    rows: list[tuple[str, ...]] = [("Arm", "c=1 p50 ms", "c=1 +p50 ms", "c=1 +p99 ms", "max req/s",
                                    "CPU µs/req", "50 ms p50×", "50 ms p99×", "+TTFT ms", "CPU µs/chunk")]
    for arm in results.get("arms", []):
        c1 = _get(results, "latency_c1", "summary", arm) or {}
        best = _get(results, "sweep", "best", arm) or {}
        o = _get(results, "open_50ms", "summary", arm) or {}
        s = _get(results, "streaming", "summary", arm) or {}
        rows.append((arm, num(c1.get("p50_ms"), ".3f"), num(c1.get("added_p50_ms"), ".3f"),
                     num(c1.get("added_p99_ms"), ".3f"),
                     num(best.get("max_rps"), ".0f") + (f" @{best['at_concurrency']}" if best else ""),
                     num(best.get("cpu_us_per_request"), ".0f"), num(o.get("p50_ratio"), ".3f"),
                     num(o.get("p99_ratio"), ".3f"), num(s.get("added_ttft_p50_ms"), ".2f"),
                     num(s.get("cpu_us_per_chunk"), ".1f")))
    return rows


def arm_table(results: dict[str, Any]) -> str:
    rows = arm_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
