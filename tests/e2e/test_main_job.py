"""The main job, end to end, on its own embedded stack: the README's run command, then ``fabloop down``.

``fabloop up`` and ``fabloop run --approve-as alice`` start in the background with the
session (tests.helpers.mainjob); when the job ends, its stack is read (MLflow, the
event store) and taken down with everything the job left running (the ingest flow
run and the drift checks still queued among them). These tests run last and
assert on that record.
"""

from __future__ import annotations

import pytest

from tests.helpers import mainjob
from tests.helpers.mainjob import Record

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def record() -> Record:
    job = mainjob.start()  # conftest has started it when collection selected these tests
    rec = job.wait()
    print(f"\nmain job: {rec.seconds:.0f}s in the background, exit {rec.exit_code}")
    return rec


def test_main_job_with_approve_as_ends_with_a_drift_triggered_champion(record: Record) -> None:
    assert record.exit_code == 0, f"fabloop run exited {record.exit_code} {record.error}\n{record.output[-6000:]}"
    assert record.result is not None and record.registry is not None, record.error
    out, result, registry = record.output, record.result, record.registry
    assert "paused for approval" in out and result["paused_run_url"] in out.replace("\n", "")
    model, version = result["model"], result["version"]
    assert result["champion"] == version

    assert registry.champion == version
    assert registry.previous is not None and registry.previous != version
    check_id = int(registry.champion_tags["fabloop.drift_check_id"])  # lineage names the drift check

    check = record.check
    assert check is not None and check.id == check_id, record.error
    assert check.model == model and (check.drifted or check.performance_breach)
    assert check.report_url, "a breaching check keeps its Evidently report"
    decisions = {(a.version, a.decision, a.approver) for a in record.approvals}
    assert (version, "approved", "alice") in decisions
    assert ("1", "approved", "fabloop-bootstrap") in decisions  # the explicit bootstrap


def test_down_leaves_no_process_behind(record: Record) -> None:
    """Every process of the stack the main job ran on (and the runs it left going) ends with ``down``."""
    down = record.down
    assert down is not None, record.error
    assert len(down.before) >= 4, f"expected broker, Prefect server, MLflow server and worker: {down.before}"
    assert down.exit_code == 0, down.output
    assert not down.alive_after_wait, f"still running after down: {down.alive_after_wait}"
    assert not down.left_after
    assert down.status_exit_code == 1
