"""Tasks of a retraining: gated training set → Optuna/LightGBM in an MLflow run → challenger version.

Tasks that take the event store's engine or an MLflow client, and tasks that
publish or write, do not cache (``NO_CACHE``): an engine or a client cannot be
hashed into a cache key, and a write must happen each time it is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import mlflow
import numpy as np
import pandas as pd
from prefect import runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from sqlalchemy.ext.asyncio import AsyncEngine

from fabloop.adapters import registry, store
from fabloop.adapters.registry import MlflowClient
from fabloop.core.approval import metrics_table as uncertainty_table
from fabloop.core.lineage import lineage, study_name
from fabloop.core.names import CHALLENGER, CHAMPION, RETRAIN_REJECTED, artifact_key, model_resource
from fabloop.core.policies import RetrainPolicy
from fabloop.core.reports import challenger_markdown, refused_markdown
from fabloop.core.scopes import ModelCatalogValue, ModelSpec
from fabloop.core.stats import PairedAuc, paired_bootstrap, paired_delong
from fabloop.core.training import GateReport, Split, gate_training_set, holdout_metrics, time_ordered_split
from fabloop.core.tuning import FinalModel, TuneResult, time_folds, tune
from fabloop.core.validation import GateVerdict
from fabloop.tasks.retries import TRANSIENT

# The training run's JSON artifact listing the sensors the data gate dropped, and why.
DATA_GATE_ARTIFACT = "data_gate.json"

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
    # The champion on the same holdout wafers (paired DeLong), and both models' time-series
    # CV ROC-AUC, which the gate judges on when the holdout holds too few fails.
    paired: PairedAuc | None = None
    challenger_cv: float | None = None
    champion_cv: float | None = None
    paired_extra: dict[str, float] | None = None  # PR-AUC difference (paired bootstrap): diff, interval, p


@dataclass(frozen=True)
class ChampionScore:
    """The champion on the challenger's holdout: its metrics, its scores (for the paired test), its recorded CV."""

    metrics: dict[str, float] | None
    version: str | None
    note: str
    scores: np.ndarray | None = None
    cv_roc_auc: float | None = None


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
    ("max_dropped_share", ("max_dropped_share", "max_missing_share"),
     "fix the feeds of the dead, missing or stuck sensors, or raise the cap to train on the sensors left"),
    ("max_missing_share", ("max_missing_share", "missing_action"),
     "fix the sensor's feed, raise the share, or set missing_action to 'drop' to train without it"),
    ("no usable features left", ("max_missing_share", "missing_action"),
     "too many sensors are constant or missing: fix the feed or relax the missing-data limits"),
    ("time split", ("holdout_share", "validation_share"),
     "each time part needs both classes: wait for more data or change the shares"),
    ("holdout has a single class", ("holdout_share",), "the newest wafers hold one class: wait or widen the holdout"),
    ("time fold", ("n_folds", "min_train_share"), "every CV fold needs both classes: use fewer folds"),
)


def _remedy(reason: str) -> tuple[tuple[str, ...], str] | None:
    """The RetrainPolicy fields that set the limit a refusal hit, and the advice (None: the data is at fault)."""
    for needle, fields, advice in _REMEDIES:
        if needle in reason:
            return fields, advice
    return None


def remedy_markdown(reason: str, policy_block: str) -> str:
    """What to change after a refusal: which block and field, or the data itself."""
    block = f"`fabloop RetrainPolicy` block **`{policy_block}`** (Prefect UI → Blocks)"
    remedy = _remedy(reason)
    if remedy is not None:
        named = ", ".join(f"`policy.{f}`" for f in remedy[0])
        return f"**What to change:** {remedy[1]} — {block}, field {named}."
    return (f"**What to change:** the data (the refusal names the columns); no field of the {block} "
            "lifts this limit.")


def remedy_text(reason: str, policy_block: str) -> str:
    """:func:`remedy_markdown` in plain words, for a run's state message and logs."""
    remedy = _remedy(reason)
    if remedy is None:
        return f"to change: the data; no field of the fabloop RetrainPolicy block {policy_block!r} lifts this limit"
    fields = ", ".join(f"policy.{f}" for f in remedy[0])
    return f"to change: fabloop RetrainPolicy block {policy_block!r}, field {fields} ({remedy[1]})"


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
def score_champion(client: MlflowClient, model: str, holdout: pd.DataFrame, policy: RetrainPolicy) -> ChampionScore:
    """The champion's holdout metrics and scores (none without a champion, or one that cannot score this data)."""
    champion = registry.alias_version(client, model, CHAMPION)
    if champion is None:
        return ChampionScore(None, None, "no champion")
    cv = recorded_cv_auc(registry.run_of(client, champion).data)
    try:
        scorer = registry.load_scorer(client, champion)
        scores = np.asarray(scorer.score(holdout), dtype=float)
    except KeyError as exc:
        return ChampionScore(None, champion.version, f"champion v{champion.version} cannot score this data: {exc}",
                             cv_roc_auc=cv)
    metrics = holdout_metrics(holdout[store.LABEL].astype(int), scores, policy)
    return ChampionScore(metrics, champion.version, "ok", scores, cv)


def recorded_cv_auc(run_data: object) -> float | None:
    """The CV ROC-AUC a training run recorded for the model family it registered (older runs: by ``winner``)."""
    metrics: dict[str, float] = getattr(run_data, "metrics", {})
    params: dict[str, str] = getattr(run_data, "params", {})
    if "cv_roc_auc_winner" in metrics:
        return metrics["cv_roc_auc_winner"]
    key = "cv_roc_auc_baseline" if params.get("winner") == "baseline" else "cv_roc_auc_lgbm"
    return metrics.get(key)


def winner_cv_auc(search: TuneResult) -> float:
    """The CV ROC-AUC of the model family the search registers."""
    return search.baseline_cv_auc if search.winner == "baseline" else search.lgbm_cv_auc


def cv_fails(y_train: pd.Series, search: TuneResult) -> int:
    """Failing wafers over the CV folds' validation parts: what the CV estimate rests on."""
    y = y_train.astype(int).to_numpy()
    return int(sum(y[start:end].sum() for _, start, end in search.folds))


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
        challenger, challenger_scores = _log_challenger_scores(final, split, feats, policy)
        champ = score_champion(client, model, split.holdout, policy)
        challenger_cv = winner_cv_auc(search)
        registry.log_metrics({"cv_roc_auc_lgbm": search.lgbm_cv_auc, "cv_roc_auc_baseline": search.baseline_cv_auc,
                              "cv_roc_auc_winner": challenger_cv,
                              "cv_n_fail": cv_fails(split.train[store.LABEL], search),
                              "validation_roc_auc": final.val_auc})
        paired, paired_extra = None, None
        if champ.metrics:
            registry.log_metrics({f"champion_holdout_{k}": v for k, v in champ.metrics.items()})
        if champ.scores is not None:
            paired = paired_delong(split.holdout[store.LABEL].astype(int).to_numpy(), challenger_scores, champ.scores)
            lo, hi = paired.ci(policy.gate_alpha)
            registry.log_metrics({"paired_roc_auc_diff": paired.diff, "paired_roc_auc_diff_ci_low": lo,
                                  "paired_roc_auc_diff_ci_high": hi, "paired_roc_auc_diff_p": paired.p_value})
            thresholds = (challenger["threshold"], (champ.metrics or {}).get("threshold"))
            paired_extra = _paired_bootstrapped(split.holdout[store.LABEL], challenger_scores, champ.scores,
                                                thresholds, policy)
            registry.log_metrics({f"paired_{k}": v for k, v in paired_extra.items()})
        if champ.cv_roc_auc is not None:
            registry.log_metrics({"champion_cv_roc_auc": champ.cv_roc_auc})
        registry.log_params({"winner": search.winner, **{f"lgbm_{k}": v for k, v in search.best_params.items()
                                                          if k in LOGGED_LGBM_PARAMS}})
        model_uri = registry.log_model(final, split.train)
        registry.log_reference(split.train[feats + training.gate.dropped_constant])
        registry.log_feature_importance(final)
    return Training(experiment_id, run_id, model_uri, search, challenger, champ.metrics, champ.version, champ.note,
                    paired=paired, challenger_cv=challenger_cv, champion_cv=champ.cv_roc_auc, paired_extra=paired_extra)


def _paired_bootstrapped(
    labels: pd.Series, challenger: np.ndarray, champion: np.ndarray, thresholds: tuple[float, float | None],
    policy: RetrainPolicy,
) -> dict[str, float]:
    """PR-AUC and precision at the operating point of both on the same holdout: no closed form, so a paired bootstrap.

    Each model keeps its own threshold (``thresholds``: challenger's, champion's). Recall
    at the operating point needs no test: the policy's target recall sets it for both.
    """
    from sklearn.metrics import average_precision_score, precision_score

    y = labels.astype(int).to_numpy()
    out: dict[str, float] = {}
    diff, lo, hi, p = paired_bootstrap(y, challenger, champion, average_precision_score,
                                       alpha=policy.gate_alpha, draws=200, seed=policy.seed)
    out |= {"pr_auc_diff": diff, "pr_auc_diff_ci_low": lo, "pr_auc_diff_ci_high": hi, "pr_auc_diff_p": p}
    mine, theirs = thresholds
    if theirs is not None:
        def precision(truth: np.ndarray, alarm: np.ndarray) -> float:
            return float(precision_score(truth, alarm, zero_division=0.0))

        diff, lo, hi, p = paired_bootstrap(y, (challenger >= mine).astype(float), (champion >= theirs).astype(float),
                                           precision, alpha=policy.gate_alpha, draws=200, seed=policy.seed)
        out |= {"precision_at_op_diff": diff, "precision_at_op_diff_ci_low": lo,
                "precision_at_op_diff_ci_high": hi, "precision_at_op_diff_p": p}
    return out


def _log_training_set(model: str, training: TrainingSet, policy: RetrainPolicy) -> None:
    gate, split = training.gate, training.split
    registry.log_params({
        "rows": len(training.frame), "features": len(gate.features), "dropped_constant": len(gate.dropped_constant),
        "sensors": gate.n_sensors, "dropped_dead": len(gate.dead), "dropped_missing": len(gate.dropped_missing),
        "fail_rate": round(gate.fail_rate, 5), "n_trials": policy.n_trials, "seed": policy.seed,
        **{f"split_{k}": v for k, v in split.sizes().items()},
    })
    # Which sensors the model never saw, and why: the engineer's list of feeds to check.
    mlflow.log_dict({"summary": gate.dropped_summary(), "dropped": gate.dropped(),
                     "missing_share": gate.dropped_missing, "constant": gate.dropped_constant}, DATA_GATE_ARTIFACT)
    registry.log_training_data(split.train[["ts", "wafer", *gate.features, store.LABEL]], model, training.scope,
                               training.digest, store.LABEL)


def _log_challenger_scores(
    final: FinalModel, split: Split, feats: list[str], policy: RetrainPolicy
) -> tuple[dict[str, float], np.ndarray]:
    """The challenger's holdout metrics, logged with its calibration reference; returns them and its scores.

    Logged with their intervals and ``holdout_roc_auc_var``: a later performance check
    weighs the champion's reference AUC by that variance.
    """
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
    return challenger, np.asarray(challenger_scores, dtype=float)


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
        "validation_basis": verdict.basis,
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


@task(name="drift evidence links", cache_policy=NO_CACHE, **TRANSIENT)
def drift_evidence_links(
    client: MlflowClient, tracking_uri: str, model: str, window_ids: Sequence[int], drift_check_id: int | None,
) -> dict[str, str]:
    """Links to what triggered this retraining: the rendered drift report and the drift check's run.

    The report is the MLflow UI's artifact view of the window's monitoring run (the
    tracking server's ``get-artifact`` only downloads the file); the drift check is the
    Prefect UI page of this run's parent flow run, the check that started it.
    """
    links: dict[str, str] = {}
    for window_id in reversed(list(window_ids)):
        run = registry.window_report_run(client, model, window_id)
        if run is None:
            continue
        path = f"drift/window-{window_id}.html"
        links["drift_report"] = registry.artifact_page_url(tracking_uri, run.info.experiment_id, run.info.run_id, path)
        links["drift_monitoring_run"] = registry.run_url(tracking_uri, run.info.experiment_id, run.info.run_id)
        break
    parent = runtime.flow_run.parent_flow_run_id
    if drift_check_id is not None and parent:
        from prefect.settings import get_current_settings

        ui = get_current_settings().ui_url
        if ui:
            links["drift_check_run"] = f"{ui.rstrip('/')}/runs/flow-run/{parent}"
    return links


@task(name="publish challenger", cache_policy=NO_CACHE, **TRANSIENT)
def publish_challenger(
    model: str, version: str, reasons: Sequence[str], verdict: GateVerdict, training: Training, links: dict[str, str],
    dropped: str = "",
) -> None:
    """The challenger's gate verdict and metrics as the model's ``retrain-<model>`` artifact.

    ``dropped``: the data gate's section on the sensors left out of training (Markdown).
    """
    create_markdown_artifact(
        key=artifact_key("retrain", model), description=f"Retraining of {model}: challenger v{version}",
        markdown=challenger_markdown(model, version, reasons, verdict, training.search, training.challenger,
                                     training.champion, links) + (f"\n{dropped}" if dropped else "")
                 + "\n" + evidence_markdown(verdict, training, version),
    )


def gate_metrics(training: Training, verdict: GateVerdict) -> dict[str, dict[str, float]]:
    """Both models' holdout metrics with their intervals, the paired comparison and the CV estimates."""
    metrics: dict[str, dict[str, float]] = {"challenger": training.challenger, "champion": training.champion or {}}
    if verdict.paired or training.paired_extra:
        metrics["paired"] = {**(verdict.paired or {}), **(training.paired_extra or {})}
    cv = {"challenger": training.challenger_cv, "champion": training.champion_cv}
    metrics["cv"] = {k: v for k, v in cv.items() if v is not None}
    return metrics


def evidence_markdown(verdict: GateVerdict, training: Training, version: str) -> str:
    """The metrics with n_fail, their intervals and the paired test, and what the gate judged on."""
    basis = ("the holdout (paired DeLong vs the champion)" if verdict.basis == "holdout"
             else "the time-series CV estimates (too few fails in the holdout)")
    return (f"### With their uncertainty\n\nJudged on {basis}; intervals at "
            f"{100 * (1 - training.search.policy.gate_alpha):g} %.\n\n"
            + uncertainty_table(gate_metrics(training, verdict), training.champion_version, version))


@task(name="finish trigger", cache_policy=NO_CACHE, **TRANSIENT)
def finish_trigger(engine: AsyncEngine, trigger_id: int, outcome: str) -> None:
    """Close the retrain trigger with its outcome; its cooldown starts now."""
    store.run_sync(store.finish_trigger(engine, trigger_id, outcome))

