"""Apply prefect.yaml to the stack's Prefect server (deployments, schedules, triggers)."""

from __future__ import annotations

import os
import subprocess

from fabloop.infra.settings import StackEndpoints
from fabloop.infra.stack import PROJECT_DIR, _bin, prefect_env

DEPLOYMENTS = ("ingest", "drift-check", "retrain", "promote")


def deploy(ep: StackEndpoints, timeout: float = 300) -> str:
    """``prefect deploy --all`` from the project directory; returns its output."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
        **prefect_env(ep),
        "FABLOOP_PROJECT_DIR": str(PROJECT_DIR),
    }
    proc = subprocess.run(
        [_bin("prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(PROJECT_DIR / "prefect.yaml")],
        cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"prefect deploy failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout
