"""`python -m bench`: start every arm on loopback, run the workloads, check the ledger, report against targets.

Layout on this 2-core machine: the gateways under test (bare proxy, Meterline, LiteLLM) are pinned to the first
CPU; the load generator and the fake upstream share the second; PostgreSQL floats. Everything started here is
stopped here, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench import meterline, peer, report, workloads
from bench.arms import Arm, Generator
from bench.procs import Service, cpus, fdatasync_ms, free_port, python_module

SPREAD_ACCOUNTS = 1000
RESULTS = Path("bench") / "results" / "latest.json"  # ignored by git


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a shorter run (about 2 minutes)")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where to write results ({RESULTS})")
    parser.add_argument("--database-url", default=None,
                        help="a PostgreSQL server to create a fresh database on (default: a new embedded one)")
    parser.add_argument("--workers", type=int, default=1, help="`meterline serve --workers N`")
    parser.add_argument("--litellm-python", default=None, help="an interpreter with litellm[proxy] installed")
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM arm even if installed")
    parser.add_argument("--no-meterline", action="store_true", help="only the direct and bare-proxy arms")
    parser.add_argument("--write-readme", action="store_true", help="write the table into README after the run")
    parser.add_argument("--readme-from", type=Path, default=None, metavar="JSON",
                        help="write README's table from a saved results file and exit")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, database)")
    return parser.parse_args(argv)


class Log:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.readme_from is not None:
        results = json.loads(args.readme_from.read_text())
        if not (results.get("gates") or {}).get("passed"):
            raise SystemExit("that run failed a correctness gate: it has no figures to publish")
        report.write_readme(report.markdown(report.targets(results), results))
        print(f"README updated from {args.readme_from}")
        return 0
    log = Log()
    profile = workloads.QUICK if args.quick else workloads.FULL
    available = cpus()
    gateway_cpu = available[0] if len(available) > 1 else None
    load_cpu = available[1] if len(available) > 1 else None
    work = meterline.workdir()
    results: dict[str, Any] = {"profile": "quick" if args.quick else "full", "machine": report.machine()}
    with contextlib.ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
        else:
            log(f"work directory kept: {work}")

        def service(name: str, argv: list[str], port: int, cpu: int | None, **kw: Any) -> Service:
            svc = Service(name, argv, port=port, log=work / f"{name}.log", cpu=cpu, **kw)
            stack.callback(svc.stop)
            svc.wait_ready()
            return svc

        up_port = free_port()
        upstream = service("upstream", python_module("bench.upstream", "--port", str(up_port)), up_port, load_cpu)
        upstream_base = f"{upstream.url}/v1"
        px_port = free_port()
        bare = service("bare-proxy", python_module("bench.proxy", "--port", str(px_port), "--upstream",
                                                   upstream_base), px_port, gateway_cpu)
        direct = Arm("direct", upstream, measure_cpu=False)
        gateways = [Arm("bare-proxy", bare)]
        billed: list[Arm] = []
        database = None
        customers = None
        config = None
        if args.no_meterline:
            log("Meterline arm skipped: --no-meterline")
        else:
            log("starting PostgreSQL and funding customers")
            database = stack.enter_context(meterline.database(args.database_url, work))
            customers = meterline.create_customers(database.url, SPREAD_ACCOUNTS)
            config = meterline.write_config(work, upstream_base)
            env = meterline.environment(database.url, config)
            svc = meterline.start(work, env, cpu=gateway_cpu, workers=args.workers)
            stack.callback(svc.stop)
            hot = Arm("meterline", svc, header_sets=[{"Authorization": f"Bearer {customers.hot_key}"}],
                      billed=True)
            spread = Arm("meterline-1000-accounts", svc, billed=True,
                         header_sets=[{"Authorization": f"Bearer {k}"} for k in customers.spread_keys])
            gateways.append(hot)
            billed = [hot, spread]
        litellm_python = None if args.no_litellm else peer.find_python(args.litellm_python)
        if litellm_python:
            log(f"starting LiteLLM's proxy ({litellm_python})")
            svc = peer.start(litellm_python, work, upstream_base, cpu=gateway_cpu)
            stack.callback(svc.stop)
            gateways.append(Arm("litellm", svc, header_sets=[{"Authorization": f"Bearer {peer.MASTER_KEY}"}]))
        else:
            log("LiteLLM arm skipped: litellm[proxy] is not installed")
        results["arms"] = [direct.name] + [a.name for a in gateways]

        gen = Generator(load_cpu)
        stack.callback(gen.stop)
        book = meterline.Ledgerbook()
        bench = workloads.Bench(gen, upstream, profile, book, database)
        main_arm = billed[0] if billed else gateways[0]
        fast = [a for a in gateways if a.name != "litellm"]

        log("warming up")
        workloads.warm_up(bench, gateways + billed[1:])
        log("non-streaming latency at concurrency 1")
        results["latency_c1"] = workloads.latency_c1(bench, gateways, direct)
        log("closed-loop concurrency sweep")
        results["sweep"] = workloads.sweep(bench, gateways, direct)
        rate = 0.5 * (results["sweep"]["best"][main_arm.name]["max_rps"] or 100)
        log(f"50 ms upstream, open loop at {rate:.0f} req/s")
        results["open_50ms"] = workloads.open_loop_50ms(bench, fast, direct, rate)
        log("streaming")
        results["streaming"] = workloads.streaming(bench, fast, direct)
        log("prompt sizes")
        results["prompts"] = workloads.prompt_sizes(bench, fast, direct)
        if billed:
            level = results["sweep"]["best"][main_arm.name]["at_concurrency"]
            log(f"one hot account vs {SPREAD_ACCOUNTS} accounts")
            results["accounts"] = workloads.hot_vs_spread(bench, billed[0], billed[1], level)
            log("--workers 2 against --workers 1, neither pinned")
            assert database is not None and customers is not None and config is not None
            env = meterline.environment(database.url, config)
            scaling = []
            for workers in (1, 2):
                svc = meterline.start(work, env, cpu=None, workers=workers, name=f"meterline-workers-{workers}")
                stack.callback(svc.stop)
                scaling.append(Arm(f"meterline-workers-{workers}", svc, billed=True,
                                   header_sets=[{"Authorization": f"Bearer {customers.hot_key}"}]))
            workloads.warm_up(bench, scaling)
            results["workers"] = workloads.workers_scaling(bench, scaling[0], scaling[1], level)
            log(f"RSS over {profile.rss_total:,} requests")
            results["rss"] = workloads.rss_growth(bench, billed[0])
            log("checking the ledger")
            assert database is not None and customers is not None and config is not None
            failures = meterline.gates(database.url, config, customers, book)
            results["gates"] = {"passed": not failures, "failures": failures, "billed_responses": book.ok,
                                "charged_micros": book.cost_sum}
        else:
            results["gates"] = {"passed": True, "failures": [], "billed_responses": 0,
                                "note": "no Meterline arm: nothing was billed"}
        # The price of one durable commit on the database's disk (for an external server, the work directory's:
        # its own disk is not known here), against which the added latency is judged.
        results["commit_ms"] = fdatasync_ms(work / "pgdata" if (work / "pgdata").is_dir() else work)
        log("stopping")
    return _finish(args, results)


def _finish(args: argparse.Namespace, results: dict[str, Any]) -> int:
    gates = results["gates"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if not gates["passed"]:
        withheld = {"profile": results["profile"], "machine": results["machine"], "gates": gates}
        args.json.write_text(json.dumps(withheld, indent=1))
        print("CORRECTNESS GATES FAILED: this run reports no figures.")
        for failure in gates["failures"]:
            print(f"  - {failure}")
        return 1
    found = report.targets(results)
    results["targets"] = [t.__dict__ | {"verdict": t.verdict()} for t in found]
    args.json.write_text(json.dumps(results, indent=1))
    m = results["machine"]
    print(f"\nMeterline benchmark ({results['profile']}), {m['date']}, {m['cores']} cores, {m['cpu']}, "
          f"Python {m['python']}")
    print(f"Correctness gates passed: {gates['billed_responses']:,} billed responses, "
          f"{gates.get('charged_micros', 0):,} micros charged, ledger verified.\n")
    print(report.arm_table(results) + "\n")
    print(report.table(found))
    print(f"\nresults: {args.json}")
    if args.write_readme:
        report.write_readme(report.markdown(found, results))
        print("README updated")
    return 0
