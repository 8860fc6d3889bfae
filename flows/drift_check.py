"""The drift-check flow: one closed window against its model's reference.

Triggered by ``fabloop.window.closed`` (see prefect.yaml). The reference is the
champion's training-set snapshot; a scope without a champion asks for a first
training instead. A breach starts the ``retrain`` deployment as a child run of
this check — at most once per episode (in flight or cooling down: recorded as
suppressed, with the reason). The breach's Evidently HTML report, slow at hundreds
of sensors, is rendered after that, in the same run: the check's row, its artifact
and the retraining's approval form link it once it is kept.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import replace
from typing import Any, Literal
from uuid import UUID

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
    REPORT_PENDING,
    WindowCheck,
    attach_flow_run,
    claim_window,
    data_drift,
    decide_retrain,
    drift_calibration,
    find_champion,
    link_report,
    load_reference,
    load_window_frame,
    model_performance,
    note_report_failure,
    open_report,
    publish_verdict,
    record_check,
    render_report,
    wants_report,
)


@flow(name="drift-check")
def drift_check(
    window_id: int,
    policy_block: str = DEFAULT,
    retrain: Literal["deployment", "off"] = "deployment",
) -> dict[str, Any]:
    """Judge one closed window; on a breach, start (or suppress) a retraining, then render its report.

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
    client = registry.client(tracking_uri)
    check, reference = _judge(client, window_id, model, current, policy)
    check_id = record_check(engine, claim, check)
    report_reference = reference if wants_report(check) else None
    artifact_id = publish_verdict(check, REPORT_PENDING if report_reference is not None else None)
    verdict = check.verdict
    outcome: dict[str, Any] = {"window_id": window_id, "check_id": check_id, "model": model, "status": verdict.status,
                               "drifted": verdict.drifted, "breach": verdict.breach, "reason": verdict.reason,
                               "report_url": None}
    if not verdict.breach:
        logger.info("window %s of %s: no breach (%s)", window_id, model, verdict.reason)
    else:
        emit_event(event=DRIFT_DETECTED, resource=model_resource(model),
                   payload={"window_id": window_id, "check_id": check_id, "reason": verdict.reason})
        if retrain == "off":
            outcome["trigger"] = {"action": "dry_run", "reason": "retrain='off': nothing started", "id": None}
            logger.info("breach on %s; retraining is off for this run, nothing started", model)
        else:
            outcome |= _start_retraining(engine, model, verdict, policy, window_id, check_id)
    # The verdict is recorded and acted on: only now the slow Evidently report, which
    # no retraining waits for.
    if report_reference is not None:
        outcome["report_url"] = _report(engine, client, tracking_uri, check, check_id, artifact_id, report_reference,
                                        current, policy)
    return outcome


def _judge(
    client: MlflowClient, window_id: int, model: str, current: pd.DataFrame, policy: DriftPolicy,
) -> tuple[WindowCheck, pd.DataFrame | None]:
    """The window's verdict with the data and performance results it rests on, and the champion's reference."""
    champion = find_champion(client, model)
    if champion is None:
        return WindowCheck(window_id, model, len(current), judge_window(model, len(current), policy, None)), None
    reference: pd.DataFrame = load_reference(client, champion)  # pandas is untyped: a DataFrame task looks async
    data = data_drift(reference, current, policy, drift_calibration(client, champion, reference, current, policy))
    perf = model_performance(client, champion, current, policy)
    verdict = judge_window(model, len(current), policy, champion.version, data, perf)
    reference_desc = f"{model} v{champion.version} training set ({len(reference)} wafers)"
    return WindowCheck(window_id, model, len(current), verdict, data, perf, reference_desc), reference


def _report(
    engine: AsyncEngine, client: MlflowClient, tracking_uri: str, check: WindowCheck, check_id: int,
    artifact_id: UUID, reference: pd.DataFrame, current: pd.DataFrame, policy: DriftPolicy,
) -> str | None:
    """Render and keep the breach's Evidently report, then link it from the check and its artifact.

    Returns the report's URL, or None when it could not be kept: a report is evidence
    for a person, so its failure is logged and noted in the artifact, and the check's
    verdict and trigger stand.
    """
    logger = get_run_logger()
    try:
        run_id = open_report(client, check)
        url = render_report(client, tracking_uri, check, run_id, reference, current, policy)
        link_report(engine, check_id, replace(check, report_url=url), artifact_id)
    except Exception as exc:  # noqa: BLE001 - any failure of the report leaves the verdict as it is
        logger.warning("window %s of %s: the Evidently report was not kept (%s: %s); the verdict and its "
                       "trigger stand", check.window_id, check.model, type(exc).__name__, exc)
        with suppress(Exception):  # the artifact keeps its pending note if Prefect cannot be told
            note_report_failure(artifact_id, check, f"{type(exc).__name__}: {exc}")
        return None
    logger.info("window %s of %s: Evidently report kept at %s", check.window_id, check.model, url)
    return url


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

