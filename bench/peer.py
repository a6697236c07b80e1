"""LiteLLM's proxy as a peer arm, only where it is installed (never a dependency of Meterline).

It runs with one worker, no database (none can run offline here, which favours LiteLLM: it does no spend
writes), its bundled model-cost map instead of a download, and the fake upstream as an OpenAI-compatible model.
Found either in this interpreter or in the interpreter named by `--litellm-python` / METERLINE_BENCH_LITELLM_PYTHON.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

from bench.procs import Service, free_port
from bench.upstream import MODEL

MASTER_KEY = "sk-bench-litellm-master"


def find_python(explicit: str | None) -> str | None:
    """An interpreter that can import litellm's proxy, or None when there is none."""
    import sys

    candidates = [explicit, os.environ.get("METERLINE_BENCH_LITELLM_PYTHON")]
    if importlib.util.find_spec("litellm") is not None:
        candidates.append(sys.executable)
    for python in candidates:
        if not python:
            continue
        # find_spec does not import the (slow to import) packages; a broken install fails in start() instead.
        probe = subprocess.run([python, "-c", "import importlib.util as u, sys; sys.exit(any("
                                "u.find_spec(m) is None for m in ('litellm', 'fastapi', 'uvicorn')))"],
                               capture_output=True, timeout=60, check=False)
        if probe.returncode == 0:
            return python
    return None


def _env() -> dict[str, str]:
    return {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False",
            "DISABLE_SCHEMA_UPDATE": "True"}


def start(python: str, workdir: Path, upstream_base: str, *, cpu: int | None) -> Service:
    config = workdir / "litellm.yaml"
    config.write_text(f"""
model_list:
  - model_name: "{MODEL}"
    litellm_params:
      model: "openai/{MODEL}"
      api_base: "{upstream_base}"
      api_key: "upstream-secret-key"
litellm_settings:
  telemetry: false
  drop_params: true
general_settings:
  master_key: "{MASTER_KEY}"
""", encoding="utf-8")
    port = free_port()
    argv = [python, "-c", "import sys; from litellm import run_server; sys.exit(run_server())",
            "--config", str(config), "--port", str(port), "--host", "127.0.0.1", "--num_workers", "1"]
    service = Service("litellm", argv, port=port, log=workdir / "litellm.log", env=_env(), cpu=cpu,
                      health="/health/liveliness")
    service.wait_ready(timeout=180)
    return service
