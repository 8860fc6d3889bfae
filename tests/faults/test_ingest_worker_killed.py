"""Ingest killed with its worker (SIGKILL) on the session's stack comes back by itself.

A flow run whose process dies with the worker stays "Running" in Prefect: no state
event follows, so the ingest deployment's trigger on Crashed never fires. Ingest runs
beat every 30 s (prefect.yaml), and the automation ``fabloop deploy`` adds marks a
run silent for 90 s Crashed; the trigger then starts a new ingest run. Nothing here
touches the runs: only the worker is killed and started again.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from fabloop.adapters import store
from fabloop.adapters.run_states import flow_run_status
from fabloop.core.names import INGEST_DEPLOYMENT
from fabloop.deployments.process import SILENT_INGEST_AUTOMATION
from tests.helpers import faults
from tests.helpers import prefect_api as pa
from tests.helpers.stack import RunningStack
from tests.helpers.waiting import wait_for as _wait

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def ingest_runs(stack: RunningStack, deployments: None) -> Iterator[datetime]:
    """The ingest runs this test causes are cancelled afterwards (their processes end on the worker)."""
    since = datetime.now(UTC)
    yield since
    for run in pa.runs_of_flow(stack, "ingest", since):
        if run["state_type"] not in pa.FINAL:
            to = ("CANCELLING", "Cancelling") if run["start_time"] else ("CANCELLED", "Cancelled")
            pa.api(stack, "POST", f"/flow_runs/{run['id']}/set_state",
                   {"state": {"type": to[0], "name": to[1], "message": "test teardown"}, "force": True})


def test_ingest_killed_with_its_worker_is_marked_crashed_and_started_again(
    stack: RunningStack, ingest_runs: datetime
) -> None:
    from prefect.deployments import run_deployment

    automations = pa.api(stack, "POST", "/automations/filter", {"limit": 200})
    assert [a["enabled"] for a in automations if a["name"] == SILENT_INGEST_AUTOMATION] == [True]

    first = str(run_deployment(INGEST_DEPLOYMENT, timeout=0).id)  # type: ignore[union-attr]

    def beating() -> bool:  # running, and Prefect has its heartbeats
        status = store.run_sync(flow_run_status(first))
        return bool(status and status.state == "RUNNING" and status.last_heartbeat)

    _wait("the ingest run beating", beating, timeout=150)
    pids = faults.kill(stack, "worker")
    assert len(pids) >= 2, pids  # the worker and the ingest run's process
    killed_at = datetime.now(UTC)
    faults.restart(stack)
    assert pa.flow_run(stack, first)["state_type"] == "RUNNING"  # what Prefect believes: nobody said otherwise

    def replaced() -> bool:
        runs = pa.runs_of_flow(stack, "ingest", ingest_runs)
        return pa.flow_run(stack, first)["state_type"] == "CRASHED" and any(
            r["id"] != first and r["state_type"] == "RUNNING" for r in runs)

    _wait("the silent run Crashed and a new ingest run Running", replaced, timeout=300)
    crashed = pa.flow_run(stack, first)
    assert "silent" in crashed["state"]["message"], crashed["state"]
    (second,) = [r for r in pa.runs_of_flow(stack, "ingest", ingest_runs) if r["id"] != first]
    assert datetime.fromisoformat(second["created"]) > killed_at
