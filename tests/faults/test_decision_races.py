"""Decisions under races and restarts: exactly one decision recorded, and the champion matches it.

Real Prefect server, worker, MLflow registry and event store (the session stack).
Each promotion is a run of the ``promote`` deployment, executed by the worker like
the ones a retraining starts; it waits suspended (no process) and a worker runs it
again once resumed. After each race, ``fabloop audit --verify`` must find the
model's champion explained by its recorded decisions.
"""

from __future__ import annotations

import contextlib
import contextvars
import signal
import threading
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import psutil
import pytest

from tests.helpers.faults import outage
from tests.helpers.prefect_api import api, flow_run
from tests.helpers.promotion import (
    PromotionLauncher,
    alias,
    approvals,
    paused_run,
    record_intent,
    register,
    resume,
    run_process,
    runs_flow_run,
    save_policy,
    tiny_model_uris,
    unique_model,
    wait_completed,
    wait_paused,
)
from tests.helpers.stack import RunningStack, fabloop

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def policy(stack: RunningStack) -> str:
    return save_policy(unique_model("policy"), ["Alice", "Bob"], timeout_seconds=600, poll_seconds=1)


def _model(stack: RunningStack, prefix: str, versions: int = 2) -> tuple[str, list[str]]:
    """Version 1 is champion (by a recorded decision, so that the audit can explain it); the last is challenger."""
    model = unique_model(prefix)
    uris = tiny_model_uris(stack.ep.mlflow_tracking_uri)[:versions]
    found = register(stack.ep.mlflow_tracking_uri, model, uris, {"challenger": versions - 1})
    intent = record_intent(stack, model, found[0], "Alice", None, flow_run_id="test-setup")
    from fabloop.adapters.registry import client, promote_to_champion
    from fabloop.adapters.store import complete_decision, engine_for, run_sync

    promote_to_champion(client(stack.ep.mlflow_tracking_uri), model, found[0])

    async def complete() -> None:
        async with engine_for(stack.ep.database_url) as engine:
            await complete_decision(engine, intent.id, None)

    run_sync(complete())
    return model, found


def _assert_explained(stack: RunningStack, model: str, champion: str) -> None:
    """The registry's champion is the one the recorded decisions made (what ``fabloop audit --verify`` checks)."""
    from fabloop.adapters.registry import aliases, client
    from fabloop.core.approval import verify_aliases

    named = aliases(client(stack.ep.mlflow_tracking_uri), model)
    verdict = verify_aliases(model, named, approvals(stack, model))
    assert named.get("champion") == champion and verdict.explained and verdict.note is None, verdict


def _final_decisions(stack: RunningStack, model: str, flow_run_id: str) -> list[Any]:
    return [d for d in approvals(stack, model) if d.flow_run_id == flow_run_id]


def test_cli_approve_against_ui_approve_at_the_same_moment(
    stack: RunningStack, policy: str, launcher: PromotionLauncher
) -> None:
    from fabloop.adapters.prefect_api import ResumeRefused, resume_promotion

    model, (v1, v2) = _model(stack, "race-ui")
    run = launcher.start(model, v2, policy)
    wait_paused(stack, run)
    go = threading.Barrier(2)
    answers: dict[str, Any] = {}

    def cli() -> None:  # what `fabloop approve` sends once it found the run
        go.wait()
        try:
            answers["Alice"] = resume_promotion(run.flow_run_id, "approve", "Alice", "from the terminal")
        except ResumeRefused as exc:
            answers["Alice"] = exc

    def ui() -> None:  # what the Resume form posts
        go.wait()
        try:
            answers["Bob"] = resume(stack, run.flow_run_id, {"decision": "approve", "approver": "Bob", "comment": "UI"})
        except httpx.HTTPStatusError as exc:  # e.g. 503 while the other decision holds the server's database
            answers["Bob"] = exc

    # The Prefect client reads the stack's API URL from the test's settings context.
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(cli,)), threading.Thread(target=ui)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(answers) == {"Alice", "Bob"}, answers
    accepted = [who for who, a in answers.items()
                if (isinstance(a, str)) or (isinstance(a, dict) and a.get("status") == "ACCEPT")]
    assert len(accepted) == 1, answers
    assert wait_completed(stack, run)["name"] == "Approved"
    [decision] = approvals(stack, model)[1:]  # after the setup's own decision
    assert (decision.decision, decision.approver, decision.version) == ("approved", accepted[0], v2)
    assert decision.detail["status"] == "completed" and decision.previous_champion == v1
    assert alias(stack, model, "previous") == v1
    _assert_explained(stack, model, v2)
    late = fabloop("approve", model, "--version", v2, "--as", "Alice", env=stack.env, check=False)
    assert late.returncode == 1 and "no pending promotion" in late.stdout, late.stdout


def test_approve_against_supersession(stack: RunningStack, policy: str, launcher: PromotionLauncher) -> None:
    from fabloop.adapters.prefect_api import ResumeRefused, flow_run_tags, resume_promotion

    model, (v1, v2, v3) = _model(stack, "race-supersede", versions=3)
    older = launcher.start(model, v2, policy)
    wait_paused(stack, older)
    # A newer challenger arrives; the moment it marks the older promotion superseded,
    # the engineer approves the older one (as `fabloop approve` resumes it), racing the
    # newer run's own wake-up call to the older one.
    newer = launcher.start(model, v3, policy)
    deadline = time.monotonic() + 60
    while f"superseded-by:{v3}" not in flow_run_tags(older.flow_run_id):
        assert time.monotonic() < deadline, "the newer promotion never superseded the older one"
        time.sleep(0.05)
    try:
        resume_promotion(older.flow_run_id, "approve", "Alice", "the one I reviewed")
        sent = True
    except ResumeRefused:  # the newer run's wake-up came first
        sent = False
    state = wait_completed(stack, older)
    [decision] = _final_decisions(stack, model, older.flow_run_id)
    assert (state["name"], decision.decision, decision.detail["superseded_by"]) == ("Superseded", "superseded", v3)
    if sent:  # taken by the server, never acted on: recorded as what the superseded run ignored
        assert decision.detail["ignored_input"]["approver"] == "Alice", decision.detail
    else:
        assert "ignored_input" not in decision.detail, decision.detail
    _assert_explained(stack, model, v1)
    # From the command line, approving the version reviewed is refused once it is superseded.
    wait_paused(stack, newer)
    out = fabloop("approve", model, "--version", v2, "--as", "Alice", env=stack.env, check=False)
    assert out.returncode == 1 and f"version {v2} of {model} is not the pending one" in out.stdout, out.stdout
    assert _final_decisions(stack, model, newer.flow_run_id) == []
    resume(stack, newer.flow_run_id, {"decision": "reject", "approver": "Bob", "comment": "test over"})
    assert wait_completed(stack, newer)["name"] == "Rejected"
    _assert_explained(stack, model, v1)


def test_approve_against_timeout(stack: RunningStack, launcher: PromotionLauncher) -> None:
    """An approval sent at the last moment: acted on if the server took it before the deadline, else ignored."""
    from fabloop.adapters.prefect_api import LAST_MOMENT, ResumeRefused, resume_promotion
    from fabloop.core.approval import decide_by

    model, (v1, v2) = _model(stack, "race-timeout")
    policy = save_policy(unique_model("policy-15s"), ["Alice"], timeout_seconds=15, poll_seconds=1)
    run = launcher.start(model, v2, policy)
    paused = wait_paused(stack, run, timeout=120)
    deadline = decide_by(paused["tags"])
    assert deadline is not None
    # The approval is sent at the last moment a decision is still taken.
    time.sleep(max(0.0, (deadline - LAST_MOMENT - datetime.now(UTC)).total_seconds()))
    try:
        resume_promotion(run.flow_run_id, "approve", "Alice", "just in time?")
        accepted = True
    except ResumeRefused:
        accepted = False
    state = wait_completed(stack, run, timeout=180)
    [decision] = _final_decisions(stack, model, run.flow_run_id)
    taken = [i for i in api(stack, "POST", f"/flow_runs/{run.flow_run_id}/input/filter",
                            {"prefix": "suspended-decision-1-response", "limit": 1, "exclude_keys": []})]
    human = accepted and bool(taken) and '"Alice"' in taken[0]["value"]
    if human and datetime.fromisoformat(taken[0]["created"]) < deadline:  # taken in time: acted on
        assert (state["name"], decision.decision, decision.approver) == ("Approved", "approved", "Alice")
        _assert_explained(stack, model, v2)
    else:  # refused before sending, or taken after the deadline: timed out, a late answer kept as ignored
        assert (state["name"], decision.decision) == ("TimedOut", "timed_out"), state
        assert ("ignored_input" in decision.detail) == human, decision.detail
        _assert_explained(stack, model, v1)


def test_an_approval_interrupted_before_the_aliases_moved_is_completed_by_the_next_promotion(
    stack: RunningStack, policy: str, launcher: PromotionLauncher
) -> None:
    model, (v1, v2) = _model(stack, "interrupted")
    intent = record_intent(stack, model, v2, "Alice", v1)
    # Intended, not completed: the audit accepts either side of the move.
    assert "intended, not completed" in fabloop("audit", "--verify", model, env=stack.env).stdout
    run = launcher.start(model, v2, policy)
    state = wait_completed(stack, run, timeout=90)
    assert state["name"] == "Approved", state  # without pausing: the decision was already taken
    [completed] = [d for d in approvals(stack, model) if d.id == intent.id]
    assert completed.detail["status"] == "completed" and completed.approver == "Alice"
    assert len(approvals(stack, model)) == 2  # the setup's and this one: nothing recorded twice
    assert alias(stack, model, "previous") == v1
    _assert_explained(stack, model, v2)


def test_worker_killed_while_a_promotion_waits(stack: RunningStack, policy: str, launcher: PromotionLauncher) -> None:
    """A waiting promotion is suspended: killing the worker (SIGKILL, its whole tree) loses nothing.

    The same run stays Suspended, nothing marks it Crashed, and the approval sent after
    the worker is back is acted on by that run.
    """
    model, (v1, v2) = _model(stack, "worker-restart")
    run = launcher.start(model, v2, policy)
    suspended = wait_paused(stack, run, timeout=120)
    with outage(stack, "worker", hard=True):
        assert flow_run(stack, run.flow_run_id)["state"]["id"] == suspended["state"]["id"]
    # The engineer approves what they reviewed, as if nothing happened.
    assert paused_run(stack, model, v2)["id"] == run.flow_run_id
    out = fabloop("approve", model, "--version", v2, "--as", "Alice", "--wait", "240", env=stack.env)
    assert f"{model} version {v2}: Approved" in out.stdout, out.stdout
    after = flow_run(stack, run.flow_run_id)
    assert (after["state_type"], after["state_name"]) == ("COMPLETED", "Approved"), after["state"]
    [decision] = approvals(stack, model)[1:]  # after the setup's own decision
    assert (decision.decision, decision.approver, decision.version) == ("approved", "Alice", v2)
    assert decision.flow_run_id == run.flow_run_id  # the same run, never started again
    crashed = [r for r in api(stack, "POST", "/flow_runs/filter", {
        "flow_runs": {"tags": {"all_": ["fabloop.promotion", f"model:{model}"]}}}) if r["state_type"] == "CRASHED"]
    assert crashed == []
    assert alias(stack, model, "previous") == v1
    _assert_explained(stack, model, v2)


def test_a_promotion_terminated_as_it_suspends_still_waits_once_for_its_decision(
    stack: RunningStack, policy: str, launcher: PromotionLauncher
) -> None:
    """SIGTERM reaches the run's process the moment the run is Suspended (its host shutting down).

    The engine is still leaving then, and Prefect 3.8 keeps only a *final* state against a
    SIGTERM in its teardown: the Suspended run may be marked Crashed ("aborted by a
    termination signal"). The deployment's trigger then puts the challenger before the
    engineer again, as a new run. Either way one promotion of the version waits, and the
    approval is acted on once.
    """
    model, (v1, v2) = _model(stack, "terminated-suspending")
    run = launcher.start(model, v2, policy)
    suspended = wait_paused(stack, run, timeout=120, interval=0.05)
    with contextlib.suppress(psutil.NoSuchProcess):  # already gone: the run was left Suspended
        proc = psutil.Process(run_process(suspended))
        if runs_flow_run(proc, run.flow_run_id):
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    time.sleep(3)  # a worker that saw its process end by a signal has reported it by now
    first = flow_run(stack, run.flow_run_id)
    assert first["state_type"] in ("PAUSED", "CRASHED"), first["state"]
    if first["state_type"] == "CRASHED":  # by the engine, or by the worker for its process's exit
        message = first["state"]["message"] or ""
        assert "termination signal" in message or "SIGTERM" in message, first["state"]
    waiting = paused_run(stack, model, v2, timeout=120)
    assert (waiting["id"] == run.flow_run_id) == (first["state_type"] == "PAUSED"), (first["state"], waiting["id"])
    out = fabloop("approve", model, "--version", v2, "--as", "Alice", "--wait", "240", env=stack.env)
    assert f"{model} version {v2}: Approved" in out.stdout, out.stdout
    [decision] = approvals(stack, model)[1:]  # after the setup's own decision
    assert (decision.decision, decision.approver, decision.version, decision.flow_run_id) == (
        "approved", "Alice", v2, waiting["id"])
    assert "no pending promotion" in fabloop("approvals", model, env=stack.env).stdout
    assert alias(stack, model, "previous") == v1
    _assert_explained(stack, model, v2)
