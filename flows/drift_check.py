"""The drift-check flow: one closed window against its model's reference.

Triggered by ``fabloop.window.closed`` (see prefect.yaml). The reference is the
champion's training-set snapshot; a scope without a champion asks for a first
training instead. A breach starts the ``retrain`` deployment as a child run of
this check — at most once per episode (in flight or cooling down: recorded as
suppressed, with the reason).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, Literal

import mlflow
import pandas as pd
from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from sqlalchemy import select

from fabloop.blocks import DEFAULT, DriftPolicyBlock, FabloopDatabase, MLflowServer
from fabloop.adapters.store.schema import DriftCheckRow, FeatureDriftRow, create_schema, make_engine, sessionmaker
from fabloop.flows.ingest import model_resource
from fabloop.adapters import tracking
from fabloop.adapters.store import frames as store
from fabloop.core.drift import DriftPolicy, DriftResult, PerformanceDriftResult, check_drift, drift_report_html, performance_drift
from fabloop.adapters.store.triggers import TriggerDecision, attach_flow_run, decide_retrain

DRIFT_DETECTED = "fabloop.drift.detected"


@task(name="load window")
def load_window_frame(database_url: str, window_id: int) -> tuple[dict[str, Any], pd.DataFrame]:
    async def run() -> tuple[dict[str, Any], pd.DataFrame]:
        engine = make_engine(database_url)
        try:
            window = await store.load_window(engine, window_id)
            frame = await store.window_frame(engine, window_id)
        finally:
            await engine.dispose()
        return {"model": window.model, "scope": window.scope, "wafer_count": window.wafer_count,
                "ts_start": window.ts_start, "ts_end": window.ts_end}, frame

    return asyncio.run(run())


@task(name="data drift")
def data_drift(reference: pd.DataFrame, current: pd.DataFrame, policy: DriftPolicy) -> DriftResult:
    features = [c for c in store.sensor_columns(current) if c in reference.columns]
    return check_drift(reference[features], current[features], policy, features=features)


@task(name="performance drift")
def model_performance(client: Any, champion: Any, current: pd.DataFrame, policy: DriftPolicy) -> PerformanceDriftResult | None:
    labelled = current[current[store.LABEL].notna()]
    if len(labelled) < policy.min_labelled_wafers:
        return None
    run = client.get_run(champion.run_id)
    ref_auc = run.data.metrics.get("holdout_roc_auc")
    ref_fail = run.data.metrics.get("holdout_fail_rate")
    if ref_auc is None or ref_fail is None:
        return None
    cal_score = run.data.metrics.get("calibration_mean_score", run.data.metrics.get("holdout_mean_score", ref_fail))
    cal_fail = run.data.metrics.get("calibration_fail_rate", ref_fail)
    try:
        scores = tracking.load_scorer(client, champion).score(labelled)
    except KeyError:
        return None
    return performance_drift(
        labelled[store.LABEL].to_numpy(), scores, ref_auc, cal_fail, policy, score_bias=cal_score - cal_fail
    )


async def _record(database_url: str, row: DriftCheckRow, result: DriftResult | None) -> int:
    engine = make_engine(database_url)
    try:
        await create_schema(engine)
        async with sessionmaker(engine)() as session, session.begin():
            session.add(row)
            await session.flush()
            if result is not None:
                session.add_all(
                    FeatureDriftRow(check_id=row.id, feature=f.feature, stattest=f.stattest or "", score=f.score,
                                    threshold=f.threshold, drifted=f.drifted, status=f.status)
                    for f in result.features
                )
            return row.id
    finally:
        await engine.dispose()


async def _decide(
    database_url: str, model: str, reason: str, cooldown: timedelta, window_id: int, check_id: int, kind: str
) -> TriggerDecision:
    engine = make_engine(database_url)
    try:
        return await decide_retrain(engine, model, reason, cooldown, window_id=window_id, check_id=check_id, kind=kind)
    finally:
        await engine.dispose()


async def _attach(database_url: str, trigger_id: int, flow_run_id: str) -> None:
    engine = make_engine(database_url)
    try:
        await attach_flow_run(engine, trigger_id, flow_run_id)
    finally:
        await engine.dispose()


async def already_checked(database_url: str, window_id: int) -> int | None:
    engine = make_engine(database_url)
    try:
        await create_schema(engine)
        async with engine.connect() as conn:
            row = (await conn.execute(select(DriftCheckRow.id).where(DriftCheckRow.window_id == window_id))).first()
        return row[0] if row else None
    finally:
        await engine.dispose()


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
    database_url = FabloopDatabase.load(DEFAULT).sqlalchemy_url()
    tracking_uri = MLflowServer.load(DEFAULT).tracking_uri
    previous = asyncio.run(already_checked(database_url, window_id))
    if previous is not None:
        # Window events are delivered at least once; a window is judged once.
        logger.info("window %s already checked (check %s); nothing to do", window_id, previous)
        return {"window_id": window_id, "check_id": previous, "duplicate": True}
    window, current = load_window_frame(database_url, window_id)
    model = window["model"]
    policy = DriftPolicyBlock.load(policy_block).policy.for_model(model)
    client = tracking.connect(tracking_uri)
    champion = tracking.alias_version(client, model, tracking.CHAMPION)
    flow_run_id = str(runtime.flow_run.id) if runtime.flow_run.id else None
    result: DriftResult | None = None
    perf: PerformanceDriftResult | None = None
    report_url: str | None = None

    if champion is None and len(current) < policy.min_window_rows:
        status, drifted, breach = "window_too_small", False, False
        reason = f"no champion for {model} yet, and {len(current)} wafers < min_window_rows={policy.min_window_rows}"
        reference_desc = None
    elif champion is None:
        status, drifted, breach = "no_champion", False, True
        reason = f"no champion for {model} yet: first full window ({len(current)} wafers) asks for a first training"
        reference_desc = None
    else:
        reference = tracking.reference_frame(client, champion)
        reference_desc = f"{model} v{champion.version} training set ({len(reference)} wafers)"
        result = data_drift(reference, current, policy)
        perf = model_performance(client, champion, current, policy)
        status, drifted = result.status, result.drifted
        breach = drifted or bool(perf and perf.breached)
        reason = result.reason + (f" | performance: {perf.reason}" if perf else "")
        # The Evidently report shows the sensors that got a verdict; a performance-only
        # breach in a window too small (or too sparse) for one has no report to show.
        if breach and result.n_tested:
            report_url = _publish_report(model, window_id, reference, current, policy, result, perf, tracking_uri)

    row = DriftCheckRow(
        window_id=window_id, model=model, flow_run_id=flow_run_id, status=status, drifted=drifted,
        performance_breach=bool(perf and perf.breached), share=result.share if result else None,
        reason=reason, reference=reference_desc, report_url=report_url,
        detail={"performance": perf.model_dump() if perf else None, "wafers": len(current)},
    )
    check_id = asyncio.run(_record(database_url, row, result))
    markdown = (
        f"## Drift check of `{model}` window {window_id}\n\n"
        + (result.to_markdown(report_url) if result else f"**{reason}**\n")
        + (f"\n\n**Performance:** {perf.reason}\n" if perf else "")
    )
    create_markdown_artifact(key=f"drift-{_key(model)}", markdown=markdown, description=f"Drift verdict, window {window_id}")
    outcome: dict[str, Any] = {"window_id": window_id, "check_id": check_id, "model": model, "status": status,
                               "drifted": drifted, "breach": breach, "reason": reason, "report_url": report_url}
    if not breach:
        logger.info("window %s of %s: no breach (%s)", window_id, model, reason)
        return outcome

    emit_event(event=DRIFT_DETECTED, resource=model_resource(model),
               payload={"window_id": window_id, "check_id": check_id, "reason": reason, "report_url": report_url})
    if retrain == "off":
        outcome["trigger"] = {"action": "dry_run", "reason": "retrain='off': nothing started", "id": None}
        logger.info("breach on %s; retraining is off for this run, nothing started", model)
        return outcome
    kind = "first_training" if champion is None else ("drift" if drifted else "performance")
    decision = asyncio.run(
        _decide(database_url, model, reason, timedelta(minutes=policy.cooldown_minutes), window_id, check_id, kind)
    )
    outcome["trigger"] = {"action": decision.action, "reason": decision.reason, "id": decision.trigger_id}
    if not decision.started:
        logger.info("retraining of %s suppressed: %s", model, decision.reason)
        return outcome
    if retrain == "deployment":
        from prefect.deployments import run_deployment

        child = run_deployment(
            "retrain/retrain", timeout=0, as_subflow=True,
            parameters={"model": model, "reasons": [reason], "window_ids": [window_id],
                        "drift_check_id": check_id, "trigger_id": decision.trigger_id},
        )
        asyncio.run(_attach(database_url, decision.trigger_id, str(child.id)))
        outcome["retrain_flow_run"] = str(child.id)
        logger.info("breach on %s: retraining started as flow run %s", model, child.id)
    return outcome


def _publish_report(
    model: str, window_id: int, reference: pd.DataFrame, current: pd.DataFrame, policy: DriftPolicy,
    result: DriftResult, perf: PerformanceDriftResult | None, tracking_uri: str,
) -> str:
    """The full Evidently report, kept as an artifact of the model's monitoring run."""
    tested = [f.feature for f in result.features if f.status == "ok"]
    html = drift_report_html(reference[tested], current[tested], policy, features=tested)
    # The experiment by id, not as mlflow's process-wide "active experiment": when two
    # checks create it at once, the loser's set_experiment returns without activating it.
    experiment_id = tracking.use_experiment(model, "monitoring")
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"drift-window-{window_id}") as run:
        mlflow.set_tags({"fabloop.model": model, "fabloop.window_id": str(window_id)})
        mlflow.log_metrics({"drift_share": result.share, "drifted_sensors": result.n_drifted})
        if perf and perf.roc_auc is not None:
            mlflow.log_metric("window_roc_auc", perf.roc_auc)
        path = f"drift/window-{window_id}.html"
        tracking.log_html(html, path)
        return tracking.artifact_url(tracking_uri, run.info.run_id, path)


def _key(model: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in model.lower())
