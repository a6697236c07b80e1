"""Where one billed call's time goes at concurrency 1 (issue 17): the added latency taken apart, from the gateway's
own metrics and PostgreSQL's own statistics, measured in one run beside the bare relay.

The arms and the load are the benchmark's (bench/run.py): the fake upstream, the bare aiohttp relay and `meterline
serve` on a new embedded PostgreSQL, driven one request at a time by bench.loadgen, in interleaved rounds. For the
Meterline rounds the run also reads, before and after:

    the gateway's /metrics      time in the gateway per call, the upstream's part of it, and each group commit's
                                statement (reserve, settle) as the gateway waited for it, its commit included
    pg_stat_user_functions      time PostgreSQL spent inside meterline_reserve and meterline_settle and the
                                functions they call (track_functions = 'pl', set for this run's server only)
    pg_stat_wal                 WAL flushes and their time (track_wal_io_timing = on): the durable commits
    /proc                       the gateway's and PostgreSQL's CPU time

and times fdatasync on the database's own disk, the price of one durable commit. It prints the breakdown of the
added p50: what the bare relay adds too, the two statements (what PostgreSQL spends inside the functions, what the
WAL flush costs, and the rest of the round trip: parse, plan, protocol, commit bookkeeping), and the gateway's own
time outside the upstream and the statements, with its CPU beside it.

    python -m bench.breakdown [--requests 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg

from bench import meterline
from bench.arms import Arm, Generator
from bench.procs import Service, cpus, fdatasync_ms, free_port, python_module

_FUNCTIONS = ("meterline_reserve", "meterline_settle", "meterline_quota_settle", "meterline_charge",
              "meterline_record", "meterline_grants_draw", "meterline_key_release", "meterline_rate_hit")


def _metrics(port: int) -> dict[str, float]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Authorization": f"Bearer {meterline.ADMIN_TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - a loopback http URL
        text = resp.read().decode()
    wanted: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r'(meterline_(?:request_duration_seconds|upstream_duration_seconds|'
                         r'ledger_batch_commit_seconds))_(sum|count)(\{[^}]*\})? ([0-9.e+-]+)$', line)
        if match:
            kind = re.search(r'kind="([a-z_]+)"', match[3] or "") if "ledger" in match[1] else None
            key = f"{match[1]}{':' + kind[1] if kind else ''}_{match[2]}"
            wanted[key] = wanted.get(key, 0.0) + float(match[4])
    return wanted


async def _pg_stats(url: str) -> dict[str, float]:
    conn = await asyncpg.connect(url)
    try:
        out: dict[str, float] = {}
        for row in await conn.fetch("SELECT funcname, calls, total_time, self_time FROM pg_stat_user_functions"
                                    " WHERE funcname = ANY($1)", list(_FUNCTIONS)):
            out[f"{row['funcname']}:calls"] = float(row["calls"])
            out[f"{row['funcname']}:total_ms"] = float(row["total_time"])
            out[f"{row['funcname']}:self_ms"] = float(row["self_time"])
        xacts = await conn.fetchrow("SELECT xact_commit, xact_rollback, tup_inserted, tup_updated FROM"
                                    " pg_stat_database WHERE datname = current_database()")
        assert xacts is not None
        out.update({f"db:{k}": float(v) for k, v in dict(xacts).items()})
        wal = await conn.fetchrow("SELECT wal_sync, wal_sync_time, wal_write, wal_write_time FROM pg_stat_wal")
        assert wal is not None
        out.update({f"wal:{k}": float(v) for k, v in dict(wal).items()})
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        return out
    finally:
        await conn.close()


async def _enable_stats(url: str, settings: list[str]) -> None:
    conn = await asyncpg.connect(url)
    try:
        for setting in settings:
            name, _, value = setting.partition("=")
            if not re.fullmatch(r"[a-z_.]+", name):
                raise SystemExit(f"not a setting name: {name!r}")
            await conn.execute(f"ALTER DATABASE {await conn.fetchval('SELECT current_database()')} SET {name} = "
                               f"{await conn.fetchval('SELECT quote_literal($1)', value)}")
        await conn.execute("ALTER SYSTEM SET track_functions = 'pl'")
        await conn.execute("ALTER SYSTEM SET track_wal_io_timing = on")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per arm per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--py-spy", dest="py_spy", type=Path, default=None,
                        help="also sample the gateway's CPU with py-spy (when installed) during its rounds, write the "
                             "collapsed stacks to this file and print the functions with the most samples")
    parser.add_argument("--pg-setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a PostgreSQL setting for this run's database (ALTER DATABASE ... SET), to measure a "
                             "lever; may be repeated")
    args = parser.parse_args(argv)
    available = cpus()
    gateway_cpu = available[0] if len(available) > 1 else None
    load_cpu = available[1] if len(available) > 1 else None
    work = Path(tempfile.mkdtemp(prefix="meterline-breakdown-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)

        def service(name: str, argv: list[str], port: int, cpu: int | None) -> Service:
            svc = Service(name, argv, port=port, log=work / f"{name}.log", cpu=cpu)
            stack.callback(svc.stop)
            svc.wait_ready()
            return svc

        up_port, px_port = free_port(), free_port()
        upstream = service("upstream", python_module("bench.upstream", "--port", str(up_port)), up_port, load_cpu)
        base = f"{upstream.url}/v1"
        bare = service("bare-proxy", python_module("bench.proxy", "--port", str(px_port), "--upstream", base),
                       px_port, gateway_cpu)
        database = stack.enter_context(meterline.database(None, work))
        asyncio.run(_enable_stats(database.url, args.pg_setting))
        customers = meterline.create_customers(database.url, 0)
        config = meterline.write_config(work, base)
        svc = meterline.start(work, meterline.environment(database.url, config), cpu=gateway_cpu, workers=1)
        stack.callback(svc.stop)
        arms = [Arm("direct", upstream, measure_cpu=False), Arm("bare-proxy", bare),
                Arm("meterline", svc, header_sets=[{"Authorization": f"Bearer {customers.hot_key}"}])]
        gen = Generator(load_cpu)
        stack.callback(gen.stop)
        for arm in arms:  # warm up: connections, caches, the catalog, PostgreSQL's plans
            gen.run(arm.job(mode="closed", concurrency=1, requests=500, duration_s=30))
        spy = _start_py_spy(args.py_spy, svc) if args.py_spy else None
        p50: dict[str, list[float]] = {arm.name: [] for arm in arms}
        totals: dict[str, float] = {}
        count = 0
        for _ in range(args.rounds):
            for arm in arms:
                if arm.name == "meterline":
                    metrics, stats = _metrics(svc.port), asyncio.run(_pg_stats(database.url))
                    db_cpu = database.cpu_seconds() or 0.0
                cpu_before = arm.service.cpu_seconds()
                result = gen.run(arm.job(mode="closed", concurrency=1, requests=args.requests, duration_s=120))
                p50[arm.name].append(result["p50_ms"])
                if arm.name == "bare-proxy":
                    totals["relay_cpu_s"] = totals.get("relay_cpu_s", 0.0) + arm.service.cpu_seconds() - cpu_before
                    totals["relay_calls"] = totals.get("relay_calls", 0.0) + int(result.get("ok", args.requests))
                if arm.name == "meterline":
                    cpu = {"gateway_cpu_s": svc.cpu_seconds() - cpu_before,
                           "db_cpu_s": (database.cpu_seconds() or 0.0) - db_cpu}
                    # A backend reports its statistics when idle, up to 10 s later (PGSTAT_IDLE_INTERVAL): wait for
                    # the gateway's connections to report this round before reading them (the CPU is read first).
                    time.sleep(11)
                    count += int(result.get("ok", args.requests))
                    for k, v in {**_delta(_metrics(svc.port), metrics),
                                 **_delta(asyncio.run(_pg_stats(database.url)), stats), **cpu}.items():
                        totals[k] = totals.get(k, 0.0) + v
        fsync_ms = fdatasync_ms(work / "pgdata")
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
    figures = _figures(p50, totals, count, fsync_ms)
    _print(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if args.py_spy and args.py_spy.exists():
        _print_profile(args.py_spy)
    return 0


def _start_py_spy(out: Path, svc: Service) -> subprocess.Popen[bytes] | None:
    if shutil.which("py-spy") is None:
        print("py-spy is not installed (pip install py-spy): no profile")
        return None
    pid = svc.pids()[-1]  # the serving process (the last started: a worker, or the only one)
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", "997",
                             "--output", str(out), "--nonblocking"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _print_profile(path: Path, top: int = 30) -> None:
    """The functions in most of the gateway's CPU samples (inclusive), and the ones sampled running (self)."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [re.sub(r" \(.*?/(site-packages|lib/python3\.\d+)/", " (", f) for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    print(f"py-spy: {total:,} samples of the gateway's CPU; the most sampled functions:")
    print("  inclusive:")
    for frame, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {100 * n / total:5.1f}%  {frame}")
    print("  self:")
    for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {100 * n / total:5.1f}%  {frame}")


def _figures(p50: dict[str, list[float]], totals: dict[str, float], count: int, fsync_ms: float) -> dict[str, Any]:
    def mean_ms(name: str) -> float:
        n = totals.get(f"{name}_count", 0.0)
        return 1000 * totals.get(f"{name}_sum", 0.0) / n if n else 0.0

    def per_call_ms(function: str, what: str = "total_ms") -> float:
        calls = totals.get(f"{function}:calls", 0.0)
        return totals.get(f"{function}:{what}", 0.0) / calls if calls else 0.0

    def per_request_ms(name: str) -> float:
        # A statement's time per billed call (under a quota grant a call runs no hold statement at all).
        return 1000 * totals.get(f"{name}_sum", 0.0) / count if count else 0.0

    med = {name: statistics.median(values) for name, values in p50.items()}
    gateway = mean_ms("meterline_request_duration_seconds")
    upstream = mean_ms("meterline_upstream_duration_seconds")
    reserve = per_request_ms("meterline_ledger_batch_commit_seconds:reserve")
    settle = per_request_ms("meterline_ledger_batch_commit_seconds:settle")
    quota = per_request_ms("meterline_ledger_batch_commit_seconds:quota_settle")
    syncs = totals.get("wal:wal_sync", 0.0)
    return {
        "requests": count,
        "p50_ms": med,
        "added_p50_ms": {name: med[name] - med["direct"] for name in ("bare-proxy", "meterline")},
        "gateway_ms": gateway,
        "upstream_ms": upstream,
        "reserve_statement_ms": reserve,
        "settle_statement_ms": settle,
        "quota_statement_ms": quota,
        "gateway_own_ms": gateway - upstream - reserve - settle - quota,
        "gateway_cpu_ms": 1000 * totals.get("gateway_cpu_s", 0.0) / count if count else 0.0,
        "db_cpu_ms": 1000 * totals.get("db_cpu_s", 0.0) / count if count else 0.0,
        "relay_cpu_ms": 1000 * totals.get("relay_cpu_s", 0.0) / max(totals.get("relay_calls", 0.0), 1.0),
        "in_reserve_ms": per_call_ms("meterline_reserve"),
        "in_settle_ms": per_call_ms("meterline_settle"),
        "in_settle_self_ms": per_call_ms("meterline_settle", "self_ms"),
        "in_quota_settle_ms": per_call_ms("meterline_quota_settle"),
        "quota_settles_per_call": totals.get("meterline_quota_settle:calls", 0.0) / count if count else 0.0,
        "in_record_ms": per_call_ms("meterline_record"),
        "in_grants_draw_ms": per_call_ms("meterline_grants_draw"),
        "in_key_release_ms": per_call_ms("meterline_key_release"),
        "wal_syncs_per_call": syncs / count if count else 0.0,
        "transactions_per_call": totals.get("db:xact_commit", 0.0) / count if count else 0.0,
        "rows_inserted_per_call": totals.get("db:tup_inserted", 0.0) / count if count else 0.0,
        "rows_updated_per_call": totals.get("db:tup_updated", 0.0) / count if count else 0.0,
        "wal_sync_ms": totals.get("wal:wal_sync_time", 0.0) / syncs if syncs else 0.0,
        "wal_write_ms_per_call": totals.get("wal:wal_write_time", 0.0) / count if count else 0.0,
        "fdatasync_ms": fsync_ms,
    }


def _print(f: dict[str, Any]) -> None:
    added = f["added_p50_ms"]
    rest_reserve = f["reserve_statement_ms"] - f["in_reserve_ms"] - f["wal_sync_ms"]
    rest_settle = f["settle_statement_ms"] - f["in_settle_ms"] - f["wal_sync_ms"]
    rest_quota = f["quota_statement_ms"] - f["in_quota_settle_ms"] - f["wal_sync_ms"]
    lines = [
        f"one billed call at concurrency 1, {f['requests']:,} calls (means per call unless a p50):",
        f"  added p50 over calling the upstream directly: meterline {added['meterline']:.3f} ms,"
        f" bare relay {added['bare-proxy']:.3f} ms",
        f"  time in the gateway (arrival to last byte)          {f['gateway_ms']:.3f} ms",
        f"    waiting for the upstream                           {f['upstream_ms']:.3f} ms",
    ]
    if f["quota_settles_per_call"] < 0.95:  # per-call holds (quotas off, or an account too small for one)
        lines += [
            f"    the hold's statement (round trip, commit included) {f['reserve_statement_ms']:.3f} ms",
            f"      inside meterline_reserve                         {f['in_reserve_ms']:.3f} ms",
            f"      one WAL flush (pg_stat_wal)                      {f['wal_sync_ms']:.3f} ms",
            f"      the rest: protocol, parse/plan, commit, wake-ups {rest_reserve:.3f} ms",
            f"    the charge's statement (round trip, commit incl.)  {f['settle_statement_ms']:.3f} ms",
            f"      inside meterline_settle                          {f['in_settle_ms']:.3f} ms"
            f"  (its own code {f['in_settle_self_ms']:.3f}; record {f['in_record_ms']:.3f};"
            f" grants {f['in_grants_draw_ms']:.3f}; key {f['in_key_release_ms']:.3f})",
            f"      one WAL flush (pg_stat_wal)                      {f['wal_sync_ms']:.3f} ms",
            f"      the rest: protocol, parse/plan, commit, wake-ups {rest_settle:.3f} ms",
        ]
    else:  # under the process's quota grant (all but the first calls)
        lines += [
            "    admitted under the process's quota grant: no statement before forwarding",
            f"    the charge's statement (round trip, commit incl.)  {f['quota_statement_ms']:.3f} ms",
            f"      inside meterline_quota_settle                    {f['in_quota_settle_ms']:.3f} ms",
            f"      one WAL flush (pg_stat_wal)                      {f['wal_sync_ms']:.3f} ms",
            f"      the rest: protocol, parse/plan, commit, wake-ups {rest_quota:.3f} ms",
        ]
    lines += [
        f"    the gateway's own work outside those               {f['gateway_own_ms']:.3f} ms",
        f"  CPU per call: gateway {f['gateway_cpu_ms']:.3f} ms (the bare relay's {f['relay_cpu_ms']:.3f} ms),"
        f" PostgreSQL {f['db_cpu_ms']:.3f} ms",
        f"  per call: {f['transactions_per_call']:.2f} transactions committed, {f['rows_inserted_per_call']:.2f} rows"
        f" inserted, {f['rows_updated_per_call']:.2f} updated",
        f"  WAL flushes per call {f['wal_syncs_per_call']:.2f}; fdatasync on the database's disk"
        f" {f['fdatasync_ms']:.3f} ms (median of 200)",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
