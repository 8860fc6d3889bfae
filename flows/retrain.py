"""The retrain flow: event store → gated training set → Optuna/LightGBM → MLflow → gate.

Started by a drift check (as its child run), on a schedule, or by hand from the UI
with just a model name. Every step that can refuse does so loudly: a failed data
gate fails the run, registers nothing and emits ``fabloop.retrain.rejected``; a
challenger that loses to the champion is registered but tagged rejected, and
production does not change.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import mlflow
import pandas as pd
from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from sqlalchemy import select, update

from fabloop.blocks import DEFAULT, FabloopDatabase, MLflowServer, ModelCatalog, RetrainPolicyBlock
from fabloop.adapters.store.schema import RetrainTriggerRow, WindowRow, create_schema, make_engine, utcnow
from fabloop.core.scopes import ModelCatalogValue, ModelSpec
from fabloop.flows.ingest import model_resource
from fabloop.adapters import tracking
from fabloop.adapters.store import frames as store
from fabloop.core.training import DataGateError, GateReport, RetrainPolicy, data_hash, gate_training_set, holdout_metrics, time_ordered_split
from fabloop.core.tuning import FinalModel, TrialRecord, TuneResult, time_folds, tune
from fabloop.core.validation import GateVerdict, judge_challenger

RETRAIN_REJECTED = "fabloop.retrain.rejected"
CHALLENGER_REGISTERED = "fabloop.challenger.registered"
CHALLENGER_REJECTED = "fabloop.challenger.rejected"


# Policy fields that decide what a trial's value means: the rows it tunes on (split
# shares), the folds it is scored on, the binning and the boosting budget. Workers that
# share a study must agree on them; the budget (n_trials, timeout_s) and seed may differ.
SEARCH_SETUP_FIELDS = (
    "holdout_share", "validation_share", "n_folds", "min_train_share", "max_bin",
    "max_boost_rounds", "early_stopping_rounds",
)


def study_name(model: str, data_digest: str, policy: RetrainPolicy) -> str:
    """One Optuna study per model, training data and search set-up.

    The data hash alone is not enough: a retrain of the same wafers under an edited
    policy (other folds, other round budget) would load the earlier study, mix trial
    values scored on different folds, and take its best trial (params and rounds)
    from a search it never ran.
    """
    setup = json.dumps({f: getattr(policy, f) for f in SEARCH_SETUP_FIELDS}, sort_keys=True)
    return f"{model}-{data_digest[:12]}-{hashlib.sha256(setup.encode()).hexdigest()[:8]}"


def optuna_storage_url(database_url: str) -> str:
    """Optuna's RDB storage is synchronous: the same database through a sync driver."""
    return database_url.replace("sqlite+aiosqlite://", "sqlite://").replace(
        "postgresql+asyncpg://", "postgresql+psycopg://"
    )


async def _scope_of(database_url: str, catalog: ModelCatalogValue, model: str) -> tuple[ModelSpec, dict[str, str]]:
    engine = make_engine(database_url)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(select(WindowRow.scope).where(WindowRow.model == model).order_by(WindowRow.id.desc()).limit(1))
            ).first()
    finally:
        await engine.dispose()
    if row is None:
        raise LookupError(f"no windows recorded for model {model!r}: nothing has been ingested for its scope yet")
    scope = dict(row[0])
    for spec in catalog.models:
        if set(spec.scope_by) == set(scope) and spec.model_name(scope) == model:
            return spec, scope
    raise LookupError(f"model {model!r} matches no spec of the model catalog ({[s.name for s in catalog.models]})")


@task(name="load training set")
def load_training_set(database_url: str, spec: ModelSpec, scope: dict[str, str]) -> pd.DataFrame:
    async def run() -> pd.DataFrame:
        engine = make_engine(database_url)
        try:
            return await store.training_frame(engine, spec, scope)
        finally:
            await engine.dispose()

    return asyncio.run(run())


@task(name="data gate")
def data_gate(frame: pd.DataFrame, policy: RetrainPolicy) -> GateReport:
    return gate_training_set(frame, store.LABEL, store.sensor_columns(frame), policy)


@task(name="tune")
def tune_model(
    X: pd.DataFrame, y: pd.Series, policy: RetrainPolicy, storage: str, study_name: str
) -> TuneResult:
    def log_trial(trial: TrialRecord) -> None:
        # Each trial is a nested MLflow run under the training run.
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True):
            mlflow.log_params({k: v for k, v in trial.params.items()})
            mlflow.set_tags({"fabloop.trial_state": trial.state, "fabloop.study": study_name})
            metrics = {"duration_s": trial.duration_s}
            if trial.cv_auc is not None:
                metrics["cv_roc_auc"] = trial.cv_auc
            for i, auc in enumerate(trial.fold_aucs):
                metrics[f"fold_{i}_roc_auc"] = auc
            mlflow.log_metrics(metrics)

    return tune(X, y, policy, storage=storage, study_name=study_name, on_trial=log_trial)


@task(name="score champion on holdout")
def score_champion(client: Any, model: str, holdout: pd.DataFrame, policy: RetrainPolicy) -> tuple[dict[str, float] | None, str | None, str]:
    champion = tracking.alias_version(client, model, tracking.CHAMPION)
    if champion is None:
        return None, None, "no champion"
    try:
        scorer = tracking.load_scorer(client, champion)
        scores = scorer.score(holdout)
    except KeyError as exc:
        return None, champion.version, f"champion v{champion.version} cannot score this data: {exc}"
    return holdout_metrics(holdout[store.LABEL].astype(int), scores, policy), champion.version, "ok"


def _metrics_table(challenger: dict[str, float], champion: dict[str, float] | None) -> str:
    rows = ["| metric | challenger | champion |", "|---|---:|---:|"]
    for key in ("roc_auc", "pr_auc", "recall_at_op", "precision_at_op", "fail_rate"):
        if key in challenger:
            champ = f"{champion[key]:.3f}" if champion and key in champion else "–"
            rows.append(f"| {key} | {challenger[key]:.3f} | {champ} |")
    return "\n".join(rows)


@flow(name="retrain", log_prints=True)
def retrain(
    model: str,
    reasons: list[str] | None = None,
    window_ids: list[int] | None = None,
    drift_check_id: int | None = None,
    trigger_id: int | None = None,
    policy_block: str = DEFAULT,
    catalog_block: str = DEFAULT,
    promotion: str = "deployment",
) -> dict[str, Any]:
    """Retrain ``model`` on its scope's labelled wafers and offer the result as challenger.

    ``promotion``: ``deployment`` starts the ``promote`` deployment as a child run
    (the approval pause lives there); ``off`` stops after the challenger gate.
    """
    logger = get_run_logger()
    reasons = reasons or ["manual"]
    window_ids = window_ids or []
    database_url = FabloopDatabase.load(DEFAULT).sqlalchemy_url()
    tracking_uri = MLflowServer.load(DEFAULT).tracking_uri
    policy = RetrainPolicyBlock.load(policy_block).policy
    catalog = ModelCatalog.load(catalog_block).value()
    outcome = "failed"
    try:
        summary = _retrain(logger, model, reasons, window_ids, drift_check_id, database_url, tracking_uri, policy, catalog, promotion)
        outcome = "challenger" if summary["gate"]["passed"] else "rejected"
        return summary
    except DataGateError:
        outcome = "refused"  # the data gate said no: nothing was registered
        raise
    finally:
        if trigger_id is not None:
            asyncio.run(_finish_trigger(database_url, trigger_id, outcome))


def _retrain(
    logger: Any, model: str, reasons: list[str], window_ids: list[int], drift_check_id: int | None,
    database_url: str, tracking_uri: str, policy: RetrainPolicy, catalog: ModelCatalogValue, promotion: str,
) -> dict[str, Any]:
    spec, scope = asyncio.run(_scope_of(database_url, catalog, model))
    frame = load_training_set(database_url, spec, scope)
    logger.info("training set for %s (%s): %d labelled wafers", model, scope, len(frame))
    try:
        gate = data_gate(frame, policy)
        split = time_ordered_split(frame, "ts", policy, label_col=store.LABEL)
        # Every CV fold must hold both classes too; find out before anything is logged.
        time_folds(split.train[store.LABEL].astype(int).to_numpy(), policy.n_folds, policy.min_train_share)
    except DataGateError as exc:
        emit_event(event=RETRAIN_REJECTED, resource=model_resource(model),
                   payload={"reason": str(exc), "reasons": reasons, "window_ids": window_ids, "rows": len(frame)})
        create_markdown_artifact(
            key=f"retrain-{_key(model)}", description=f"Retraining of {model} refused by the data gate",
            markdown=f"## Retraining of `{model}` refused\n\n**Data gate:** {exc}\n\nNothing was registered.",
        )
        raise
    if gate.dropped_constant:
        logger.info("constant sensors dropped: %s", ", ".join(gate.dropped_constant))
    feats = gate.features
    digest = data_hash(frame[["event_id", "ts", *feats, store.LABEL]])
    client = tracking.connect(tracking_uri)
    experiment_id = tracking.use_experiment(model, "training")
    offsets = asyncio.run(_offsets(database_url, window_ids)) if window_ids else {}
    flow_run_id = str(runtime.flow_run.id) if runtime.flow_run.id else None
    lineage = {
        "fabloop.model": model,
        "fabloop.trigger_reasons": "; ".join(reasons)[:5000],
        "fabloop.window_ids": ",".join(map(str, window_ids)),
        "fabloop.kafka_offsets": _offsets_text(offsets)[:5000],
        "fabloop.data_hash": digest,
        "fabloop.drift_check_id": str(drift_check_id or ""),
        "fabloop.retrain_flow_run": flow_run_id or "",
    }
    with mlflow.start_run(run_name=f"retrain-{datetime.now(UTC):%Y%m%dT%H%M%S}") as run:
        mlflow.set_tags(lineage)
        mlflow.log_params({
            "rows": len(frame), "features": len(feats), "dropped_constant": len(gate.dropped_constant),
            "fail_rate": round(gate.fail_rate, 5), "n_trials": policy.n_trials, "seed": policy.seed,
            **{f"split_{k}": v for k, v in split.sizes().items()},
        })
        from mlflow.data.code_dataset_source import CodeDatasetSource

        source = CodeDatasetSource(tags={"fabloop.source": "event store", "fabloop.model": model,
                                         "fabloop.scope": json.dumps(scope), "fabloop.data_hash": digest})
        dataset = mlflow.data.from_pandas(
            split.train[["ts", "wafer", *feats, store.LABEL]], source=source,
            targets=store.LABEL, name=f"{model}-train", digest=digest[:36],
        )
        mlflow.log_input(dataset, context="training")
        study = study_name(model, digest, policy)
        mlflow.set_tag("fabloop.study", study)
        result = tune_model(split.train[feats], split.train[store.LABEL].astype(int), policy,
                            optuna_storage_url(database_url), study)
        final: FinalModel = result.fit_final(
            split.train[feats], split.train[store.LABEL].astype(int),
            split.validation[feats], split.validation[store.LABEL].astype(int),
        )
        challenger_scores = final.predict_score(split.holdout[feats])
        challenger = holdout_metrics(split.holdout[store.LABEL].astype(int), challenger_scores, policy)
        champion, champion_version, champion_note = score_champion(client, model, split.holdout, policy)
        mlflow.log_metrics({f"holdout_{k}": v for k, v in challenger.items()})
        # Calibration reference for the performance check: mean score vs true fail
        # rate on every wafer the model did not train on (validation + holdout), which
        # holds several times more fails than the holdout alone.
        unseen = pd.concat([split.validation, split.holdout])
        mlflow.log_metrics({
            "holdout_mean_score": float(challenger_scores.mean()),
            "calibration_mean_score": float(final.predict_score(unseen[feats]).mean()),
            "calibration_fail_rate": float(unseen[store.LABEL].mean()),
        })
        mlflow.log_metrics({"cv_roc_auc_lgbm": result.lgbm_cv_auc, "cv_roc_auc_baseline": result.baseline_cv_auc,
                            "validation_roc_auc": final.val_auc})
        if champion:
            mlflow.log_metrics({f"champion_holdout_{k}": v for k, v in champion.items()})
        mlflow.log_params({"winner": result.winner, **{f"lgbm_{k}": v for k, v in result.best_params.items()
                                                      if k in ("num_leaves", "learning_rate", "min_data_in_leaf",
                                                               "feature_fraction", "lambda_l2", "scale_pos_weight")}})
        model_uri = tracking.log_model(final, split.train)
        tracking.log_reference(split.train[feats + gate.dropped_constant])
        tracking.log_feature_importance(final)
        run_id = run.info.run_id

    version = mlflow.register_model(model_uri, model, tags=lineage)
    client.set_registered_model_alias(model, tracking.CHALLENGER, version.version)
    verdict: GateVerdict = judge_challenger(challenger, champion, policy)
    for key, value in {"fabloop.validation": "passed" if verdict.passed else "rejected",
                       "fabloop.validation_reasons": verdict.summary()[:5000],
                       "fabloop.champion_at_validation": champion_version or ""}.items():
        client.set_model_version_tag(model, version.version, key, value)
    links = {
        "challenger_run": tracking.run_url(tracking_uri, experiment_id, run_id),
        "challenger_version": tracking.version_url(tracking_uri, model, version.version),
    }
    if champion_version:
        champ_mv = client.get_model_version(model, champion_version)
        champ_run = client.get_run(champ_mv.run_id)
        links["champion_run"] = tracking.run_url(tracking_uri, champ_run.info.experiment_id, champ_mv.run_id)
        links["champion_version"] = tracking.version_url(tracking_uri, model, champion_version)
    summary = {
        "model": model, "version": version.version, "run_id": run_id, "winner": result.winner,
        "challenger": challenger, "champion": champion, "champion_version": champion_version,
        "champion_note": champion_note, "gate": verdict.model_dump(), "links": links,
        "dropped_constant": gate.dropped_constant, "rows": len(frame), "study": result.study_name,
    }
    create_markdown_artifact(
        key=f"retrain-{_key(model)}", description=f"Retraining of {model}: challenger v{version.version}",
        markdown=(
            f"## Challenger `{model}` v{version.version} — gate {'passed' if verdict.passed else 'REJECTED'}\n\n"
            f"Trigger: {'; '.join(reasons)}\n\n{_metrics_table(challenger, champion)}\n\n"
            f"Gate: {verdict.summary()}\n\nWinner: {result.winner} "
            f"(CV ROC-AUC LightGBM {result.lgbm_cv_auc:.3f}, baseline {result.baseline_cv_auc:.3f}; "
            f"{result.n_complete} trials, {result.n_pruned} pruned)\n\n"
            f"[challenger run]({links['challenger_run']}) · [model version]({links['challenger_version']})\n"
        ),
    )
    if not verdict.passed:
        logger.warning("challenger v%s rejected: %s", version.version, verdict.summary())
        emit_event(event=CHALLENGER_REJECTED, resource=model_resource(model),
                   payload={"version": version.version, "reasons": verdict.reasons})
        return summary
    emit_event(event=CHALLENGER_REGISTERED, resource=model_resource(model),
               payload={"version": version.version, "metrics": challenger})
    if promotion == "deployment":
        from prefect.deployments import run_deployment

        child = run_deployment(
            "promote/promote", timeout=0, as_subflow=True,
            parameters={"model": model, "challenger_version": str(version.version), "reasons": reasons,
                        "metrics": {"challenger": challenger, "champion": champion or {}},
                        "links": links, "trigger": {"window_ids": window_ids, "drift_check_id": drift_check_id,
                                                    "retrain_flow_run": summary.get("run_id")}},
        )
        summary["promote_flow_run"] = str(child.id)
        logger.info("promotion of v%s awaiting approval: flow run %s", version.version, child.id)
    return summary


def _key(model: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in model.lower())


def _offsets_text(offsets: dict[str, Any]) -> str:
    parts = []
    for window, ranges in sorted(offsets.items()):
        parts.append(f"w{window}[" + ",".join(f"{tp}:{lo}-{hi}" for tp, (lo, hi) in sorted(ranges.items())) + "]")
    return " ".join(parts)


async def _offsets(database_url: str, window_ids: list[int]) -> dict[str, Any]:
    engine = make_engine(database_url)
    try:
        return await store.window_offsets(engine, window_ids)
    finally:
        await engine.dispose()


async def _finish_trigger(database_url: str, trigger_id: int, outcome: str) -> None:
    engine = make_engine(database_url)
    try:
        await create_schema(engine)
        async with engine.begin() as conn:
            await conn.execute(update(RetrainTriggerRow).where(RetrainTriggerRow.id == trigger_id).values(finished_at=utcnow(), outcome=outcome))
    finally:
        await engine.dispose()
