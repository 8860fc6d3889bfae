"""Tasks of a retraining: gated training set → Optuna/LightGBM in an MLflow run → challenger version.

Tasks that take the event store's engine or an MLflow client, and tasks that
publish or write, do not cache (``NO_CACHE``): an engine or a client cannot be
hashed into a cache key, and a write must happen each time it is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pandas as pd
from prefect import runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from sqlalchemy.ext.asyncio import AsyncEngine

from fabloop.adapters import registry, store
from fabloop.adapters.registry import MlflowClient
from fabloop.core.lineage import lineage, study_name
from fabloop.core.names import CHALLENGER, CHAMPION, RETRAIN_REJECTED, artifact_key, model_resource
from fabloop.core.policies import RetrainPolicy
from fabloop.core.reports import challenger_markdown, refused_markdown
from fabloop.core.scopes import ModelCatalogValue, ModelSpec
from fabloop.core.training import GateReport, Split, gate_training_set, holdout_metrics, time_ordered_split
from fabloop.core.tuning import FinalModel, TuneResult, time_folds, tune
from fabloop.core.validation import GateVerdict
from fabloop.tasks.retries import TRANSIENT

# Booster parameters of the search's best trial logged with the training run.
LOGGED_LGBM_PARAMS = ("num_leaves", "learning_rate", "min_data_in_leaf", "feature_fraction", "lambda_l2",
                      "scale_pos_weight")


@dataclass(frozen=True)
class TrainingSet:
    """The gated, time-split labelled wafers of one scope, and the hash that names them."""

    scope: dict[str, str]
    frame: pd.DataFrame
    gate: GateReport
    split: Split
    digest: str


@dataclass(frozen=True)
class Training:
    """What a training run produced: the logged challenger and how it and the champion scored."""

    experiment_id: str
    run_id: str
    model_uri: str
    search: TuneResult
    challenger: dict[str, float]
    champion: dict[str, float] | None
    champion_version: str | None
    champion_note: str


@task(name="find scope", cache_policy=NO_CACHE, **TRANSIENT)
def find_scope(engine: AsyncEngine, catalog: ModelCatalogValue, model: str) -> tuple[ModelSpec, dict[str, str]]:
    """The catalog spec and the scope (tool, chamber, …) a model name stands for, from its newest window."""
    scope = store.run_sync(store.latest_scope(engine, model))
    if scope is None:
        raise LookupError(f"no windows recorded for model {model!r}: nothing has been ingested for its scope yet")
    for spec in catalog.models:
        if set(spec.scope_by) == set(scope) and spec.model_name(scope) == model:
            return spec, scope
    raise LookupError(f"model {model!r} matches no spec of the model catalog ({[s.name for s in catalog.models]})")


@task(name="load training set", cache_policy=NO_CACHE, **TRANSIENT)
def load_training_set(engine: AsyncEngine, spec: ModelSpec, scope: dict[str, str]) -> pd.DataFrame:
    return store.run_sync(store.training_frame(engine, spec, scope))


@task(name="data gate")
def data_gate(frame: pd.DataFrame, policy: RetrainPolicy) -> tuple[GateReport, Split]:
    """Refuse (:class:`DataGateError`) a training set unfit to train on; else its sensors and time split."""
    gate = gate_training_set(frame, store.LABEL, store.sensor_columns(frame), policy)
    split = time_ordered_split(frame, "ts", policy, label_col=store.LABEL)
    # Every CV fold must hold both classes too; find out before anything is logged.
    time_folds(split.train[store.LABEL].astype(int).to_numpy(), policy.n_folds, policy.min_train_share)
    return gate, split


@task(name="refuse retraining", cache_policy=NO_CACHE, **TRANSIENT)
def refuse(
    model: str, reason: str, reasons: Sequence[str], window_ids: Sequence[int], rows: int,
    policy_block: str = "default",
) -> None:
    """Say loudly that the data gate refused: an event for automations, an artifact that says what to change."""
    emit_event(event=RETRAIN_REJECTED, resource=model_resource(model),
               payload={"reason": reason, "reasons": list(reasons), "window_ids": list(window_ids), "rows": rows})
    create_markdown_artifact(
        key=artifact_key("retrain", model), description=f"Retraining of {model} refused by the data gate",
        markdown=refused_markdown(model, reason) + "\n\n" + remedy_markdown(reason, policy_block),
    )


# What a data-gate refusal asks of an engineer: the RetrainPolicy fields that set the
# limit it hit (matched on the gate's message), or the data when no setting is at fault.
_REMEDIES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("too few rows", ("min_rows",), "wait for more labelled wafers, or lower the minimum"),
    ("min_class_count", ("min_class_count",),
     "wait for wafers of the missing class (sort/final-test results), or lower the minimum"),
    ("max_missing_share", ("max_missing_share", "missing_action"),
     "fix the sensor's feed, raise the share, or set missing_action to 'drop' to train without it"),
    ("no usable features left", ("max_missing_share", "missing_action"),
     "too many sensors are constant or missing: fix the feed or relax the missing-data limits"),
    ("time split", ("holdout_share", "validation_share"),
     "each time part needs both classes: wait for more data or change the shares"),
    ("holdout has a single class", ("holdout_share",), "the newest wafers hold one class: wait or widen the holdout"),
    ("time fold", ("n_folds", "min_train_share"), "every CV fold needs both classes: use fewer folds"),
)


def remedy_markdown(reason: str, policy_block: str) -> str:
    """What to change after a refusal: which block and field, or the data itself."""
    block = f"`fabloop RetrainPolicy` block **`{policy_block}`** (Prefect UI → Blocks)"
    for needle, fields, advice in _REMEDIES:
        if needle in reason:
            named = ", ".join(f"`policy.{f}`" for f in fields)
            return f"**What to change:** {advice} — {block}, field {named}."
    return (f"**What to change:** the data (the refusal names the columns); no field of the {block} "
            "lifts this limit.")


@task(name="lineage", cache_policy=NO_CACHE, **TRANSIENT)
def lineage_tags(
    engine: AsyncEngine, model: str, reasons: Sequence[str], window_ids: Sequence[int], digest: str,
    drift_check_id: int | None,
) -> dict[str, str]:
    """The lineage tags of this retraining, with the Kafka offsets of its windows."""
    offsets = store.run_sync(store.window_offsets(engine, list(window_ids))) if window_ids else {}
    flow_run_id = str(runtime.flow_run.id) if runtime.flow_run.id else None
    return lineage(model, reasons, window_ids, offsets, digest, drift_check_id, flow_run_id)


@task(name="tune", **TRANSIENT)
def tune_model(X: pd.DataFrame, y: pd.Series, policy: RetrainPolicy, storage: str, study_name: str) -> TuneResult:
    """The Optuna search; each trial is a nested MLflow run under the training run."""
    return tune(X, y, policy, storage=storage, study_name=study_name,
                on_trial=lambda trial: registry.log_trial(trial, study_name))


@task(name="score champion on holdout", cache_policy=NO_CACHE, **TRANSIENT)
def score_champion(
    client: MlflowClient, model: str, holdout: pd.DataFrame, policy: RetrainPolicy
) -> tuple[dict[str, float] | None, str | None, str]:
    """The champion's holdout metrics (None without a champion, or one that cannot score this data)."""
    champion = registry.alias_version(client, model, CHAMPION)
    if champion is None:
        return None, None, "no champion"
    try:
        scorer = registry.load_scorer(client, champion)
        scores = scorer.score(holdout)
    except KeyError as exc:
        return None, champion.version, f"champion v{champion.version} cannot score this data: {exc}"
    return holdout_metrics(holdout[store.LABEL].astype(int), scores, policy), champion.version, "ok"


@task(name="train challenger", cache_policy=NO_CACHE, **TRANSIENT)
def train_challenger(
    client: MlflowClient, model: str, training: TrainingSet, tags: dict[str, str], policy: RetrainPolicy, storage: str,
) -> Training:
    """Search, fit and log the challenger in one MLflow training run, the champion scored beside it."""
    split, feats = training.split, training.gate.features
    experiment_id = registry.use_experiment(model, "training")
    with registry.start_run(f"retrain-{datetime.now(UTC):%Y%m%dT%H%M%S}", tags=tags) as run_id:
        _log_training_set(model, training, policy)
        study = study_name(model, training.digest, policy)
        registry.set_run_tags({"fabloop.study": study})
        search = tune_model(split.train[feats], split.train[store.LABEL].astype(int), policy, storage, study)
        final: FinalModel = search.fit_final(
            split.train[feats], split.train[store.LABEL].astype(int),
            split.validation[feats], split.validation[store.LABEL].astype(int),
        )
        challenger = _log_challenger_scores(final, split, feats, policy)
        champion, champion_version, champion_note = score_champion(client, model, split.holdout, policy)
        registry.log_metrics({"cv_roc_auc_lgbm": search.lgbm_cv_auc, "cv_roc_auc_baseline": search.baseline_cv_auc,
                              "validation_roc_auc": final.val_auc})
        if champion:
            registry.log_metrics({f"champion_holdout_{k}": v for k, v in champion.items()})
        registry.log_params({"winner": search.winner, **{f"lgbm_{k}": v for k, v in search.best_params.items()
                                                          if k in LOGGED_LGBM_PARAMS}})
        model_uri = registry.log_model(final, split.train)
        registry.log_reference(split.train[feats + training.gate.dropped_constant])
        registry.log_feature_importance(final)
    return Training(experiment_id, run_id, model_uri, search, challenger, champion, champion_version, champion_note)


def _log_training_set(model: str, training: TrainingSet, policy: RetrainPolicy) -> None:
    gate, split = training.gate, training.split
    registry.log_params({
        "rows": len(training.frame), "features": len(gate.features), "dropped_constant": len(gate.dropped_constant),
        "fail_rate": round(gate.fail_rate, 5), "n_trials": policy.n_trials, "seed": policy.seed,
        **{f"split_{k}": v for k, v in split.sizes().items()},
    })
    registry.log_training_data(split.train[["ts", "wafer", *gate.features, store.LABEL]], model, training.scope,
                               training.digest, store.LABEL)


def _log_challenger_scores(
    final: FinalModel, split: Split, feats: list[str], policy: RetrainPolicy
) -> dict[str, float]:
    """The challenger's holdout metrics, logged with its calibration reference; returns the metrics."""
    challenger_scores = final.predict_score(split.holdout[feats])
    challenger = holdout_metrics(split.holdout[store.LABEL].astype(int), challenger_scores, policy)
    registry.log_metrics({f"holdout_{k}": v for k, v in challenger.items()})
    # Calibration reference for the performance check: mean score vs true fail
    # rate on every wafer the model did not train on (validation + holdout), which
    # holds several times more fails than the holdout alone.
    unseen = pd.concat([split.validation, split.holdout])
    registry.log_metrics({
        "holdout_mean_score": float(challenger_scores.mean()),
        "calibration_mean_score": float(final.predict_score(unseen[feats]).mean()),
        "calibration_fail_rate": float(unseen[store.LABEL].mean()),
    })
    return challenger


@task(name="register challenger", cache_policy=NO_CACHE, **TRANSIENT)
def register_challenger(model: str, model_uri: str, tags: dict[str, str]) -> str:
    """A new version of ``model`` from the training run's model, with the lineage tags; returns its number."""
    return registry.register_version(model_uri, model, tags).version


@task(name="set challenger alias", cache_policy=NO_CACHE, **TRANSIENT)
def set_challenger_alias(client: MlflowClient, model: str, version: str) -> None:
    registry.set_alias(client, model, CHALLENGER, version)


@task(name="tag validation", cache_policy=NO_CACHE, **TRANSIENT)
def tag_validation(
    client: MlflowClient, model: str, version: str, verdict: GateVerdict, champion_version: str | None
) -> None:
    """The challenger gate's verdict on the version, so the MLflow UI shows it too."""
    registry.set_tags(client, model, version, {
        "validation": "passed" if verdict.passed else "rejected",
        "validation_reasons": verdict.summary(),
        "champion_at_validation": champion_version or "",
    })


@task(name="challenger links", cache_policy=NO_CACHE, **TRANSIENT)
def challenger_links(
    client: MlflowClient, tracking_uri: str, model: str, training: Training, version: str
) -> dict[str, str]:
    """MLflow UI links to the challenger's run and version, and the champion's it was judged against."""
    links = {
        "challenger_run": registry.run_url(tracking_uri, training.experiment_id, training.run_id),
        "challenger_version": registry.version_url(tracking_uri, model, version),
    }
    if training.champion_version:
        champ_mv = client.get_model_version(model, training.champion_version)
        champ_run = registry.run_of(client, champ_mv)
        links["champion_run"] = registry.run_url(tracking_uri, champ_run.info.experiment_id, champ_run.info.run_id)
        links["champion_version"] = registry.version_url(tracking_uri, model, training.champion_version)
    return links


@task(name="publish challenger", cache_policy=NO_CACHE, **TRANSIENT)
def publish_challenger(
    model: str, version: str, reasons: Sequence[str], verdict: GateVerdict, training: Training, links: dict[str, str],
) -> None:
    """The challenger's gate verdict and metrics as the model's ``retrain-<model>`` artifact."""
    create_markdown_artifact(
        key=artifact_key("retrain", model), description=f"Retraining of {model}: challenger v{version}",
        markdown=challenger_markdown(model, version, reasons, verdict, training.search, training.challenger,
                                     training.champion, links),
    )


@task(name="finish trigger", cache_policy=NO_CACHE, **TRANSIENT)
def finish_trigger(engine: AsyncEngine, trigger_id: int, outcome: str) -> None:
    """Close the retrain trigger with its outcome; its cooldown starts now."""
    store.run_sync(store.finish_trigger(engine, trigger_id, outcome))

