"""Fast challenger search: Optuna TPE over native LightGBM on time-ordered folds.

Why it is fast (and the naive ``LGBMClassifier`` + ``cross_val_score`` loop is not):

* each fold's ``lgb.Dataset`` is binned **once** and reused by every trial. Only
  booster parameters are searched; the dataset parameters (``max_bin``,
  ``feature_pre_filter=False`` so ``min_data_in_leaf`` may vary) stay fixed for the
  study, because LightGBM silently re-bins a constructed dataset (or raises, when
  its raw data was freed) if a trial changes them;
* all folds are boosted in lockstep and stopped early on the *mean* fold AUC, so a
  trial costs the rounds it needs, not a searched ``n_estimators``; the lockstep
  also gives one round count for the final model and keeps the CV AUC honest
  (one number is chosen across folds, not one per fold);
* the mean AUC is reported to a ``MedianPruner`` every few rounds, so hopeless
  trials stop after a fraction of their rounds;
* ``num_threads`` is small: on ~1,000-row folds OpenMP overhead costs more than
  a second thread earns on a 2-core box shared with other jobs.

Folds are **forward-chaining in process time** (train on the past, validate on the
next block): fab data drifts (chamber aging, PMs, recipe tweaks), and stratified
random folds would let a trial learn from wafers processed after the ones it is
scored on, rewarding parameters that memorise the drift. Callers pass rows in
process-time order (e.g. ``Split.train``).

Imbalance (~1 fail in 15) is handled by searching ``scale_pos_weight`` and by using
AUC, which does not depend on a threshold. Label 1 = failing wafer.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import lightgbm as lgb
import numpy as np
import optuna
import pandas as pd
from pydantic import BaseModel, Field
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from fabloop.core.policies import RetrainPolicy
from fabloop.core.training import DataGateError

Fold = tuple[np.ndarray, np.ndarray]

REPORT_EVERY = 10  # boosting rounds between pruning checks
PRUNER_WARMUP_ROUNDS = 30  # a slow learning rate must get a chance before it is judged


class TrialRecord(BaseModel):
    """One finished trial, as handed to ``on_trial`` (e.g. to log a nested MLflow run)."""

    number: int
    state: Literal["COMPLETE", "PRUNED", "FAIL"]
    params: dict[str, Any]
    cv_auc: float | None = Field(description="Mean fold ROC-AUC; None unless COMPLETE.")
    fold_aucs: list[float] = Field(default_factory=list)
    best_iteration: int | None = None
    last_round: int | None = Field(None, description="Rounds boosted before stop/prune.")
    duration_s: float


# --- folds -----------------------------------------------------------------------


def time_folds(y: Sequence[int] | np.ndarray, n_folds: int, min_train_share: float = 0.5) -> list[Fold]:
    """Forward-chaining folds over rows already in process-time order.

    Fold k trains on every row before its validation block; the blocks after the
    first ``min_train_share`` of rows are contiguous and hold equal shares of the
    *fails* (not of the rows): with ~1 fail in 15, equal-sized blocks of a few hundred
    wafers often hold no fail at all, and a block without both classes has no AUC.
    """
    y = np.asarray(y).astype(int)
    n = len(y)
    start = int(n * min_train_share)
    fail_rows = np.flatnonzero(y[start:]) + start
    if len(fail_rows) >= n_folds:
        groups = np.array_split(fail_rows, n_folds)
        cuts = [(int(groups[k][-1]) + int(groups[k + 1][0])) // 2 + 1 for k in range(n_folds - 1)]
        edges = np.array([start, *cuts, n])
    else:
        edges = np.linspace(start, n, n_folds + 1).round().astype(int)
    folds: list[Fold] = []
    for k in range(n_folds):
        lo, hi = int(edges[k]), int(edges[k + 1])
        train_idx, val_idx = np.arange(0, lo), np.arange(lo, hi)
        for part, a, b in (("train", 0, lo), ("validation", lo, hi)):
            n_fail = int(y[a:b].sum())
            if n_fail == 0 or n_fail == b - a:
                raise DataGateError(
                    f"time fold {k}: {part} rows [{a}:{b}) hold {n_fail} fails of {b - a}; "
                    "both classes are needed (use fewer folds or more data)"
                )
        folds.append((train_idx, val_idx))
    return folds


# --- search space ---------------------------------------------------------------


def suggest_lgbm_params(trial: optuna.Trial, pos_weight_max: float) -> dict[str, Any]:
    """The searched LightGBM booster parameters (native names).

    ``scale_pos_weight`` spans 1 (ignore imbalance) to ``pos_weight_max`` (about
    n_pass / n_fail: fully balanced).
    """
    return {
        "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.3, log=True),
        "num_leaves": trial.suggest_int("num_leaves", 4, 64, log=True),
        "min_data_in_leaf": trial.suggest_int("min_data_in_leaf", 5, 100, log=True),
        "feature_fraction": trial.suggest_float("feature_fraction", 0.2, 1.0),
        "bagging_fraction": trial.suggest_float("bagging_fraction", 0.5, 1.0),
        "lambda_l1": trial.suggest_float("lambda_l1", 1e-8, 10.0, log=True),
        "lambda_l2": trial.suggest_float("lambda_l2", 1e-8, 10.0, log=True),
        "scale_pos_weight": trial.suggest_float("scale_pos_weight", 1.0, max(pos_weight_max, 1.01), log=True),
    }


def fixed_lgbm_params(policy: RetrainPolicy) -> dict[str, Any]:
    """Booster parameters that stay constant for the study (seeded, deterministic)."""
    return {
        "objective": "binary",
        "metric": "auc",
        "verbosity": -1,
        "num_threads": 1,  # parallelism is across folds (see lockstep_cv), not OpenMP
        "seed": policy.seed,
        "bagging_seed": policy.seed + 1,
        "feature_fraction_seed": policy.seed + 2,
        "deterministic": True,
        "force_col_wise": True,
        "bagging_freq": 1,
    }


def dataset_params(policy: RetrainPolicy) -> dict[str, Any]:
    """Binning parameters: fixed for the study so the binned datasets can be reused."""
    return {"max_bin": policy.max_bin, "feature_pre_filter": False, "verbosity": -1, "data_random_seed": policy.seed}


def _as_matrix(X: pd.DataFrame | np.ndarray) -> np.ndarray:
    return np.asarray(X, dtype=np.float64)


def build_fold_datasets(
    X: pd.DataFrame, y: np.ndarray, folds: Sequence[Fold], policy: RetrainPolicy
) -> list[tuple[lgb.Dataset, lgb.Dataset]]:
    """Bin each fold once (validation binned with the train fold's bin edges)."""
    Xm, names = _as_matrix(X), [str(c) for c in X.columns]
    out = []
    for tr, va in folds:
        dtrain = lgb.Dataset(Xm[tr], y[tr], feature_name=names, params=dataset_params(policy), free_raw_data=False)
        dval = lgb.Dataset(
            Xm[va], y[va], reference=dtrain, params=dataset_params(policy), free_raw_data=False
        )
        dtrain.construct()
        dval.construct()
        out.append((dtrain, dval))
    return out


@dataclass
class _CVOutcome:
    mean_auc: float
    fold_aucs: list[float]
    best_iteration: int
    last_round: int


def lockstep_cv(
    params: dict[str, Any],
    fold_data: Sequence[tuple[lgb.Dataset, lgb.Dataset]],
    policy: RetrainPolicy,
    trial: optuna.Trial | None = None,
) -> _CVOutcome:
    """Boost every fold one round at a time; early-stop and prune on the mean fold AUC."""
    boosters = []
    for dtrain, dval in fold_data:
        booster = lgb.Booster(params=params, train_set=dtrain)
        booster.add_valid(dval, "valid")
        boosters.append(booster)
    best, best_it, best_folds = -math.inf, 0, [float("nan")] * len(boosters)
    it = 0
    workers = min(policy.num_threads, len(boosters))
    pool = (
        ThreadPoolExecutor(workers, thread_name_prefix="fold", initializer=_quiet_lightgbm_thread)
        if workers > 1
        else None
    )
    try:
        for it in range(1, policy.max_boost_rounds + 1):
            if pool is None:
                aucs = [_boost_one_round(b) for b in boosters]
            else:
                aucs = list(pool.map(_boost_one_round, boosters))
            mean = float(np.mean(aucs))
            if mean > best + 1e-9:
                best, best_it, best_folds = mean, it, [float(a) for a in aucs]
            elif it - best_it >= policy.early_stopping_rounds:
                break
            if trial is not None and it % REPORT_EVERY == 0:
                trial.report(best, it)
                if trial.should_prune():
                    trial.set_user_attr("last_round", it)
                    raise optuna.TrialPruned(f"mean fold AUC {best:.4f} after {it} rounds")
    finally:
        if pool is not None:
            pool.shutdown()
    return _CVOutcome(best, best_folds, best_it, it)


def _quiet_lightgbm_thread() -> None:
    """LightGBM's log level is thread-local: silence it in each fold worker thread too."""
    quiet = lgb.basic._c_str("verbosity=-1")
    lgb.basic._safe_call(lgb.basic._LIB.LGBM_DatasetUpdateParamChecking(quiet, quiet))


def _boost_one_round(booster: lgb.Booster) -> float:
    """One boosting round on one fold; returns its validation AUC (GIL released in C)."""
    booster.update()
    return float(booster.eval_valid()[0][2])



# --- baseline ---------------------------------------------------------------------


def make_baseline() -> Pipeline:
    """Regularised logistic regression: the 'is boosting worth it?' yardstick."""
    return make_pipeline(
        SimpleImputer(strategy="median"),
        StandardScaler(),
        LogisticRegression(C=0.05, class_weight="balanced", max_iter=2000),
    )


def baseline_cv(X: pd.DataFrame, y: np.ndarray, folds: Sequence[Fold]) -> list[float]:
    """Baseline ROC-AUC per fold (same folds as the LightGBM search)."""
    Xm = _as_matrix(X)
    aucs = []
    # Single-threaded BLAS: on a busy 2-core box a spinning second BLAS thread made
    # these small fits ~6x slower.
    with threadpool_limits(1):
        for tr, va in folds:
            model = make_baseline().fit(Xm[tr], y[tr])
            aucs.append(float(roc_auc_score(y[va], model.predict_proba(Xm[va])[:, 1])))
    return aucs


# --- result -----------------------------------------------------------------------


@dataclass
class FinalModel:
    """The trained winner: ``model`` is an ``lgb.Booster`` or a sklearn ``Pipeline``."""

    kind: Literal["lightgbm", "baseline"]
    model: Any
    feature_names: list[str]
    best_iteration: int | None
    val_auc: float

    def predict_score(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        """Probability that each wafer fails."""
        if isinstance(X, pd.DataFrame):
            missing = [c for c in self.feature_names if c not in X.columns]
            if missing:
                raise DataGateError(f"scoring frame lacks features {missing[:10]}")
            X = X[self.feature_names]
        Xm = _as_matrix(X)
        if self.kind == "lightgbm":
            return np.asarray(self.model.predict(Xm, num_iteration=self.best_iteration))
        return np.asarray(self.model.predict_proba(Xm)[:, 1], dtype=float)


class TuneResult(BaseModel):
    """Outcome of a search: which model family won and how to train it for real."""

    winner: Literal["lightgbm", "baseline"]
    best_params: dict[str, Any] = Field(description="Full LightGBM booster params of the best trial.")
    best_iteration: int
    lgbm_cv_auc: float
    lgbm_fold_aucs: list[float]
    baseline_cv_auc: float
    baseline_fold_aucs: list[float]
    n_trials: int = Field(description="Finished trials in the study (all workers).")
    n_complete: int
    n_pruned: int
    n_failed: int
    study_name: str
    folds: list[tuple[int, int, int]] = Field(description="(train_end, val_start, val_end) row offsets.")
    feature_names: list[str]
    search_s: float
    baseline_s: float
    policy: RetrainPolicy

    def cv_rounds_for(self, n_train: int) -> int:
        """CV-chosen boosting rounds, scaled to a training set of ``n_train`` rows."""
        mean_fold_train = float(np.mean([train_end for train_end, _, _ in self.folds]))
        rounds = round(self.best_iteration * n_train / mean_fold_train)
        return int(min(self.policy.max_boost_rounds, max(1, rounds)))

    def fit_final(
        self,
        X_train: pd.DataFrame,
        y_train: Sequence[int] | np.ndarray,
        X_val: pd.DataFrame,
        y_val: Sequence[int] | np.ndarray,
        rounds: Literal["cv", "early_stopping"] = "cv",
    ) -> FinalModel:
        """Train the winner on ``X_train`` and score it on ``X_val`` (``FinalModel.val_auc``).

        ``rounds="cv"`` (default) boosts for the round count the search chose by early
        stopping on the mean of all time folds, scaled to ``len(X_train)``.
        ``rounds="early_stopping"`` early-stops on ``X_val`` instead; on a SECOM-sized
        validation slice (~200 wafers, ~15 fails) its AUC peaks by chance within a few
        rounds, which cost 0.05-0.14 holdout AUC in benchmarks/tuning.py.
        """
        y_train, y_val = np.asarray(y_train).astype(int), np.asarray(y_val).astype(int)
        X_train, X_val = X_train[self.feature_names], X_val[self.feature_names]
        if self.winner == "baseline":
            with threadpool_limits(1):
                model = make_baseline().fit(_as_matrix(X_train), y_train)
            fm = FinalModel("baseline", model, self.feature_names, None, float("nan"))
        else:
            ds = dataset_params(self.policy)
            dtrain = lgb.Dataset(_as_matrix(X_train), y_train, feature_name=self.feature_names, params=ds)
            dval = lgb.Dataset(_as_matrix(X_val), y_val, reference=dtrain, params=ds)
            if rounds == "cv":
                booster = lgb.train(self.best_params, dtrain, num_boost_round=self.cv_rounds_for(len(y_train)))
                best_iteration = booster.current_iteration()
            else:
                booster = lgb.train(
                    self.best_params,
                    dtrain,
                    num_boost_round=self.policy.max_boost_rounds,
                    valid_sets=[dval],
                    valid_names=["valid"],
                    callbacks=[lgb.early_stopping(self.policy.early_stopping_rounds, verbose=False)],
                )
                best_iteration = booster.best_iteration
            fm = FinalModel("lightgbm", booster, self.feature_names, best_iteration, float("nan"))
        fm.val_auc = float(roc_auc_score(y_val, fm.predict_score(X_val)))
        return fm


def _record(trial: optuna.trial.FrozenTrial) -> TrialRecord:
    state = trial.state.name if trial.state.name in ("COMPLETE", "PRUNED") else "FAIL"
    dur = trial.duration.total_seconds() if trial.duration is not None else 0.0
    return TrialRecord(
        number=trial.number,
        state=state,
        params=dict(trial.params),
        cv_auc=trial.value if state == "COMPLETE" else None,
        fold_aucs=trial.user_attrs.get("fold_aucs", []),
        best_iteration=trial.user_attrs.get("best_iteration"),
        last_round=trial.user_attrs.get("last_round"),
        duration_s=dur,
    )


def tune(
    X: pd.DataFrame,
    y: pd.Series | np.ndarray,
    policy: RetrainPolicy,
    storage: str | None = None,
    study_name: str | None = None,
    on_trial: Callable[[TrialRecord], None] | None = None,
) -> TuneResult:
    """Search LightGBM hyper-parameters on time folds and compare with the baseline.

    ``X`` rows must be in process-time order. ``storage`` is an Optuna RDB URL
    (``sqlite:///...``, ``postgresql://...``); workers that pass the same URL and
    ``study_name`` share one study (give each worker its own ``policy.seed`` so their
    random start-up trials differ, and put the data hash in the study name so trials
    on different data never mix). ``policy.n_trials`` is the number of trials *this*
    call runs. ``on_trial`` is called after every finished trial, pruned ones included.
    """
    if not isinstance(X, pd.DataFrame):
        raise TypeError(f"X must be a pandas DataFrame with feature names, got {type(X).__name__}")
    y_arr = np.asarray(y).astype(int)
    if len(y_arr) != len(X):
        raise DataGateError(f"X has {len(X)} rows but y has {len(y_arr)}")
    folds = time_folds(y_arr, policy.n_folds, policy.min_train_share)

    t0 = time.perf_counter()
    base_aucs = baseline_cv(X, y_arr, folds)
    baseline_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    fold_data = build_fold_datasets(X, y_arr, folds, policy)
    n_fail = int(y_arr.sum())
    pos_weight_max = (len(y_arr) - n_fail) / max(n_fail, 1)
    fixed = fixed_lgbm_params(policy)

    def objective(trial: optuna.Trial) -> float:
        params = {**fixed, **suggest_lgbm_params(trial, pos_weight_max)}
        out = lockstep_cv(params, fold_data, policy, trial)
        trial.set_user_attr("fold_aucs", out.fold_aucs)
        trial.set_user_attr("best_iteration", out.best_iteration)
        trial.set_user_attr("last_round", out.last_round)
        return out.mean_auc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=storage,
        study_name=study_name or f"fabloop-{uuid.uuid4().hex[:12]}",
        direction="maximize",
        sampler=optuna.samplers.TPESampler(
            seed=policy.seed, n_startup_trials=max(3, min(10, policy.n_trials // 3)), multivariate=True
        ),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=3, n_warmup_steps=PRUNER_WARMUP_ROUNDS, interval_steps=REPORT_EVERY
        ),
        load_if_exists=True,
    )
    callbacks = [lambda _study, frozen: on_trial(_record(frozen))] if on_trial is not None else None
    study.optimize(objective, n_trials=policy.n_trials, timeout=policy.timeout_s, callbacks=callbacks)
    search_s = time.perf_counter() - t0

    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    n_complete = states.count(optuna.trial.TrialState.COMPLETE)
    if n_complete == 0:
        raise RuntimeError(f"study {study.study_name!r}: no trial completed ({len(trials)} finished)")
    best = study.best_trial
    assert best.value is not None  # a COMPLETE trial has its value
    lgbm_auc = float(best.value)
    base_auc = float(np.mean(base_aucs))
    return TuneResult(
        winner="lightgbm" if lgbm_auc > base_auc else "baseline",  # a tie goes to the simpler model
        best_params={**fixed, **best.params},
        best_iteration=int(best.user_attrs["best_iteration"]),
        lgbm_cv_auc=lgbm_auc,
        lgbm_fold_aucs=list(best.user_attrs["fold_aucs"]),
        baseline_cv_auc=base_auc,
        baseline_fold_aucs=base_aucs,
        n_trials=sum(s.is_finished() for s in states),
        n_complete=n_complete,
        n_pruned=states.count(optuna.trial.TrialState.PRUNED),
        n_failed=states.count(optuna.trial.TrialState.FAIL),
        study_name=study.study_name,
        folds=[(int(tr[-1]) + 1, int(va[0]), int(va[-1]) + 1) for tr, va in folds],
        feature_names=[str(c) for c in X.columns],
        search_s=search_s,
        baseline_s=baseline_s,
        policy=policy,
    )
