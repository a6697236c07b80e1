"""The load generator: a lean HTTP/1.1 keep-alive client on asyncio protocols, run as its own process.

It reads one job per line (JSON) on stdin and answers one summary per line on stdout, so the orchestrator can
interleave arms without paying a process start per job. Requests are pre-encoded bytes and responses are parsed
just enough (status, length or chunked framing, two headers), which keeps the generator several times faster
than any gateway it drives. Closed loop: `concurrency` connections each send the next request when the last one
answers. Open loop: requests start on a fixed schedule of `rate` per second and latency is measured from the
scheduled start, so a slow server cannot hide its queueing (no coordinated omission).

    python -m bench.loadgen --cpu 1      # then write jobs to its stdin
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

_COST = re.compile(rb'"cost_micros"\s*:\s*(\d+)')


@dataclass(slots=True)
class Reply:
    status: int
    cost: bytes | None
    request_id: bytes | None
    body: bytes
    first_byte: float  # perf_counter() when the first body bytes arrived (0 when the body was empty)


class Connection(asyncio.Protocol):
    """One keep-alive connection; `send` writes a whole request and resolves with its parsed reply."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[Reply] | None = None
        self.lost = False
        self._start()

    def _start(self) -> None:
        self.head_done = False
        self.status = 0
        self.length = -1
        self.chunked = False
        self.close_after = False
        self.cost: bytes | None = None
        self.request_id: bytes | None = None
        self.body = bytearray()
        self.first_byte = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("the server closed the connection"))

    def send(self, payload: bytes) -> asyncio.Future[Reply]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self._step():
            pass

    def _step(self) -> bool:
        """Parse what the buffer holds; True when progress was made and parsing should go on."""
        buf = self.buf
        if not self.head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            lines = bytes(buf[:end]).split(b"\r\n")
            del buf[: end + 4]
            self.status = int(lines[0].split(b" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    self.length = int(value)
                elif name == b"transfer-encoding":
                    self.chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    self.close_after = value.strip().lower() == b"close"
                elif name == b"x-cost-micros":
                    self.cost = value.strip()
                elif name == b"x-request-id":
                    self.request_id = value.strip()
            self.head_done = True
            if not self.chunked and self.length < 0:
                self.length = 0
            return True
        if self.chunked:
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                return False
            size = int(bytes(buf[:line_end]).split(b";")[0], 16)
            if size == 0:
                if len(buf) < line_end + 4:
                    return False
                del buf[: line_end + 4]
                self._finish()
                return True
            if len(buf) < line_end + 2 + size + 2:
                return False
            if not self.first_byte:
                self.first_byte = time.perf_counter()
            self.body += buf[line_end + 2: line_end + 2 + size]
            del buf[: line_end + 2 + size + 2]
            return True
        if len(buf) < self.length:
            return False
        if self.length:
            self.first_byte = time.perf_counter()
        self.body += buf[: self.length]
        del buf[: self.length]
        self._finish()
        return True

    def _finish(self) -> None:
        reply = Reply(self.status, self.cost, self.request_id, bytes(self.body), self.first_byte)
        close = self.close_after
        self._start()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(reply)
        if close and self.transport is not None:
            self.transport.close()


@dataclass
class Tally:
    """Everything measured in one job."""

    stream: bool
    expect_chunks: int
    collect_ids: bool
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    chunks: int = 0
    bad_streams: int = 0
    cost_sum: int = 0
    missing_cost: int = 0
    ids: list[str] = field(default_factory=list)
    first: float = 0.0
    last: float = 0.0

    def add(self, started: float, reply: Reply) -> None:
        done = time.perf_counter()
        self.last = max(self.last, done)
        self.statuses[reply.status] = self.statuses.get(reply.status, 0) + 1
        if not 200 <= reply.status < 300:
            return
        self.latencies.append(done - started)
        cost = reply.cost
        if self.stream:
            self.ttfts.append(reply.first_byte - started)
            content = reply.body.count(b'"content"')
            # The first chunk (role + empty content) counts as one; a stream is whole when every chunk and
            # the terminator arrived.
            self.chunks += content
            if content != self.expect_chunks + 1 or not reply.body.rstrip().endswith(b"data: [DONE]"):
                self.bad_streams += 1
            if cost is None:
                found = _COST.findall(reply.body)
                cost = found[-1] if found else None
        elif cost is None:
            found = _COST.search(reply.body)
            cost = found.group(1) if found else None
        if cost is None:
            self.missing_cost += 1
        else:
            self.cost_sum += int(cost)
        if self.collect_ids and reply.request_id is not None:
            self.ids.append(reply.request_id.decode())

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        ttft = sorted(self.ttfts)
        ok = len(lat)
        elapsed = max(self.last - self.first, 1e-9)
        out: dict[str, Any] = {
            "ok": ok,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": self.errors,
            "elapsed_s": elapsed,
            "rps": ok / elapsed,
            "p50_ms": _pct(lat, 0.50), "p90_ms": _pct(lat, 0.90), "p99_ms": _pct(lat, 0.99),
            "max_ms": lat[-1] * 1000 if lat else None,
            "mean_ms": sum(lat) / ok * 1000 if ok else None,
            "cost_sum": self.cost_sum, "missing_cost": self.missing_cost,
        }
        if self.stream:
            out.update(ttft_p50_ms=_pct(ttft, 0.50), ttft_p99_ms=_pct(ttft, 0.99), chunks=self.chunks,
                       bad_streams=self.bad_streams)
        if self.collect_ids:
            out["ids"] = self.ids
        return out


def _pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted seconds, in milliseconds."""
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def _payloads(job: dict[str, Any]) -> list[bytes]:
    body = job["body"].encode()
    host = f"{job['host']}:{job['port']}"
    out = []
    for headers in job.get("header_sets") or [{}]:
        lines = [f"POST {job['path']} HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
                 f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        out.append(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return out


async def _connect(job: dict[str, Any]) -> Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(Connection, job["host"], job["port"])
    return conn


async def _exchange(job: dict[str, Any], conn: Connection, payload: bytes,
                    tally: Tally, started: float) -> Connection | None:
    """One request on `conn`; returns the connection to reuse (None when it broke)."""
    try:
        if conn.lost:
            conn = await _connect(job)
        reply = await asyncio.wait_for(conn.send(payload), timeout=job.get("timeout_s", 30.0))
    except (OSError, TimeoutError):
        tally.errors += 1
        if conn.transport is not None:
            conn.transport.close()
        return None
    tally.add(started, reply)
    return None if conn.lost else conn


async def closed_loop(job: dict[str, Any], tally: Tally) -> None:
    payloads = _payloads(job)
    budget = [int(job.get("requests", 10**9))]
    counter = [0]
    conns = [await _connect(job) for _ in range(job["concurrency"])]
    deadline = time.perf_counter() + job["duration_s"]
    tally.first = time.perf_counter()

    async def worker(conn: Connection | None) -> None:
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            counter[0] += 1
            if conn is None:
                try:
                    conn = await _connect(job)
                except OSError:
                    tally.errors += 1
                    await asyncio.sleep(0.01)
                    continue
            payload = payloads[counter[0] % len(payloads)]
            conn = await _exchange(job, conn, payload, tally, time.perf_counter())
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    await asyncio.gather(*(worker(c) for c in conns))


async def open_loop(job: dict[str, Any], tally: Tally) -> None:
    payloads = _payloads(job)
    rate = float(job["rate"])
    total = min(int(rate * job["duration_s"]), int(job.get("requests", 10**9)))
    idle: deque[Connection] = deque()
    for _ in range(int(job.get("preconnect", 16))):
        idle.append(await _connect(job))
    tasks: set[asyncio.Task[None]] = set()

    async def one(started: float, payload: bytes) -> None:
        conn: Connection | None = idle.pop() if idle else None
        if conn is None:
            try:
                conn = await _connect(job)
            except OSError:
                tally.errors += 1
                return
        kept = await _exchange(job, conn, payload, tally, started)
        if kept is not None:
            idle.append(kept)

    start = time.perf_counter() + 0.02
    tally.first = start
    for i in range(total):
        when = start + i / rate
        delay = when - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(when, payloads[i % len(payloads)]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=job.get("timeout_s", 30.0) + 5)
    for conn in idle:
        if conn.transport is not None:
            conn.transport.close()


async def run_job(job: dict[str, Any]) -> dict[str, Any]:
    tally = Tally(stream=bool(job.get("stream")), expect_chunks=int(job.get("expect_chunks", 0)),
                  collect_ids=bool(job.get("collect_ids")))
    if job.get("mode", "closed") == "open":
        await open_loop(job, tally)
    else:
        await closed_loop(job, tally)
    return tally.summary()


async def serve(stdin: Any, stdout: Any) -> None:
    for line in stdin:
        job = json.loads(line)
        if job.get("op") == "quit":
            return
        try:
            result = await run_job(job)
        except (OSError, ValueError, KeyError) as exc:
            result = {"failed": f"{type(exc).__name__}: {exc}"}
        stdout.write(json.dumps(result) + "\n")
        stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    args = parser.parse_args()
    if args.cpu is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {args.cpu})
    asyncio.run(serve(sys.stdin, sys.stdout))


if __name__ == "__main__":
    main()
