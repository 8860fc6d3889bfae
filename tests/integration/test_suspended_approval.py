"""A waiting promotion holds no process: it is a suspended run, decided after restarts, timed out by a scheduled run.

Real Prefect server and worker, MLflow registry and event store (the session
stack). Each promotion is a run of the ``promote`` deployment, executed by the
stack's worker as the ones a retraining starts. While it waits, the run is Paused
(named Suspended) and no process holds it: its last process has exited and none of
the worker's processes runs it. A worker restart and a Prefect server restart
change nothing for it; a decision sent afterwards through ``fabloop approve`` is
acted on by a new process of the same run. Its deadline is enforced by the one
``promotion-timeout`` run it scheduled, not by a process that waited.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fabloop.core.approval import decide_by
from fabloop.core.names import PROMOTION_WAITING, artifact_key
from fabloop.infra.process import ProcessManager
from tests.helpers.faults import outage
from tests.helpers.prefect_api import api, flow_run, runs_of_flow
from tests.helpers.promotion import (
    PromotionLauncher,
    alias,
    approvals,
    events,
    register,
    resume,
    run_process,
    runs_flow_run,
    save_policy,
    tiny_model_uris,
    unique_model,
    version_tags,
    wait_completed,
    wait_paused,
)
from tests.helpers.stack import RunningStack, fabloop

pytestmark = pytest.mark.integration


def _model(stack: RunningStack, prefix: str) -> tuple[str, str, str]:
    """A new registered model: version 1 is champion, version 2 challenger."""
    model = unique_model(prefix)
    v1, v2 = register(stack.ep.mlflow_tracking_uri, model, tiny_model_uris(stack.ep.mlflow_tracking_uri)[:2],
                      {"champion": 0, "challenger": 1})
    return model, v1, v2


def assert_no_process_holds(stack: RunningStack, flow_run_id: str, timeout: float = 30) -> None:
    """The run's last process has exited, and no process of the worker runs it."""
    run = flow_run(stack, flow_run_id)
    pid = run_process(run)
    deadline = time.monotonic() + timeout
    while runs_flow_run(pid, flow_run_id):
        assert time.monotonic() < deadline, f"process {pid} still runs the suspended flow run {flow_run_id}"
        time.sleep(0.3)
    worker = ProcessManager(stack.ep.home).tree("worker")
    assert worker, "the stack's worker is not running"
    holding = [p.pid for p in worker if runs_flow_run(p, flow_run_id)]
    assert holding == [], f"worker processes {holding} run the suspended flow run {flow_run_id}"
    now = flow_run(stack, flow_run_id)
    assert (now["state_type"], now["state_name"]) == ("PAUSED", "Suspended"), now["state"]


def _state_and_tags(stack: RunningStack, flow_run_id: str) -> str:
    run = flow_run(stack, flow_run_id)
    state = run["state"] or {}
    return f"{state.get('type')}/{state.get('name')} ({state.get('message')!r}), tags {run['tags']}"


def _timeout_runs(stack: RunningStack, flow_run_id: str, since: datetime) -> list[dict[str, Any]]:
    return [r for r in runs_of_flow(stack, "promotion-timeout", since) if r["parameters"]["flow_run_id"] == flow_run_id]


def test_a_waiting_promotion_holds_no_process_and_is_decided_after_worker_and_server_restarts(
    stack: RunningStack, launcher: PromotionLauncher
) -> None:
    since = datetime.now(UTC)
    model, v1, v2 = _model(stack, "suspended")
    policy = save_policy(unique_model("policy"), ["Alice"], timeout_seconds=900)
    run = launcher.start(model, v2, policy)
    suspended = wait_paused(stack, run, timeout=120)
    first_pid = run_process(suspended)
    assert_no_process_holds(stack, run.flow_run_id)
    assert suspended["parent_task_run_id"] is None  # a top-level run: Prefect suspends no subflow
    deadline = decide_by(suspended["tags"])
    # The policy's 900 s from the run's first execution (the tag keeps whole seconds).
    assert deadline is not None and since + timedelta(seconds=899) <= deadline <= datetime.now(UTC) + timedelta(
        seconds=900)
    [timeout_run] = _timeout_runs(stack, run.flow_run_id, since)
    assert timeout_run["state_type"] == "SCHEDULED"  # waits for the deadline, as nothing
    assert datetime.fromisoformat(timeout_run["expected_start_time"]) == deadline

    # The worker goes away and comes back; then the Prefect server does. The run waits on, untouched.
    with outage(stack, "worker"):
        assert flow_run(stack, run.flow_run_id)["state"]["id"] == suspended["state"]["id"]
    with outage(stack, "prefect"):
        pass
    assert flow_run(stack, run.flow_run_id)["state"]["id"] == suspended["state"]["id"]
    assert_no_process_holds(stack, run.flow_run_id)
    assert run.flow_run_id in fabloop("approvals", model, env=stack.env).stdout

    out = fabloop("approve", model, "--version", v2, "--as", "Alice", "--comment", "after the restarts",
                  "--wait", "240", env=stack.env)
    assert "resumed; waiting for a worker" in out.stdout, out.stdout
    assert f"{model} version {v2}: Approved" in out.stdout, out.stdout
    state = wait_completed(stack, run)
    assert (state["type"], state["name"]) == ("COMPLETED", "Approved")
    after = flow_run(stack, run.flow_run_id)
    assert run_process(after) != first_pid  # acted on by a new process of the same run
    assert (alias(stack, model, "champion"), alias(stack, model, "previous")) == (v2, v1)
    [rec] = approvals(stack, model)
    assert (rec.decision, rec.approver, rec.version, rec.flow_run_id) == ("approved", "Alice", v2, run.flow_run_id)
    assert rec.detail["status"] == "completed"
    # Laid out once, though the flow ran twice: one waiting announcement, one "waiting" artifact, one timeout run.
    assert len(events(stack, PROMOTION_WAITING, model, since, expect=2, timeout=5)) == 1
    arts = api(stack, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run.flow_run_id]}}})
    pages = [a for a in arts if a["key"] == artifact_key("promotion", model)]
    assert sorted(a["description"].rsplit(": ", 1)[-1] for a in pages) == ["approved", "waiting for a decision"], [
        (a["key"], a["type"], a["description"]) for a in arts]
    assert len(_timeout_runs(stack, run.flow_run_id, since)) == 1
    assert [r["id"] for r in runs_of_flow(stack, "promote", since) if r["parameters"]["model"] == model] == [
        run.flow_run_id]  # nothing crashed, nothing was started again


def test_the_deadline_is_enforced_by_the_scheduled_timeout_run(
    stack: RunningStack, launcher: PromotionLauncher
) -> None:
    since = datetime.now(UTC)
    model, v1, v2 = _model(stack, "suspended-timeout")
    policy = save_policy(unique_model("policy-20s"), ["Alice"], timeout_seconds=20)
    run = launcher.start(model, v2, policy)
    suspended = wait_paused(stack, run, timeout=120)
    assert_no_process_holds(stack, run.flow_run_id)
    deadline = decide_by(suspended["tags"])
    assert deadline is not None
    state = wait_completed(stack, run, timeout=180)
    assert (state["type"], state["name"], state["message"]) == ("COMPLETED", "TimedOut", "rejected: approval timed out")
    # Nobody waited in a process: the timeout run, started at the deadline, woke the run with the system's answer.
    [timeout_run] = _timeout_runs(stack, run.flow_run_id, since)
    assert timeout_run["state_type"] == "COMPLETED", timeout_run["state"]
    assert datetime.fromisoformat(timeout_run["expected_start_time"]) == deadline
    woken = api(stack, "GET", f"/flow_runs/{run.flow_run_id}/input/suspended-decision-1-response")
    assert (woken["approver"], woken["comment"]) == ("fabloop", "approval timed out")
    assert alias(stack, model, "champion") == v1 and alias(stack, model, "challenger") is None
    [rec] = approvals(stack, model)
    assert (rec.decision, rec.approver, rec.comment) == ("timed_out", None, "approval timed out")
    assert "ignored_input" not in rec.detail
    assert version_tags(stack, model, v2)["fabloop.decision"] == "timed_out"
    assert len(events(stack, PROMOTION_WAITING, model, since, expect=2, timeout=5)) == 1


def test_a_decision_the_server_takes_after_the_deadline_is_recorded_as_ignored(
    stack: RunningStack, launcher: PromotionLauncher
) -> None:
    """The worker is down at the deadline, so the run still waits when Alice's approval arrives, too late."""
    model, v1, v2 = _model(stack, "suspended-late")
    policy = save_policy(unique_model("policy-40s"), ["Alice"], timeout_seconds=40)
    run = launcher.start(model, v2, policy)
    suspended = wait_paused(stack, run, timeout=120)
    deadline = decide_by(suspended["tags"])
    assert deadline is not None
    # Waiting, as nothing: the process that suspended it has exited (a SIGTERM in its last
    # fraction of a second is another case: tests/faults/test_decision_races.py).
    assert_no_process_holds(stack, run.flow_run_id)
    with outage(stack, "worker"):
        assert datetime.now(UTC) < deadline - timedelta(seconds=5), "the run suspended too close to its deadline"
        # Past the deadline by the clock the CLI reads too (a loop: one sleep may end early).
        while (left := (deadline + timedelta(seconds=1) - datetime.now(UTC)).total_seconds()) > 0:
            time.sleep(left)
        sent_at = datetime.now(UTC)
        late = fabloop("approve", model, "--version", v2, "--as", "Alice", "--wait", "0", env=stack.env, check=False)
        assert late.returncode == 1 and "too late" in late.stdout, (
            f"deadline {deadline}, CLI started {sent_at}, run now {_state_and_tags(stack, run.flow_run_id)}\n"
            f"{late.stdout}")
        # What the UI's Resume form posts: the server takes it (no Prefect timeout), the flow does not act on it.
        assert resume(stack, run.flow_run_id, {"decision": "approve", "approver": "Alice", "comment": "late"})[
            "status"] == "ACCEPT"
    state = wait_completed(stack, run, timeout=180)
    assert (state["name"], state["message"]) == ("TimedOut", "rejected: approval timed out"), state
    assert alias(stack, model, "champion") == v1
    [rec] = approvals(stack, model)
    assert rec.decision == "timed_out" and rec.flow_run_id == run.flow_run_id
    ignored = rec.detail["ignored_input"]
    assert (ignored["approver"], ignored["decision"], ignored["key"]) == ("Alice", "approve", "decision-1")
    assert datetime.fromisoformat(ignored["answered_at"]) > deadline
