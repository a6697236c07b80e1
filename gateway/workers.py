"""`meterline serve --workers N`: N gateway processes listening on one port with SO_REUSEPORT.

The kernel spreads new connections over the processes. Each worker opens its own pool, upstream session and
background tasks; all of them are safe to run N times (the sweeper uses SKIP LOCKED, media jobs are leased, and
every money decision is made in PostgreSQL). The parent only supervises: each worker runs in its own process
group, so a signal reaches a worker exactly once, from the parent, which passes on the first SIGINT or SIGTERM it
gets and waits for the workers to finish their graceful shutdown (settlements in flight included).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from types import FrameType

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _worker(database_url: str | None, host: str, port: int) -> None:
    os.setpgrp()  # a Ctrl-C in the terminal reaches the parent only; it forwards it once
    # A stop that arrives while the worker is still starting (before run_app has its own handlers) is a clean
    # exit, not a traceback.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        from aiohttp import web
        from aiohttp.log import access_logger

        from gateway.app import create_app
        from gateway.settings import load_settings

        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        # Spawned, not forked: the worker reads the same settings afresh, with the parent's database URL
        # (which may name the embedded server the parent started).
        settings = load_settings(database_url=database_url)
        web.run_app(create_app(settings), host=host, port=port, reuse_port=True, print=None,
                    access_log=access_logger if settings.access_log else None)
    except KeyboardInterrupt:
        return


def serve(database_url: str | None, *, host: str, port: int, workers: int) -> int:
    """Run `workers` worker processes until they all exit; the exit status is the first failure's, else 0."""
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_worker, args=(database_url, host, port), name=f"meterline-worker-{i}")
             for i in range(workers)]
    forwarded = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal forwarded
        if forwarded:
            return
        forwarded = True
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)

    for proc in procs:
        proc.start()
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    print(f"======== Running on http://{host}:{port} with {workers} workers ========", flush=True)
    for proc in procs:
        proc.join()
    return next((abs(proc.exitcode) for proc in procs if proc.exitcode), 0)
