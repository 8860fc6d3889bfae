"""The drift-check flow: one closed window against its model's reference.

Triggered by ``fabloop.window.closed`` (see prefect.yaml). The reference is the
champion's training-set snapshot; a scope without a champion asks for a first
training instead. A breach starts the ``retrain`` deployment as a child run of
this check — at most once per episode (in flight or cooling down: recorded as
suppressed, with the reason).
"""

from __future__ import annotations

from typing import Any, Literal

import pandas as pd
from prefect import flow, get_run_logger
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.events import emit_event
from sqlalchemy.ext.asyncio import AsyncEngine

from fabloop.adapters import registry
from fabloop.adapters.registry import MlflowClient
from fabloop.blocks import DEFAULT, DriftPolicyBlock, FabloopDatabase, MLflowServer, load_block
from fabloop.core.names import DRIFT_DETECTED, RETRAIN_DEPLOYMENT, model_resource
from fabloop.core.policies import DriftPolicy
from fabloop.core.verdict import WindowVerdict, judge_window
from fabloop.tasks.checks import (
    WindowCheck,
    attach_flow_run,
    claim_window,
    data_drift,
    decide_retrain,
    drift_calibration,
    find_champion,
    load_reference,
    load_window_frame,
    model_performance,
    publish_report,
    publish_verdict,
    record_check,
)


@flow(name="drift-check")
def drift_check(
    window_id: int,
    policy_block: str = DEFAULT,
    retrain: Literal["deployment", "off"] = "deployment",
) -> dict[str, Any]:
    """Judge one closed window; on a breach, start (or suppress) a retraining.

    ``retrain``: ``deployment`` starts the ``retrain`` deployment as a child run;
    ``off`` judges and records the check but starts and records no retraining
    trigger (a dry run of a policy must not hold up the real retrainings).
    """
    logger = get_run_logger()
    engine = load_block(FabloopDatabase).get_engine()
    tracking_uri = load_block(MLflowServer).login()
    # Window events are delivered at least once (and swept again); a window is judged
    # once: the check whose claim is inserted first. An open window is refused here.
    claim = claim_window(engine, window_id)
    if claim.duplicate:
        logger.info("window %s already has check %s (%s, flow run %s); nothing to do",
                    window_id, claim.check_id, claim.status, claim.flow_run_id)
        return {"window_id": window_id, "check_id": claim.check_id, "duplicate": True}
    window, current = load_window_frame(engine, window_id)
    model = window["model"]
    policy = load_block(DriftPolicyBlock, policy_block).policy.for_model(model)
    check = _judge(registry.client(tracking_uri), tracking_uri, window_id, model, current, policy)
    check_id = record_check(engine, claim, check)
    publish_verdict(check)
    verdict, report_url = check.verdict, check.report_url
    outcome: dict[str, Any] = {"window_id": window_id, "check_id": check_id, "model": model, "status": verdict.status,
                               "drifted": verdict.drifted, "breach": verdict.breach, "reason": verdict.reason,
                               "report_url": report_url}
    if not verdict.breach:
        logger.info("window %s of %s: no breach (%s)", window_id, model, verdict.reason)
        return outcome
    emit_event(event=DRIFT_DETECTED, resource=model_resource(model),
               payload={"window_id": window_id, "check_id": check_id, "reason": verdict.reason,
                        "report_url": report_url})
    if retrain == "off":
        outcome["trigger"] = {"action": "dry_run", "reason": "retrain='off': nothing started", "id": None}
        logger.info("breach on %s; retraining is off for this run, nothing started", model)
        return outcome
    return {**outcome, **_start_retraining(engine, model, verdict, policy, window_id, check_id)}


def _judge(
    client: MlflowClient, tracking_uri: str, window_id: int, model: str, current: pd.DataFrame, policy: DriftPolicy,
) -> WindowCheck:
    """The window's verdict, with the data and performance results and the report it rests on."""
    champion = find_champion(client, model)
    if champion is None:
        return WindowCheck(window_id, model, len(current), judge_window(model, len(current), policy, None))
    reference: pd.DataFrame = load_reference(client, champion)  # pandas is untyped: a DataFrame task looks async
    data = data_drift(reference, current, policy, drift_calibration(client, champion, reference, current, policy))
    perf = model_performance(client, champion, current, policy)
    verdict = judge_window(model, len(current), policy, champion.version, data, perf)
    report_url = None
    # The Evidently report shows the sensors that got a verdict; a performance-only
    # breach in a window too small (or too sparse) for one has no report to show.
    if verdict.breach and data.n_tested:
        report_url = publish_report(model, window_id, reference, current, policy, data, perf, tracking_uri)
    reference_desc = f"{model} v{champion.version} training set ({len(reference)} wafers)"
    return WindowCheck(window_id, model, len(current), verdict, data, perf, reference_desc, report_url)


def _start_retraining(
    engine: AsyncEngine, model: str, verdict: WindowVerdict, policy: DriftPolicy, window_id: int, check_id: int,
) -> dict[str, Any]:
    """Record the retrain trigger and, unless it is suppressed, start ``retrain`` as a child run."""
    logger = get_run_logger()
    decision = decide_retrain(engine, model, verdict, policy.cooldown_minutes, window_id, check_id)
    started: dict[str, Any] = {"trigger": {"action": decision.action, "reason": decision.reason,
                                           "id": decision.trigger_id}}
    if not decision.started:
        logger.info("retraining of %s suppressed: %s", model, decision.reason)
        return started
    child = run_deployment(
        RETRAIN_DEPLOYMENT, timeout=0, as_subflow=True,
        parameters={"model": model, "reasons": [verdict.reason], "window_ids": [window_id],
                    "drift_check_id": check_id, "trigger_id": decision.trigger_id},
    )
    assert isinstance(child, FlowRun)  # run_deployment is typed maybe-a-coroutine; a sync flow gets the run
    attach_flow_run(engine, decision.trigger_id, str(child.id))
    started["retrain_flow_run"] = str(child.id)
    logger.info("breach on %s: retraining started as flow run %s", model, child.id)
    return started

