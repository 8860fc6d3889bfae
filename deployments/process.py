"""The process work pool: each flow run's launcher is a subprocess of the stack's worker, in this checkout.

Its engine is forked by the stack's fork server, or started by the launcher itself
(``fabloop.infra.launcher``).

``prefect.yaml`` holds the deployments themselves (entrypoints, triggers,
schedules); this module holds what they share on this pool type, the pool and
the pull step, and applies the file. ``tests/unit/test_deployments.py`` keeps the
two in step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

from fabloop.deployments.notifications import ensure_notification_automations
from fabloop.infra.bootstrap import prefect_api
from fabloop.infra.settings import WORK_POOL, WORK_POOL_TYPE, StackEndpoints, prefect_env
from fabloop.infra.stack import PROJECT_DIR, executable

PREFECT_YAML = PROJECT_DIR / "prefect.yaml"
PROJECT_DIR_VAR = "FABLOOP_PROJECT_DIR"
"""Where the worker finds the code: the checkout ``deploy`` runs from."""
PYTHON_VAR = "FABLOOP_PYTHON"
"""The interpreter a run's launcher starts with: the one ``deploy`` runs in (this checkout's venv)."""

PULL_STEPS: list[dict[str, Any]] = [
    {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $" + PROJECT_DIR_VAR + " }}"}},
]
"""Nothing is built or pushed: a run starts in the project directory and loads ``flows/<file>.py``."""

__all__ = ["PREFECT_YAML", "PROJECT_DIR_VAR", "PYTHON_VAR", "PULL_STEPS", "WORK_POOL", "WORK_POOL_TYPE", "deploy"]


def deploy(ep: StackEndpoints, timeout: float = 300, notify_block: str | None = None) -> str:
    """``prefect deploy --all`` of ``prefect.yaml`` from the project directory; returns its output.

    Then the automations ``prefect.yaml`` cannot hold: the silent-ingest one, and the
    notifications through the block named ``notify_block`` (:mod:`fabloop.deployments.notifications`).
    """
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
    ensure_silent_ingest_automation(ep)
    ensure_notification_automations(ep, notify_block)
    return proc.stdout


SILENT_INGEST_AUTOMATION = "crash silent ingest runs"
SILENT_AFTER = timedelta(seconds=90)
"""Three missed heartbeats of an ingest run (prefect.yaml: it beats every 30 s)."""


def silent_ingest_automation() -> AutomationCore:
    """Prefect's documented zombie-run automation, for ingest runs (tag ``ingest``) only.

    After each heartbeat of an ingest run, another heartbeat or a final state is
    expected within ``SILENT_AFTER``; otherwise the run is marked Crashed, and the
    ingest deployment's own trigger on Crashed starts a new run. A promotion (suspended,
    with no process, while it waits) beats no heartbeat and is not matched. ``prefect.yaml`` cannot hold it: a
    deployment trigger can only run its deployment.
    """
    return AutomationCore(
        name=SILENT_INGEST_AUTOMATION,
        description="An ingest run silent for 90 s (its process died with the worker) is marked Crashed, "
                    "and the ingest deployment's trigger starts it again.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.id": "prefect.tag.ingest",
                                                 "prefect.resource.role": "tag"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=SILENT_AFTER,
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message="ingest run silent: no heartbeat for 90 s")],
    )


def ensure_silent_ingest_automation(ep: StackEndpoints) -> None:
    """Create the automation, or bring an existing one of that name up to date."""
    wanted = silent_ingest_automation()
    with prefect_api(ep), get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(SILENT_INGEST_AUTOMATION)
        if existing:
            client.update_automation(existing[0].id, wanted)
        else:
            client.create_automation(wanted)
