"""Shared by the benchmarks that run each configuration in its own launch: run it, return the JSON it wrote."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_for_json(command: list[str], out: Path, **env: str):
    """Run `command` from the repository root with one thread per process (plus `env`); the JSON at `out`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **env)
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return json.loads(Path(out).read_text())
