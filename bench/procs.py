"""Processes the benchmark starts: launch, pin to a CPU, wait until they answer, read their CPU time and RSS
from /proc, and stop them (always, bounded in time)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


class Service:
    """A child process serving HTTP on 127.0.0.1:`port`; its output goes to `log`."""

    def __init__(self, name: str, argv: list[str], *, port: int, log: Path, env: dict[str, str] | None = None,
                 cpu: int | None = None, health: str = "/healthz") -> None:
        self.name = name
        self.port = port
        self.cpu = cpu
        self.health = health
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if cpu is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(self.proc.pid, {cpu})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log}:\n"
                                   + self.log.read_text(errors="replace")[-2000:])
            try:
                with urllib.request.urlopen(self.url + self.health, timeout=2) as reply:  # noqa: S310
                    if reply.status < 500:
                        self.pin_tree()
                        return
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    self.pin_tree()
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer on {self.url + self.health} within {timeout:.0f}s")

    def pids(self) -> list[int]:
        return [self.proc.pid, *descendants(self.proc.pid)]

    def pin_tree(self) -> None:
        if self.cpu is None:
            return
        for pid in self.pids():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, {self.cpu})

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def rss_bytes(self) -> int:
        return sum(rss_bytes(pid) for pid in self.pids())

    def stop(self, timeout: float = 10.0) -> None:
        below = [(pid, start_time(pid)) for pid in descendants(self.proc.pid)]
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        for pid, started in below:  # a worker that outlived its parent (its own session, or a killed parent)
            if started is not None and start_time(pid) == started:  # the same process, not a reused pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._out.close()


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (workers, forked helpers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except OSError:
        return 0


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def fdatasync_ms(directory: Path, times: int = 200) -> float:
    """The median time of one 8 KiB write + fdatasync in `directory`: the price of one durable commit on its disk."""
    path = directory / "fdatasync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = os.urandom(8192)
        took = []
        for i in range(times):
            os.pwrite(fd, block, (i % 16) * 8192)
            started = time.perf_counter()
            os.fdatasync(fd)
            took.append(time.perf_counter() - started)
        return statistics.median(took) * 1000
    finally:
        os.close(fd)
        path.unlink()
