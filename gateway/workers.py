"""`meterline serve --workers N`: N gateway processes listening on one port with SO_REUSEPORT.

The kernel spreads new connections over the processes. Each worker opens its own pool, upstream session and
background tasks; all of them are safe to run N times (the sweeper uses SKIP LOCKED, media jobs are leased, and
every money decision is made in PostgreSQL). The parent only supervises: each worker runs in its own process
group, so a signal reaches a worker exactly once, from the parent, which passes on the first SIGINT or SIGTERM it
gets and waits for the workers to finish their graceful shutdown (settlements in flight included).

Metrics add up over the workers (prometheus-client's multiprocess mode): before any worker starts, the parent
sets PROMETHEUS_MULTIPROC_DIR (inherited by the spawned workers, which read it when prometheus-client is first
imported) to a fresh directory of its own, or empties the one the operator set of a previous run's files. As each
worker exits, its live gauges are dropped (mark_process_dead); a directory the parent made is removed at the end.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
from pathlib import Path
from types import FrameType

from prometheus_client import multiprocess as prometheus_multiprocess

from gateway import metrics
from gateway.metrics import MULTIPROC_ENV


def _worker(database_url: str | None, host: str, port: int) -> None:
    os.setpgrp()  # a Ctrl-C in the terminal reaches the parent only; it forwards it once
    # A stop that arrives while the worker is still starting (before run_app has its own handlers) is a clean
    # exit, not a traceback.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        from gateway import admin_token, logs
        from gateway.app import serve
        from gateway.settings import load_settings

        # Spawned, not forked: the worker reads the same settings afresh, with the parent's database URL
        # (which may name the embedded server the parent started).
        settings, _ = admin_token.ensure(load_settings(database_url=database_url))  # the parent made it
        logs.configure(settings.log_format)
        serve(settings, host=host, port=port, reuse_port=True, print=None)
    except KeyboardInterrupt:
        return


def serve(database_url: str | None, *, host: str, port: int, workers: int) -> int:
    """Run `workers` worker processes until they all exit. The exit status is that of the first worker that
    failed on its own, else 0: once a stop has been passed on, how a worker ends is not a failure (one still
    in multiprocessing's start-up dies of the signal rather than shutting down, which is just as stopped)."""
    directory, made = metrics.fresh_directory()
    os.environ[MULTIPROC_ENV] = str(directory)  # before the workers are spawned: they inherit it
    try:
        return _supervise(database_url, host=host, port=port, workers=workers, directory=directory)
    finally:
        if made:
            shutil.rmtree(directory, ignore_errors=True)


def _supervise(database_url: str | None, *, host: str, port: int, workers: int, directory: Path) -> int:
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_worker, args=(database_url, host, port), name=f"meterline-worker-{i}")
             for i in range(workers)]
    stopping: int | None = None  # the signal passed on, once one arrived
    asked: set[int] = set()  # the workers that were sent it

    def stop(index: int) -> None:
        pid = procs[index].pid
        if stopping is not None and pid is not None and procs[index].is_alive():
            asked.add(index)
            os.kill(pid, stopping)

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping is not None:
            return
        stopping = signum
        for index in range(len(procs)):
            stop(index)

    # Handlers first: a signal that arrives while workers are being started stops each of them as it starts.
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    for index, proc in enumerate(procs):
        proc.start()
        stop(index)
    print(f"======== Running on http://{host}:{port} with {workers} workers ========", flush=True)
    for proc in procs:
        proc.join()
        if proc.pid is not None:
            prometheus_multiprocess.mark_process_dead(proc.pid, str(directory))  # type: ignore[no-untyped-call]
    return next((abs(proc.exitcode) for index, proc in enumerate(procs) if proc.exitcode and index not in asked), 0)
