"""The process work pool: flow runs are subprocesses of the stack's worker, in this checkout.

``prefect.yaml`` holds the deployments themselves (entrypoints, triggers,
schedules); this module holds what they share on this pool type, the pool and
the pull step, and applies the file. ``tests/unit/test_deployments.py`` keeps the
two in step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from fabloop.infra.settings import WORK_POOL, WORK_POOL_TYPE, StackEndpoints, prefect_env
from fabloop.infra.stack import PROJECT_DIR, executable

PREFECT_YAML = PROJECT_DIR / "prefect.yaml"
PROJECT_DIR_VAR = "FABLOOP_PROJECT_DIR"
"""Where the worker finds the code: the checkout ``deploy`` runs from."""
PYTHON_VAR = "FABLOOP_PYTHON"
"""The interpreter a run's engine starts with: the one ``deploy`` runs in (this checkout's venv)."""

PULL_STEPS: list[dict[str, Any]] = [
    {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $" + PROJECT_DIR_VAR + " }}"}},
]
"""Nothing is built or pushed: a run starts in the project directory and loads ``flows/<file>.py``."""

__all__ = ["PREFECT_YAML", "PROJECT_DIR_VAR", "PYTHON_VAR", "PULL_STEPS", "WORK_POOL", "WORK_POOL_TYPE", "deploy"]


def deploy(ep: StackEndpoints, timeout: float = 300) -> str:
    """``prefect deploy --all`` of ``prefect.yaml`` from the project directory; returns its output."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
        **prefect_env(ep),
        PROJECT_DIR_VAR: str(PROJECT_DIR),
        PYTHON_VAR: sys.executable,
    }
    proc = subprocess.run(
        [executable("prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_YAML)],
        cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"prefect deploy failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout
