"""The pure parts of human-approved promotion: allowlist, form schema, decision page."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from fabloop.adapters.prefect_api import ApprovalInput, decision_keyset
from fabloop.adapters.registry import version_url
from fabloop.blocks.approval import ApprovalPolicy
from fabloop.core.approval import (
    deadline_tag,
    decide_by,
    decision_markdown,
    metrics_table,
    refusal_reason,
    superseded_by,
)


def test_allowlist_ignores_case_and_blanks_but_not_spelling() -> None:
    policy = ApprovalPolicy(approvers=["Alice Ng", " bob "])
    assert policy.allows("alice ng") and policy.allows("  BOB") and policy.allows("Alice Ng")
    assert not policy.allows("Alice") and not policy.allows("") and not policy.allows(None)
    assert not ApprovalPolicy().allows("Alice Ng")  # nobody until the block names someone


def test_empty_approver_name_in_the_block_is_refused() -> None:
    with pytest.raises(ValidationError, match="approvers"):
        ApprovalPolicy(approvers=["Alice", "  "])


def _schema() -> dict:
    from prefect._internal.pydantic.v2_schema import create_v2_schema

    form = ApprovalInput.with_initial_data(description="decide")
    return create_v2_schema(form.__name__, model_base=form)


@pytest.mark.parametrize(
    ("run_input", "error"),
    [
        ({"decision": "approve", "approver": "Alice"}, None),
        ({"decision": "reject", "approver": "Alice", "comment": "recall drops"}, None),
        ({"decision": "reject", "approver": "Alice"}, "'comment' is a required property"),
        ({"decision": "reject", "approver": "Alice", "comment": ""}, "field 'comment'"),
        ({"decision": "approve", "approver": ""}, "field 'approver'"),
        ({"decision": "promote", "approver": "Alice"}, "field 'decision'"),
        ({"decision": "approve", "approver": "Alice", "role": "admin"}, "Additional properties"),
    ],
)
def test_the_server_validates_the_form_like_this(run_input: dict, error: str | None) -> None:
    """The schema saved with the suspension is what the Prefect server checks on resume."""
    from prefect.utilities.schema_tools.validation import ValidationError as SchemaError
    from prefect.utilities.schema_tools.validation import validate

    if error is None:
        validate(run_input, _schema(), raise_on_error=True)
    else:
        with pytest.raises(SchemaError, match=error):
            validate(run_input, _schema(), raise_on_error=True)


def test_refusal_reasons_name_the_problem() -> None:
    ok = ApprovalInput(decision="approve", approver="Alice")
    assert refusal_reason(ok, True, "default") is None
    assert refusal_reason(ok, False, "fab-7") == "'Alice' is not on the approver allowlist of policy 'fab-7'"
    blank = ApprovalInput(decision="reject", approver="Alice", comment="   ")
    assert refusal_reason(blank, True, "default") == "a comment is required to reject"


def test_metrics_table_compares_champion_and_challenger() -> None:
    table = metrics_table(
        {"champion": {"roc_auc": 0.8, "pr_auc": 0.41}, "challenger": {"roc_auc": 0.85, "recall_at_op": 0.7}},
        champion="3", challenger="4",
    )
    lines = table.splitlines()
    assert lines[0] == "| metric | champion v3 | challenger v4 | change |"
    assert "| roc_auc | 0.8000 | 0.8500 | +0.0500 |" in lines
    assert "| recall_at_op | — | 0.7000 | — |" in lines and "| pr_auc | 0.4100 | — | — |" in lines
    assert metrics_table({}, None, "1").startswith("_No holdout metrics")


def test_metrics_table_shows_intervals_and_the_paired_test() -> None:
    champ = {"roc_auc": 0.80, "roc_auc_ci_low": 0.71, "roc_auc_ci_high": 0.89, "roc_auc_var": 0.002,
             "roc_auc_p_chance": 1e-6, "n_fail": 21.0, "n_rows": 300.0}
    chall = {"roc_auc": 0.85, "roc_auc_ci_low": 0.78, "roc_auc_ci_high": 0.92, "roc_auc_var": 0.0015,
             "roc_auc_p_chance": 1e-8, "n_fail": 21.0, "n_rows": 300.0}
    paired = {"roc_auc_diff": 0.05, "roc_auc_diff_ci_low": -0.01, "roc_auc_diff_ci_high": 0.11,
              "roc_auc_diff_p": 0.09, "n_fail": 21.0, "n_rows": 300.0,
              "pr_auc_diff": 0.04, "pr_auc_diff_ci_low": -0.05, "pr_auc_diff_ci_high": 0.12, "pr_auc_diff_p": 0.4}
    champ |= {"pr_auc": 0.41, "pr_auc_ci_low": 0.3, "pr_auc_ci_high": 0.52}
    chall |= {"pr_auc": 0.45, "pr_auc_ci_low": 0.33, "pr_auc_ci_high": 0.56}
    table = metrics_table({"champion": champ, "challenger": chall, "paired": paired, "cv": {"challenger": 0.83}},
                          champion="3", challenger="4")
    lines = table.splitlines()
    assert "| roc_auc | 0.8000 [0.71, 0.89] | 0.8500 [0.78, 0.92] | +0.0500 [-0.010, +0.110], p = 0.090 |" in lines
    assert "| pr_auc | 0.4100 [0.30, 0.52] | 0.4500 [0.33, 0.56] | +0.0400 [-0.050, +0.120], p = 0.400 |" in lines
    assert "| n_fail | 21 | 21 | +0 |" in lines
    assert "| roc_auc better than chance | p < 0.001 | p < 0.001 | |" in lines
    assert "| cv_roc_auc (time-series CV) | — | 0.8300 | — |" in lines
    assert not any(line.startswith(("| roc_auc_ci", "| roc_auc_var")) for line in lines)  # folded into their metric
    assert "paired DeLong test on the same 21 failing wafers of 300" in table


def test_decision_page_for_a_first_champion_links_everything() -> None:
    page = decision_markdown(
        model="yield-ETCH-02", challenger="1", champion=None, reasons=["performance: ROC-AUC 0.71 < 0.78"],
        metrics={"challenger": {"roc_auc": 0.82}},
        links={"challenger_version": version_url("http://mlflow:5000", "yield-ETCH-02", "1"),
               "drift_report": "http://reports/42.html"},
        trigger={"window_ids": [7]}, policy_name="default", deadline=datetime(2026, 1, 2, 3, 4, tzinfo=UTC),
    )
    assert "http://mlflow:5000/#/models/yield-ETCH-02/versions/1" in page
    assert "no champion yet" in page and "champion (none)" in page
    assert "- performance: ROC-AUC 0.71 < 0.78" in page and "[drift report](http://reports/42.html)" in page
    assert "window ids: `[7]`" in page and "2026-01-02 03:04 UTC" in page


def test_superseded_tag_names_the_newer_version() -> None:
    assert superseded_by(["fabloop.promotion", "superseded-by:12"]) == "12"
    assert superseded_by(["fabloop.promotion", "model:yield-ETCH-02"]) is None


def test_the_deadline_tag_round_trips_in_utc_to_the_second() -> None:
    local = datetime(2026, 12, 3, 9, 30, 15, 987654, tzinfo=timezone(timedelta(hours=2)))
    tag = deadline_tag(local)
    assert tag == "decide-by:2026-12-03T07:30:15+00:00"
    assert decide_by(["fabloop.promotion", tag, "model:m"]) == local.replace(microsecond=0)
    assert decide_by(["fabloop.promotion", "model:m"]) is None


def test_each_suspension_keeps_its_form_and_answer_under_its_own_key() -> None:
    """The keys the UI's Resume form and the flow read: one set per suspension, never shared."""
    assert decision_keyset("decision-2") == {
        "schema": "suspended-decision-2-schema", "description": "suspended-decision-2-description",
        "response": "suspended-decision-2-response",
    }
    assert decision_keyset("decision-1")["response"] != decision_keyset("decision-11")["response"]
