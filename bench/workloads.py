"""The workloads of issue 6, each run as interleaved rounds over the arms and summarised as medians of the
per-round figures (a figure relative to the direct arm is taken within each round, then the median)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.arms import Arm, Generator, configure_upstream
from bench.meterline import Database, Ledgerbook
from bench.procs import Service

KB = 1024


@dataclass(frozen=True)
class Profile:
    rounds: int
    c1_requests: int
    c1_cap_s: float
    sweep_levels: tuple[int, ...]
    sweep_s: float
    open_s: float
    stream_s: float
    stream_concurrency: int
    stream_chunks: int
    prompt_requests: int
    accounts_s: float
    rss_total: int
    rss_segment: int
    rss_concurrency: int


FULL = Profile(rounds=5, c1_requests=1000, c1_cap_s=3.0, sweep_levels=(4, 16, 64), sweep_s=1.5, open_s=2.5,
               stream_s=2.5, stream_concurrency=16, stream_chunks=32, prompt_requests=200, accounts_s=2.0,
               rss_total=200_000, rss_segment=20_000, rss_concurrency=64)
QUICK = Profile(rounds=5, c1_requests=200, c1_cap_s=0.8, sweep_levels=(64,), sweep_s=0.8, open_s=0.8,
                stream_s=0.8, stream_concurrency=16, stream_chunks=32, prompt_requests=40, accounts_s=0.7,
                rss_total=8_000, rss_segment=2_000, rss_concurrency=64)
# LiteLLM serves its most at a low concurrency (more only queues): it is swept at this one level.
PEER_LEVEL = 8


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


class Bench:
    """Runs jobs on the generator and reads the arm's CPU (and the database's) around each one."""

    def __init__(self, gen: Generator, upstream: Service, profile: Profile, book: Ledgerbook,
                 database: Database | None) -> None:
        self.gen = gen
        self.upstream = upstream
        self.profile = profile
        self.book = book
        self.database = database

    def measure(self, arm: Arm, job: dict[str, Any]) -> dict[str, Any]:
        cpu0 = arm.service.cpu_seconds() if arm.measure_cpu else None
        db0 = self.database.cpu_seconds() if arm.billed and self.database else None
        result = self.gen.run(job)
        ok = max(result["ok"], 1)
        if cpu0 is not None:
            result["cpu_s"] = arm.service.cpu_seconds() - cpu0
            result["cpu_us_per_request"] = result["cpu_s"] / ok * 1e6
        if db0 is not None:
            db1 = self.database.cpu_seconds() if self.database else None
            if db1 is not None:
                result["db_cpu_us_per_request"] = (db1 - db0) / ok * 1e6
        if arm.billed:
            self.book.add(result, arm.name)
        result.pop("ids", None)
        return result

    def rounds(self, arms: list[Arm], make_job: Callable[[Arm], dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """Each round runs every arm once, starting from a different arm, so drift hits all arms alike."""
        out: dict[str, list[dict[str, Any]]] = {arm.name: [] for arm in arms}
        for r in range(self.profile.rounds):
            shift = r % len(arms)
            for arm in arms[shift:] + arms[:shift]:
                out[arm.name].append(self.measure(arm, make_job(arm)))
        return out

    def knobs(self, **knobs: float) -> None:
        configure_upstream(self.upstream, **knobs)


def _med(runs: list[dict[str, Any]], key: str) -> float | None:
    return median([run.get(key) for run in runs])


def _added(runs: list[dict[str, Any]], base: list[dict[str, Any]], key: str) -> float | None:
    return median([a[key] - b[key] if a.get(key) is not None and b.get(key) is not None else None
                   for a, b in zip(runs, base, strict=True)])


def _ratio(runs: list[dict[str, Any]], base: list[dict[str, Any]], key: str) -> float | None:
    return median([a[key] / b[key] if a.get(key) and b.get(key) else None
                   for a, b in zip(runs, base, strict=True)])


def warm_up(bench: Bench, arms: list[Arm]) -> None:
    bench.knobs(latency_ms=0, chunks=4, pace_ms=0)
    for arm in arms:
        bench.measure(arm, arm.job(mode="closed", concurrency=8, requests=400, duration_s=2))
        bench.measure(arm, arm.job(stream=True, expect_chunks=4, mode="closed", concurrency=4, requests=40,
                                   duration_s=10))


def latency_c1(bench: Bench, arms: list[Arm], direct: Arm) -> dict[str, Any]:
    """Non-streaming, one request at a time: the latency each gateway adds over calling the upstream."""
    p = bench.profile
    bench.knobs(latency_ms=0)
    runs = bench.rounds([direct, *arms], lambda arm: arm.job(
        mode="closed", concurrency=1, requests=p.c1_requests, duration_s=p.c1_cap_s))
    summary = {name: {"p50_ms": _med(r, "p50_ms"), "p99_ms": _med(r, "p99_ms"),
                      "added_p50_ms": _added(r, runs[direct.name], "p50_ms"),
                      "added_p99_ms": _added(r, runs[direct.name], "p99_ms"),
                      "cpu_us_per_request": _med(r, "cpu_us_per_request")}
               for name, r in runs.items()}
    return {"summary": summary, "rounds": runs}


def sweep(bench: Bench, arms: list[Arm], direct: Arm) -> dict[str, Any]:
    """Closed loop at rising concurrency: throughput and CPU per request; the direct arm shows the ceiling."""
    p = bench.profile
    bench.knobs(latency_ms=0)
    levels: dict[str, Any] = {}
    peers = [arm for arm in arms if arm.name == "litellm"]
    arms = [arm for arm in arms if arm.name != "litellm"]
    plan = [(level, [direct, *arms] if level == max(p.sweep_levels) else arms) for level in p.sweep_levels]
    if peers:
        plan.append((PEER_LEVEL, peers))
    for level, group in plan:
        runs = bench.rounds(group, lambda arm, level=level: arm.job(
            mode="closed", concurrency=level, duration_s=p.sweep_s))
        levels.setdefault(str(level), {}).update({
            name: {"rps": _med(r, "rps"), "p50_ms": _med(r, "p50_ms"), "p99_ms": _med(r, "p99_ms"),
                   "cpu_us_per_request": _med(r, "cpu_us_per_request"),
                   "db_cpu_us_per_request": _med(r, "db_cpu_us_per_request"), "rounds": r}
            for name, r in runs.items()})
    best: dict[str, Any] = {}
    for arm in [direct, *arms, *peers]:
        seen = [(lv[arm.name]["rps"], level) for level, lv in levels.items() if arm.name in lv]
        rps, level = max(seen, key=lambda pair: pair[0] or 0)
        best[arm.name] = {"max_rps": rps, "at_concurrency": int(level),
                          "cpu_us_per_request": levels[level][arm.name]["cpu_us_per_request"],
                          "db_cpu_us_per_request": levels[level][arm.name]["db_cpu_us_per_request"]}
    return {"best": best, "levels": levels}


def open_loop_50ms(bench: Bench, arms: list[Arm], direct: Arm, rate: float) -> dict[str, Any]:
    """A 50 ms upstream at a fixed arrival rate (half the gateway's maximum): latency ratio to direct."""
    p = bench.profile
    bench.knobs(latency_ms=50)
    preconnect = int(rate * 0.05 * 1.5) + 8

    def job(arm: Arm, seconds: float) -> dict[str, Any]:
        return arm.job(mode="open", rate=rate, duration_s=seconds, preconnect=preconnect)

    for arm in [direct, *arms]:  # open the gateways' upstream pools to the size this rate needs
        bench.measure(arm, job(arm, 0.5))
    runs = bench.rounds([direct, *arms], lambda arm: job(arm, p.open_s))
    summary = {name: {"p50_ms": _med(r, "p50_ms"), "p99_ms": _med(r, "p99_ms"),
                      "p50_ratio": _ratio(r, runs[direct.name], "p50_ms"),
                      "p99_ratio": _ratio(r, runs[direct.name], "p99_ms"), "rps": _med(r, "rps")}
               for name, r in runs.items()}
    bench.knobs(latency_ms=0)
    return {"rate": rate, "summary": summary, "rounds": runs}


def streaming(bench: Bench, arms: list[Arm], direct: Arm) -> dict[str, Any]:
    """SSE paced 10 ms apart: added time to first token, CPU per relayed chunk, every chunk delivered.

    Open loop, at the rate that keeps `stream_concurrency` streams open on average: a closed loop would start
    all its streams in one wave (they all last as long), and each first token would queue behind the others'."""
    p = bench.profile
    bench.knobs(latency_ms=0, chunks=p.stream_chunks, pace_ms=10)
    rate = p.stream_concurrency / (p.stream_chunks * 0.010)
    runs = bench.rounds([direct, *arms], lambda arm: arm.job(
        stream=True, expect_chunks=p.stream_chunks, mode="open", rate=rate, duration_s=p.stream_s,
        preconnect=p.stream_concurrency + 8))
    summary = {}
    for name, r in runs.items():
        per_chunk = median([run["cpu_s"] / run["chunks"] * 1e6 if run.get("cpu_s") is not None
                            and run["chunks"] else None for run in r])
        summary[name] = {"ttft_p50_ms": _med(r, "ttft_p50_ms"), "ttft_p99_ms": _med(r, "ttft_p99_ms"),
                         "added_ttft_p50_ms": _added(r, runs[direct.name], "ttft_p50_ms"),
                         "cpu_us_per_chunk": per_chunk, "streams": sum(run["ok"] for run in r),
                         "chunks": sum(run["chunks"] for run in r),
                         "bad_streams": sum(run["bad_streams"] for run in r)}
    return {"chunks_per_stream": p.stream_chunks, "streams_per_second": rate, "summary": summary,
            "rounds": runs}


def prompt_sizes(bench: Bench, arms: list[Arm], direct: Arm) -> dict[str, Any]:
    """1, 10 and 100 KB prompts at concurrency 1: what a larger prompt adds to each gateway's latency."""
    p = bench.profile
    bench.knobs(latency_ms=0)
    sizes: dict[str, Any] = {}
    for size in (1, 10, 100):
        runs = bench.rounds([direct, *arms], lambda arm, size=size: arm.job(
            prompt_bytes=size * KB, mode="closed", concurrency=1, requests=p.prompt_requests,
            duration_s=p.c1_cap_s))
        sizes[f"{size}KB"] = runs
    summary = {}
    for arm in arms:
        added = {label: [a["p50_ms"] - b["p50_ms"] for a, b in zip(runs[arm.name], runs[direct.name],
                                                                  strict=True)]
                 for label, runs in sizes.items()}
        summary[arm.name] = {f"added_p50_ms_{label}": median(list(v)) for label, v in added.items()}
        summary[arm.name]["extra_100KB_over_1KB_ms"] = median(
            [big - small for big, small in zip(added["100KB"], added["1KB"], strict=True)])
    return {"summary": summary, "rounds": sizes}


def hot_vs_spread(bench: Bench, hot: Arm, spread: Arm, concurrency: int) -> dict[str, Any]:
    """One hot account against traffic spread over many accounts, same concurrency, interleaved."""
    p = bench.profile
    bench.knobs(latency_ms=0)
    runs = bench.rounds([hot, spread], lambda arm: arm.job(
        mode="closed", concurrency=concurrency, duration_s=p.accounts_s))
    return {"concurrency": concurrency, "accounts_spread": len(spread.header_sets),
            "hot_rps": _med(runs[hot.name], "rps"), "spread_rps": _med(runs[spread.name], "rps"),
            "ratio": _ratio(runs[hot.name], runs[spread.name], "rps"), "rounds": runs}


def workers_scaling(bench: Bench, one: Arm, two: Arm, concurrency: int) -> dict[str, Any]:
    """`serve --workers 1` against `--workers 2`, neither pinned (so two workers may use both cores), closed loop at
    the same concurrency, interleaved: does a second worker raise the throughput?"""
    p = bench.profile
    bench.knobs(latency_ms=0)
    runs = bench.rounds([one, two], lambda arm: arm.job(mode="closed", concurrency=concurrency,
                                                         duration_s=p.accounts_s))
    return {"concurrency": concurrency, "one_rps": _med(runs[one.name], "rps"), "two_rps": _med(runs[two.name], "rps"),
            "ratio": _ratio(runs[two.name], runs[one.name], "rps"), "rounds": runs}


def rss_growth(bench: Bench, arm: Arm) -> dict[str, Any]:
    """Resident memory of the gateway over many requests; growth is counted from the end of the first
    segment, once caches and pools are warm."""
    p = bench.profile
    bench.knobs(latency_ms=0)
    samples = [arm.service.rss_bytes()]
    done = 0
    while done < p.rss_total:
        n = min(p.rss_segment, p.rss_total - done)
        result = bench.measure(arm, arm.job(mode="closed", concurrency=p.rss_concurrency, requests=n,
                                            duration_s=600))
        done += n
        samples.append(arm.service.rss_bytes())
        if result["ok"] == 0:
            break
    growth = samples[-1] - samples[1] if len(samples) > 2 else None
    return {"requests": done, "rss_mb": [s / 2**20 for s in samples],
            "growth_mb": growth / 2**20 if growth is not None else None}
