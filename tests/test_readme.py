"""README's "First steps", run as they are written: every `sh` block of that section, in order, in one bash, in a
fresh directory, with `meterline` and `python` meaning this checkout and the interpreter running the tests. Only the
environment differs from a newcomer's shell: a free port (the block reads METERLINE_PORT), no remote catalog (no
test reaches the real OpenRouter) and no inherited METERLINE_* variable. Each step's answer is checked, so a README
that no longer works fails here."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.serving import free_port

BASH = shutil.which("bash") or "/bin/bash"
# Stops whatever the blocks left running in the background (the server), gracefully, however the script ends.
_PROLOGUE = "set -eo pipefail\ntrap 'kill -INT $(jobs -p) 2>/dev/null; wait' EXIT\n"


def first_steps_blocks(readme: str) -> list[str]:
    """The ```sh blocks of the "First steps" section (up to the next heading of any level)."""
    section = readme.split("\n## First steps\n", 1)[1]
    section = re.split(r"\n#{2,3} ", section, maxsplit=1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


def outputs(text: str) -> list[Any]:
    """What the script printed, in order: each JSON document (compact or indented) parsed, each other line as text."""
    decoder = json.JSONDecoder()
    items: list[Any] = []
    index = 0
    while index < len(text):
        if text[index].isspace():
            index += 1
        elif text[index] in "{[":
            value, index = decoder.raw_decode(text, index)
            items.append(value)
        else:
            end = text.find("\n", index)
            end = len(text) if end == -1 else end
            items.append(text[index:end])
            index = end
    return items


def shims(bin_dir: Path) -> None:
    """`meterline` as this checkout's CLI and `python` as the interpreter running the tests."""
    bin_dir.mkdir()
    python = f'"{sys.executable}"'
    for name, command in (("meterline", f'{python} -m gateway.cli "$@"'), ("python", f'{python} "$@"')):
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\nexec {command}\n")
        path.chmod(0o755)


@pytest.mark.timeout(300)
def test_first_steps_work_when_copied_in_order(tmp_path: Path) -> None:
    blocks = first_steps_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) == 2, "First steps: the HTTP walk-through and its command-line equivalent"
    shims(tmp_path / "bin")
    work = tmp_path / "fresh"
    work.mkdir()
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")},
           "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "METERLINE_PORT": str(port), "METERLINE_REMOTE_CATALOG": "false"}
    # Between the blocks: the id and key the first one kept, so the test can check them against what came after.
    between = 'printf "first account %s key %s\\n" "$ACCOUNT" "$KEY"\n'
    script = _PROLOGUE + blocks[0] + between + blocks[1]
    run = subprocess.run([BASH, "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=280,
                         check=False)
    log = (work / "meterline.log").read_text(errors="replace") if (work / "meterline.log").exists() else ""
    assert run.returncode == 0, f"stderr:\n{run.stderr}\nstdout:\n{run.stdout}\nmeterline.log:\n{log[-3000:]}"

    ready, topup, balance, dry_run, kept, key, topup_cli, verified = outputs(run.stdout)
    # The first block, over HTTP: the server answered, the account was funded, the customer sees it.
    assert (ready["status"], ready["checks"]) == ("ready", {"database": "ok"})
    kept_match = re.fullmatch(r"first account (acct_[0-9a-f]{24}) key (ml-\S+)", kept)
    assert kept_match is not None, kept
    account_id, secret = kept_match.groups()
    assert (topup["account_id"], topup["kind"], topup["amount_micros"], topup["balance_micros"]) == (
        account_id, "topup", 12_500_000, 12_500_000)
    assert (balance["available_micros"], balance["balance_micros"], balance["held_micros"]) == (12_500_000,
                                                                                               12_500_000, 0)
    assert (dry_run["estimated"], dry_run["model"], dry_run["available_micros"]) == (
        True, "google/gemini-3-flash-preview", 12_500_000)
    assert dry_run["components"][1] == {"type": "output", "metric": "token", "quantity": 100,
                                        "billable_quantity": 100, "unit_price_micros_per_mtok": 3_000_000,
                                        "total_cost_micros": 300}  # 100 tokens at $3 per million
    assert dry_run["total_cost_micros"] == dry_run["components"][0]["total_cost_micros"] + 300
    # The second block, on the database: a second account, its key and top-up, and a ledger that verifies.
    assert key["key"].startswith("ml-") and key["key"] != secret and key["account_id"] != account_id
    assert (topup_cli["object"], topup_cli["account_id"], topup_cli["balance_micros"], topup_cli["replayed"]) == (
        "topup", key["account_id"], 12_500_000, False)
    assert verified.startswith("ledger verified")
    # The server the first block started made its admin token on this fresh directory, and was stopped.
    assert (work / ".meterline" / "admin-token").stat().st_mode & 0o777 == 0o600
    assert not (work / ".meterline" / "pgdata" / "postmaster.pid").exists()
