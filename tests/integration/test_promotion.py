"""Human-approved promotion on the real Prefect server, MLflow registry and event store.

Each test registers its own model (unique name) in the stack's MLflow server, runs
``promote`` as a real run of its deployment (the stack's worker executes it, and it
suspends: no process while it waits) and decides it the way a person would: through
the same resume call as the Prefect UI's form, or through the ``fabloop`` command
line; a worker then runs the flow again and it acts on the decision. The outcome is
read back from the registry aliases and tags, the approvals table, the flow run's
state and the Prefect events API.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from tests.helpers.prefect_api import api, flow_run
from tests.helpers.promotion import (
    PromotionLauncher,
    alias,
    approvals,
    events,
    register,
    resume,
    save_policy,
    tiny_model_uris,
    unique_model,
    version_tags,
    wait_completed,
    wait_paused,
)
from tests.helpers.stack import RunningStack, fabloop

pytestmark = pytest.mark.integration


@pytest.fixture
def policy(stack: RunningStack) -> str:
    """An approval policy of this test's own: Alice and Bob may decide; decisions are seen within 1 s."""
    return save_policy(unique_model("policy"), ["Alice", "Bob"], timeout_seconds=600, poll_seconds=1)


def _model_with_champion(stack: RunningStack, prefix: str, versions: int = 2) -> tuple[str, list[str]]:
    """A new registered model: version 1 is champion, the last version is challenger."""
    model = unique_model(prefix)
    uris = tiny_model_uris(stack.ep.mlflow_tracking_uri)[:versions]
    return model, register(stack.ep.mlflow_tracking_uri, model, uris, {"champion": 0, "challenger": versions - 1})


def test_approve_from_the_cli_promotes_and_audits(
    stack: RunningStack, policy: str, launcher: PromotionLauncher
) -> None:
    since = datetime.now(UTC)
    model, (v1, v2) = _model_with_champion(stack, "approve")
    run = launcher.start(model, v2, policy)
    wait_paused(stack, run)
    # The decision page: artifact and form description carry the metrics table and links.
    arts = api(stack, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run.flow_run_id]}}})
    page = arts[0]["data"]
    assert f"| metric | champion v{v1} | challenger v{v2} | change |" in page
    assert "| roc_auc | 0.8123 | 0.8617 | +0.0494 |" in page
    assert f"{stack.ep.mlflow_tracking_uri}/#/models/{model}/versions/{v2}" in page
    assert "#/experiments/" in page and "http://127.0.0.1:1/reports/drift-42.html" in page
    form = api(stack, "GET", f"/flow_runs/{run.flow_run_id}/input/suspended-decision-1-description")
    assert form == page

    listing = fabloop("approvals", env=stack.env).stdout
    row = next(line for line in listing.splitlines() if model in line and "│" in line)
    assert f" {v2} " in row and re.search(r" [5-9]m \d+s ", row), row  # of its 10 minutes to decide
    assert f"decide:  {stack.ep.prefect_ui_url}/runs/flow-run/{run.flow_run_id}\n" in listing
    assert f"model:   {stack.ep.mlflow_tracking_uri}/#/models/{model}/versions/{v2}\n" in listing

    out = fabloop("approve", model, "--version", v2, "--as", "Alice",
                  "--comment", "better recall at the operating point", env=stack.env)
    assert "Approved" in out.stdout, out.stdout
    state = wait_completed(stack, run)
    assert (state["type"], state["name"]) == ("COMPLETED", "Approved")
    assert (alias(stack, model, "champion"), alias(stack, model, "previous")) == (v2, v1)
    assert alias(stack, model, "challenger") is None
    tags = version_tags(stack, model, v2)
    assert tags["fabloop.decision"] == "approved" and tags["fabloop.approver"] == "Alice"
    assert tags["fabloop.comment"] == "better recall at the operating point"
    assert tags["fabloop.promotion_run"] == run.flow_run_id and tags["fabloop.previous_champion"] == v1
    [rec] = approvals(stack, model)
    assert (rec.version, rec.decision, rec.approver, rec.previous_champion) == (v2, "approved", "Alice", v1)
    assert rec.flow_run_id == run.flow_run_id and rec.decided_at >= since
    assert rec.detail["status"] == "completed"  # recorded as intended before the aliases moved, then completed
    [event] = events(stack, "fabloop.model.promoted", model, since)
    assert event["resource"]["fabloop.model.version"] == v2
    assert event["payload"]["approver"] == "Alice" and event["payload"]["previous_champion"] == v1
    assert any(r["prefect.resource.id"] == f"prefect.flow-run.{run.flow_run_id}" for r in event["related"])
    assert "no pending promotion" in fabloop("approvals", model, env=stack.env).stdout


def test_reject_needs_a_comment_and_keeps_the_champion(
    stack: RunningStack, policy: str, launcher: PromotionLauncher
) -> None:
    since = datetime.now(UTC)
    model, (v1, v2) = _model_with_champion(stack, "reject")
    run = launcher.start(model, v2, policy)
    paused = wait_paused(stack, run)
    # What the UI form sends when the comment is left empty: the server refuses it.
    answer = resume(stack, run.flow_run_id, {"decision": "reject", "approver": "Bob", "comment": ""})
    assert answer["status"] == "REJECT" and "comment" in answer["details"]["reason"]
    assert flow_run(stack, run.flow_run_id)["state"]["id"] == paused["state"]["id"]  # still waiting
    out = fabloop("reject", model, "--version", v2, "--as", "Bob", "--comment", "  ", env=stack.env, check=False)
    assert out.returncode == 2 and "comment is required" in out.stdout

    answer = resume(stack, run.flow_run_id,
                    {"decision": "reject", "approver": "Bob", "comment": "recall drops on lot-end wafers"})
    assert answer["status"] == "ACCEPT"
    state = wait_completed(stack, run)
    assert (state["type"], state["name"]) == ("COMPLETED", "Rejected")
    assert alias(stack, model, "champion") == v1 and alias(stack, model, "previous") is None
    assert alias(stack, model, "challenger") is None
    tags = version_tags(stack, model, v2)
    assert (tags["fabloop.decision"], tags["fabloop.approver"]) == ("rejected", "Bob")
    assert tags["fabloop.reason"] == "recall drops on lot-end wafers"
    assert "fabloop.decision" not in version_tags(stack, model, v1)
    [rec] = approvals(stack, model)
    assert (rec.version, rec.decision, rec.approver, rec.comment) == (
        v2, "rejected", "Bob", "recall drops on lot-end wafers"
    )
    [event] = events(stack, "fabloop.model.rejected", model, since)
    assert event["payload"]["comment"] == "recall drops on lot-end wafers"
    assert events(stack, "fabloop.model.promoted", model, since, expect=0, timeout=0) == []


def test_timeout_is_recorded_as_rejected(stack: RunningStack, launcher: PromotionLauncher) -> None:
    since = datetime.now(UTC)
    model = unique_model("timeout")
    [v1] = register(stack.ep.mlflow_tracking_uri, model, tiny_model_uris(stack.ep.mlflow_tracking_uri)[:1],
                    {"challenger": 0})
    policy = save_policy(unique_model("policy-15s"), ["Alice"], timeout_seconds=15, poll_seconds=1)
    run = launcher.start(model, v1, policy)
    wait_paused(stack, run, timeout=120)
    state = wait_completed(stack, run, timeout=180)
    assert (state["type"], state["name"]) == ("COMPLETED", "TimedOut")
    assert state["message"] == "rejected: approval timed out"
    assert alias(stack, model, "champion") is None and alias(stack, model, "challenger") is None
    tags = version_tags(stack, model, v1)
    assert (tags["fabloop.decision"], tags["fabloop.outcome"], tags["fabloop.reason"]) == (
        "timed_out", "rejected", "approval timed out")
    [rec] = approvals(stack, model)
    assert (rec.decision, rec.comment, rec.approver) == ("timed_out", "approval timed out", None)
    [event] = events(stack, "fabloop.model.rejected", model, since)
    assert event["payload"]["comment"] == "approval timed out"


def test_refused_approver_is_recorded_and_the_run_keeps_waiting(
    stack: RunningStack, policy: str, launcher: PromotionLauncher
) -> None:
    """A brand-new model: the first approved challenger becomes its first champion."""
    since = datetime.now(UTC)
    model = unique_model("refused")
    [v1] = register(stack.ep.mlflow_tracking_uri, model, tiny_model_uris(stack.ep.mlflow_tracking_uri)[:1],
                    {"challenger": 0})
    run = launcher.start(model, v1, policy)
    paused = wait_paused(stack, run)
    out = fabloop("approve", model, "--version", v1, "--as", "Mallory", env=stack.env, check=False)
    assert out.returncode == 1, out.stdout
    assert "refused" in out.stdout and "'Mallory' is not on the approver allowlist" in out.stdout
    again = wait_paused(stack, run, after_state=paused["state"]["id"])
    assert again["id"] == run.flow_run_id  # the same run, paused again
    assert alias(stack, model, "champion") is None

    resume(stack, run.flow_run_id, {"decision": "approve", "approver": " bob ", "comment": ""})
    state = wait_completed(stack, run)
    assert state["name"] == "Approved"
    assert alias(stack, model, "champion") == v1 and alias(stack, model, "previous") is None
    # The run went through three executions (suspended, refused and suspended again, approved):
    # the refusal is recorded once, under the key of the suspension it answered.
    refused, approved = approvals(stack, model)
    assert (refused.decision, refused.approver, refused.detail["requested"]) == ("refused", "Mallory", "approve")
    assert refused.detail["key"] == "decision-1"
    assert (approved.decision, approved.approver, approved.previous_champion) == ("approved", "bob", None)
    assert refused.flow_run_id == approved.flow_run_id == run.flow_run_id
    [event] = events(stack, "fabloop.model.promoted", model, since)
    assert event["payload"]["previous_champion"] is None


def test_newer_challenger_supersedes_the_pending_one(
    stack: RunningStack, policy: str, launcher: PromotionLauncher
) -> None:
    since = datetime.now(UTC)
    model, (v1, v2, v3) = _model_with_champion(stack, "supersede", versions=3)
    older = launcher.start(model, v2, policy)
    wait_paused(stack, older)
    newer = launcher.start(model, v3, policy)
    wait_paused(stack, newer)
    old_state = wait_completed(stack, older)
    assert (old_state["name"], old_state["message"]) == ("Superseded", f"superseded by version {v3}")
    # The superseded run can no longer be resumed, so it can never promote.
    late = resume(stack, older.flow_run_id, {"decision": "approve", "approver": "Alice", "comment": ""})
    assert late["status"] == "ABORT"
    listing = fabloop("approvals", model, env=stack.env).stdout
    assert older.flow_run_id not in listing and newer.flow_run_id in listing

    # The engineer reviewed version 2, which is no longer the pending one: refused, nothing decided.
    stale = fabloop("approve", model, "--version", v2, "--as", "Alice", env=stack.env, check=False)
    assert stale.returncode == 1 and f"version {v2} of {model} is not the pending one" in stale.stdout, stale.stdout
    assert alias(stack, model, "champion") == v1
    fabloop("approve", model, "--version", v3, "--as", "Alice", env=stack.env)
    assert wait_completed(stack, newer)["name"] == "Approved"
    assert (alias(stack, model, "champion"), alias(stack, model, "previous")) == (v3, v1)
    assert version_tags(stack, model, v2)["fabloop.decision"] == "superseded"
    assert version_tags(stack, model, v2)["fabloop.superseded_by"] == v3
    superseded, approved = approvals(stack, model)
    assert (superseded.version, superseded.decision, superseded.comment) == (
        v2, "superseded", f"superseded by version {v3}"
    )
    assert superseded.flow_run_id == older.flow_run_id
    assert (approved.version, approved.decision) == (v3, "approved")
    assert len(events(stack, "fabloop.model.superseded", model, since)) == 1


def test_rollback_moves_champion_back_to_previous(stack: RunningStack, policy: str) -> None:
    since = datetime.now(UTC)
    model, (v1, v2) = _model_with_champion(stack, "rollback")
    from fabloop.adapters.registry import client

    client(stack.ep.mlflow_tracking_uri).set_registered_model_alias(model, "champion", v2)
    client(stack.ep.mlflow_tracking_uri).set_registered_model_alias(model, "previous", v1)
    # Moved by hand, outside any decision: the audit says so, exits 1 and emits an event.
    unexplained = fabloop("audit", "--verify", model, env=stack.env, check=False)
    assert unexplained.returncode == 1, unexplained.stdout
    assert f"UNEXPLAINED  {model}: champion is version {v2} but no recorded decision" in unexplained.stdout
    [flagged] = events(stack, "fabloop.model.champion_unexplained", model, since)
    assert flagged["resource"]["fabloop.model.version"] == v2 and flagged["payload"]["champion"] == v2

    out = fabloop("rollback", model, "--as", "Mallory", "--comment", "scrap rate up", "--policy", policy,
                  env=stack.env, check=False)
    assert out.returncode == 1 and "'Mallory' is not on the approver allowlist" in out.stdout
    assert alias(stack, model, "champion") == v2

    out = fabloop("rollback", model, "--as", "Bob", "--comment", "scrap rate up on ETCH-02 since v2",
                  "--policy", policy, env=stack.env)
    assert f"champion is version {v1} again" in out.stdout
    assert alias(stack, model, "champion") == v1 and alias(stack, model, "previous") is None
    tags = version_tags(stack, model, v2)
    assert (tags["fabloop.decision"], tags["fabloop.approver"], tags["fabloop.rolled_back_to"]) == (
        "rolled_back", "Bob", v1
    )
    refused, rolled = approvals(stack, model)
    assert (refused.decision, refused.approver, refused.detail["requested"]) == ("refused", "Mallory", "rollback")
    assert (rolled.decision, rolled.version, rolled.approver, rolled.detail["champion"]) == (
        "rolled_back", v2, "Bob", v1
    )
    assert rolled.detail["status"] == "completed"
    [event] = events(stack, "fabloop.model.rolled_back", model, since)
    assert event["payload"]["comment"] == "scrap rate up on ETCH-02 since v2"
    verified = fabloop("audit", "--verify", model, env=stack.env)
    assert f"ok           {model}: champion {v1} (decision #{rolled.id})" in verified.stdout, verified.stdout
    history = fabloop("audit", model, env=stack.env).stdout
    row = next(line for line in history.splitlines() if "rolled_back" in line)
    assert f" {v2} " in row and f" {v1} " in row and "Bob" in row, history

    again = fabloop("rollback", model, "--as", "Bob", "--comment", "again", "--policy", policy,
                    env=stack.env, check=False)
    assert again.returncode == 1 and "no version with alias 'previous'" in again.stdout


def test_cli_names_what_is_missing(stack: RunningStack) -> None:
    out = fabloop("approve", "no-such-model", "--version", "1", "--as", "Alice", env=stack.env, check=False)
    assert out.returncode == 1 and "no pending promotion for no-such-model" in out.stdout
    out = fabloop("reject", "no-such-model", "--as", "Alice", env=stack.env, check=False)
    assert out.returncode == 2 and "--comment" in out.stdout + out.stderr
