"""`meterline serve --workers N`: N gateway processes listening on one port with SO_REUSEPORT.

The kernel spreads new connections over the processes. Each worker opens its own pool, upstream session and
background tasks; all of them are safe to run N times (the sweeper uses SKIP LOCKED, media jobs are leased, and
every money decision is made in PostgreSQL). The parent only supervises: Ctrl-C reaches the whole process group,
so the parent ignores SIGINT and waits; a SIGTERM sent to the parent alone is passed on to each worker once.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from types import FrameType

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _worker(database_url: str | None, host: str, port: int) -> None:
    from aiohttp import web

    from gateway.app import create_app
    from gateway.settings import load_settings

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    # Spawned, not forked: the worker reads the same settings afresh, with the parent's database URL (which
    # may name the embedded server the parent started).
    settings = load_settings(database_url=database_url)
    web.run_app(create_app(settings), host=host, port=port, reuse_port=True, print=None)


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
                os.kill(proc.pid, signal.SIGTERM)

    for proc in procs:
        proc.start()
    # Set after the start: an ignored SIGINT would be inherited by the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, forward)
    print(f"======== Running on http://{host}:{port} with {workers} workers ========", flush=True)
    for proc in procs:
        proc.join()
    return next((abs(proc.exitcode) for proc in procs if proc.exitcode), 0)
