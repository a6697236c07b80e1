"""What a workload needs to drive one arm (where to send, which headers) and to measure it (whose CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from bench.procs import Service
from bench.upstream import MODEL


@dataclass
class Arm:
    name: str
    service: Service
    path: str = "/v1/chat/completions"
    header_sets: list[dict[str, str]] = field(default_factory=lambda: [{}])
    model: str = MODEL
    billed: bool = False  # a Meterline arm: its responses are checked against the ledger
    measure_cpu: bool = True  # False for the direct arm: the upstream's CPU is not a gateway's

    def job(self, *, prompt_bytes: int = 1024, stream: bool = False, **knobs: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": _prompt(prompt_bytes)}],
            "max_tokens": 16,
        }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return {"host": "127.0.0.1", "port": self.service.port, "path": self.path,
                "header_sets": self.header_sets, "body": json.dumps(body), "stream": stream,
                "collect_ids": self.billed, **knobs}


def _prompt(size: int) -> str:
    """`size` bytes of plain English-like text (tokenizers treat it as real words, not one long run)."""
    words = "the quick brown fox jumps over a lazy dog while metering every token "
    return (words * (size // len(words) + 1))[:size]


class Generator:
    """The load-generator process (bench.loadgen), fed one job per line."""

    def __init__(self, cpu: int | None) -> None:
        argv = [sys.executable, "-m", "bench.loadgen"] + (["--cpu", str(cpu)] if cpu is not None else [])
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the load generator exited")
        result: dict[str, Any] = json.loads(line)
        if "failed" in result:
            raise RuntimeError(f"load generator: {result['failed']}")
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


def configure_upstream(upstream: Service, **knobs: float) -> None:
    url = upstream.url + "/_bench/config"  # a loopback URL built here
    request = urllib.request.Request(url, data=json.dumps(knobs).encode(),  # noqa: S310
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 - loopback URL we built
        reply.read()
