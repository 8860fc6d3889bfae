"""Tasks of a drift check: one closed window judged against its champion's training set.

Tasks that take the event store's engine or an MLflow client, and tasks that publish,
do not cache (``NO_CACHE``): an engine or a client cannot be hashed into a cache key,
their result depends on what the store and the registry hold now, and a publication
must happen each time it is asked for.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pandas as pd
from prefect import runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate
from sqlalchemy.ext.asyncio import AsyncEngine

from fabloop.adapters import registry, store
from fabloop.adapters.registry import MlflowClient, ModelVersion
from fabloop.adapters.run_states import flow_run_status
from fabloop.core.calibration import DriftCalibration, calibrate_drift, calibration_fingerprint
from fabloop.core.drift import DriftResult, PerformanceDriftResult, check_drift, drift_report_html, performance_drift
from fabloop.core.names import CHAMPION, artifact_key
from fabloop.core.policies import DriftPolicy
from fabloop.core.reports import drift_markdown
from fabloop.core.verdict import WindowVerdict
from fabloop.tasks.retries import TRANSIENT


@dataclass(frozen=True)
class WindowCheck:
    """A judged window: the verdict and what it rests on, as recorded and published."""

    window_id: int
    model: str
    wafers: int
    verdict: WindowVerdict
    data: DriftResult | None = None
    performance: PerformanceDriftResult | None = None
    reference: str | None = None
    report_url: str | None = None


@task(name="already checked", cache_policy=NO_CACHE, **TRANSIENT)
def already_checked(engine: AsyncEngine, window_id: int) -> int | None:
    """The window's check (or a check's claim on it), if it has one."""
    return store.run_sync(store.already_checked(engine, window_id))


@task(name="claim window", cache_policy=NO_CACHE, **TRANSIENT)
def claim_window(engine: AsyncEngine, window_id: int) -> store.Claim:
    """Claim a closed window for this check: window events arrive at least once, a window is judged once.

    Another check's claim stands while its flow run may still record the verdict; a
    claim whose run ended without one (crashed, cancelled, deleted) is taken over,
    so the sweep's re-announcement of that window gets it judged.
    """
    flow_run_id = str(runtime.flow_run.id) if runtime.flow_run.id else None
    claim = store.run_sync(store.claim_window(engine, window_id, flow_run_id))
    if claim.duplicate and claim.status == store.CLAIMED and _ended(claim):
        taken = store.run_sync(store.take_over_claim(engine, claim, flow_run_id))
        # None: another check took it over first, or recorded the verdict; it is theirs.
        return taken or store.run_sync(store.claim_window(engine, window_id, flow_run_id))
    return claim


# A drift check takes minutes at most: a claim this old is abandoned whatever its run
# shows (a run cut off while the Prefect server was down can show Running for ever).
# Taking over a claim is safe even if its run still lives: only the claim's holder
# can record the verdict, so that run fails with ``ClaimLost`` instead.
CLAIM_LEASE = timedelta(minutes=30)
_ENDED = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}  # state types of a run that records nothing more


def _ended(claim: store.Claim) -> bool:
    """Whether a claim's flow run can no longer record a verdict (an unreachable Prefect API raises)."""
    if claim.claimed_at is not None and store.utcnow() - claim.claimed_at > CLAIM_LEASE:
        return True
    if claim.flow_run_id is None:
        return False  # a check run outside Prefect: nothing but the lease tells whether it is still going
    status = store.run_sync(flow_run_status(claim.flow_run_id))
    return status is None or status.state in _ENDED or status.gone(datetime.now(UTC))


@task(name="load window", cache_policy=NO_CACHE, **TRANSIENT)
def load_window_frame(engine: AsyncEngine, window_id: int) -> tuple[dict[str, Any], pd.DataFrame]:
    window = store.run_sync(store.load_window(engine, window_id))
    frame = store.run_sync(store.window_frame(engine, window_id))
    return {"model": window.model, "scope": window.scope, "wafer_count": window.wafer_count,
            "ts_start": window.ts_start, "ts_end": window.ts_end}, frame


@task(name="find champion", cache_policy=NO_CACHE, **TRANSIENT)
def find_champion(client: MlflowClient, model: str) -> ModelVersion | None:
    return registry.alias_version(client, model, CHAMPION)


@task(name="load reference", cache_policy=NO_CACHE, **TRANSIENT)
def load_reference(client: MlflowClient, champion: ModelVersion) -> pd.DataFrame:
    """The champion's training-set sensors: the drift reference of its scope."""
    return registry.reference_frame(client, champion)


def _drift_features(reference: pd.DataFrame, current: pd.DataFrame) -> list[str]:
    return [c for c in store.sensor_columns(current) if c in reference.columns]


@task(name="drift calibration", cache_policy=NO_CACHE, **TRANSIENT)
def drift_calibration(
    client: MlflowClient, champion: ModelVersion, reference: pd.DataFrame, current: pd.DataFrame, policy: DriftPolicy
) -> DriftCalibration | None:
    """The calibrated alarm's null for this champion, window size and policy (None under the 'share' rule).

    Each check is a fresh process: the null is kept as a JSON artifact on the champion's
    training run, keyed by window size and fingerprint, computed and logged by the first
    check that needs it and read back by the next ones.
    """
    if policy.alarm_rule != "calibrated":
        return None
    features = _drift_features(reference, current)
    fingerprint = calibration_fingerprint(reference, policy, len(current), features)
    path = registry.drift_calibration_path(len(current), fingerprint)
    kept = registry.load_drift_calibration(client, champion, path)
    if kept is not None:
        try:
            calibration = DriftCalibration.model_validate(kept)
        except ValueError:  # an older calibration format: compute it afresh
            calibration = None
        if calibration is not None and calibration.fingerprint == fingerprint:
            return calibration
    calibration = calibrate_drift(reference, policy, len(current), features)
    registry.log_drift_calibration(client, champion, calibration.model_dump(mode="json"), path)
    return calibration


@task(name="data drift")
def data_drift(
    reference: pd.DataFrame, current: pd.DataFrame, policy: DriftPolicy, calibration: DriftCalibration | None = None
) -> DriftResult:
    features = _drift_features(reference, current)
    return check_drift(reference[features], current[features], policy, features=features, calibration=calibration)


@task(name="performance drift", cache_policy=NO_CACHE, **TRANSIENT)
def model_performance(
    client: MlflowClient, champion: ModelVersion, current: pd.DataFrame, policy: DriftPolicy
) -> PerformanceDriftResult | None:
    """The champion on the window's labelled wafers vs its own holdout (None: no verdict possible)."""
    labelled = current[current[store.LABEL].notna()]
    if len(labelled) < policy.min_labelled_wafers:
        return None
    run = registry.run_of(client, champion)
    ref_auc = run.data.metrics.get("holdout_roc_auc")
    ref_fail = run.data.metrics.get("holdout_fail_rate")
    if ref_auc is None or ref_fail is None:
        return None
    cal_score = run.data.metrics.get("calibration_mean_score", run.data.metrics.get("holdout_mean_score", ref_fail))
    cal_fail = run.data.metrics.get("calibration_fail_rate", ref_fail)
    try:
        scores = registry.load_scorer(client, champion).score(labelled)
    except KeyError:
        return None
    # The reference AUC's own uncertainty: its logged DeLong variance, else (an older
    # champion) Hanley-McNeil from its holdout's class counts.
    ref_n = run.data.metrics.get("holdout_n_rows")
    ref_n_fail = run.data.metrics.get("holdout_n_fail")
    return performance_drift(
        labelled[store.LABEL].to_numpy(), scores, ref_auc, cal_fail, policy, score_bias=cal_score - cal_fail,
        reference_var=run.data.metrics.get("holdout_roc_auc_var"),
        reference_n_fail=None if ref_n_fail is None else int(ref_n_fail),
        reference_n_pass=None if ref_n is None or ref_n_fail is None else int(ref_n - ref_n_fail),
    )


def report_path(window_id: int) -> str:
    """Where a window's Evidently report is kept in its monitoring run."""
    return f"drift/window-{window_id}.html"


def wants_report(check: WindowCheck) -> bool:
    """A breach gets the full Evidently report of the sensors that got a verdict.

    A performance-only breach in a window too small (or too sparse) for a data verdict
    has no sensors to show, and no report.
    """
    return check.verdict.breach and check.data is not None and check.data.n_tested > 0


@task(name="open drift report", cache_policy=NO_CACHE, **TRANSIENT)
def open_report(client: MlflowClient, check: WindowCheck) -> str:
    """The window's monitoring run, with the check's figures, before its report is rendered; returns its id."""
    data, performance = check.data, check.performance
    assert data is not None  # wants_report: a report shows the data verdict's sensors
    metrics = {"drift_share": data.share, "drifted_sensors": float(data.n_drifted)}
    if data.threshold_share is not None:
        metrics["drift_threshold_share"] = data.threshold_share
    if performance and performance.roc_auc is not None:
        metrics |= {"window_roc_auc": performance.roc_auc, "window_n_fail": float(performance.n_failing)}
        if performance.roc_auc_ci is not None and performance.auc_p_value is not None:
            metrics |= {"window_roc_auc_ci_low": performance.roc_auc_ci[0],
                        "window_roc_auc_ci_high": performance.roc_auc_ci[1],
                        "window_roc_auc_drop_p": performance.auc_p_value}
    return registry.open_window_report(client, check.model, check.window_id, metrics)


@task(name="render drift report", cache_policy=NO_CACHE, **TRANSIENT)
def render_report(
    client: MlflowClient, tracking_uri: str, check: WindowCheck, run_id: str,
    reference: pd.DataFrame, current: pd.DataFrame, policy: DriftPolicy,
) -> str:
    """The full Evidently report, kept in the window's monitoring run; returns its URL.

    The slow part of a breach (minutes at hundreds of sensors): rendered after the
    verdict was recorded and acted on. A report that cannot be rendered ends its run
    FAILED and is raised; the verdict and the trigger stand.
    """
    assert check.data is not None  # wants_report
    tested = [f.feature for f in check.data.features if f.status == "ok"]
    path = report_path(check.window_id)
    try:
        html = drift_report_html(reference[tested], current[tested], policy, features=tested)
        registry.keep_window_report(client, run_id, html, path)
    except Exception:
        with suppress(Exception):  # the report's own failure is the one to raise
            registry.keep_window_report(client, run_id, None, path)
        raise
    return registry.artifact_url(tracking_uri, run_id, path)


@task(name="link drift report", cache_policy=NO_CACHE, **TRANSIENT)
def link_report(engine: AsyncEngine, check_id: int, check: WindowCheck, artifact_id: UUID | None) -> None:
    """The kept report on the check's row and in its verdict artifact (``check.report_url``)."""
    if check.report_url:
        store.run_sync(store.set_report_url(engine, check_id, check.report_url))
    if artifact_id is not None:
        _revise_verdict(artifact_id, check)


@task(name="note drift report failure", cache_policy=NO_CACHE, **TRANSIENT)
def note_report_failure(artifact_id: UUID | None, check: WindowCheck, error: str) -> None:
    """The verdict artifact says the report is not coming, and why."""
    if artifact_id is not None:
        _revise_verdict(artifact_id, check, f"The full Evidently drift report could not be rendered: {error}")


@task(name="record check", cache_policy=NO_CACHE, **TRANSIENT)
def record_check(engine: AsyncEngine, claim: store.Claim, check: WindowCheck) -> int:
    """Record the verdict into the window's claimed check, with its sensors' statistics; returns the check id."""
    verdict, data, performance = check.verdict, check.data, check.performance
    row = store.DriftCheckRow(
        id=claim.check_id, window_id=check.window_id, model=check.model, flow_run_id=claim.flow_run_id,
        checked_at=store.utcnow(), status=verdict.status,
        drifted=verdict.drifted, performance_breach=verdict.performance_breach, share=data.share if data else None,
        reason=verdict.reason, reference=check.reference, report_url=check.report_url,
        detail={"performance": performance.model_dump() if performance else None, "wafers": check.wafers},
    )
    return store.run_sync(store.record_check(engine, row, data.features if data else ()))


REPORT_PENDING = "The full Evidently drift report is being rendered; it is linked here once it is kept."


@task(name="publish verdict", cache_policy=NO_CACHE, **TRANSIENT)
def publish_verdict(check: WindowCheck, note: str | None = None) -> UUID:
    """The verdict as the model's ``drift-<model>`` artifact in the Prefect UI; returns the artifact's id.

    ``note``: a line on the report (e.g. :data:`REPORT_PENDING`), replaced when the
    report is linked (:func:`link_report`).
    """
    artifact_id = create_markdown_artifact(
        key=artifact_key("drift", check.model), description=f"Drift verdict, window {check.window_id}",
        markdown=_verdict_markdown(check, note),
    )
    assert isinstance(artifact_id, UUID)  # typed maybe-a-coroutine; a sync task gets the id
    return artifact_id


def _verdict_markdown(check: WindowCheck, note: str | None = None) -> str:
    return drift_markdown(check.model, check.window_id, check.verdict.reason, check.data, check.performance,
                          check.report_url, note)


def _revise_verdict(artifact_id: UUID, check: WindowCheck, note: str | None = None) -> None:
    """Rewrite the verdict artifact in place: the run keeps one verdict artifact, now with its report."""
    with get_client(sync_client=True) as client:
        client.update_artifact(artifact_id, ArtifactUpdate(data=_verdict_markdown(check, note)))


@task(name="decide retraining", cache_policy=NO_CACHE, **TRANSIENT)
def decide_retrain(
    engine: AsyncEngine, model: str, verdict: WindowVerdict, cooldown_minutes: float, window_id: int, check_id: int,
) -> store.TriggerDecision:
    """Record a retrain trigger: started, or suppressed (in flight, or cooling down)."""
    return store.run_sync(store.decide_retrain(
        engine, model, verdict.reason, timedelta(minutes=cooldown_minutes), window_id=window_id, check_id=check_id,
        kind=verdict.trigger_kind or "drift",
    ))


@task(name="attach retraining run", cache_policy=NO_CACHE, **TRANSIENT)
def attach_flow_run(engine: AsyncEngine, trigger_id: int, flow_run_id: str) -> None:
    store.run_sync(store.attach_flow_run(engine, trigger_id, flow_run_id))
