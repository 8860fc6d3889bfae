"""Benchmark: fabloop's tuner vs a naive Optuna + LGBMClassifier + cross_val_score loop.

Data: a SECOM-shaped synthetic set (1,500 wafers x 590 sensors, ~7% fails) in
process-time order: correlated sensors driven by a few latent process factors, a
slow drift, ~20% constant sensors, a few mostly-missing ones, and a fail signal
(partly non-linear) in a handful of sensors. Both tuners get the SAME rows, the
SAME forward-chaining time folds and the same number of trials over the same
parameter ranges (the naive loop also searches ``n_estimators`` since it cannot stop
early). Afterwards both winners are refit on the same 1,500 wafers and scored on
3,000 *later* wafers from the same process (not timed): fabloop's CV AUC is read at
the early-stopped round and so is slightly optimistic, and ~13 fails per validation fold
make any CV AUC noisy; the holdout AUC is the fairer comparison. CPU seconds are printed
beside wall seconds because the 2 cores are shared and wall time moves with load.

    python benchmarks/tuning.py [--trials 10] [--rows 1500] [--features 590]

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import lightgbm as lgb
import numpy as np
import optuna
import pandas as pd
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_score

from fabloop.core.policies import RetrainPolicy
from fabloop.core.tuning import time_folds, tune


def make_secom_like(n_rows: int, n_features: int, fail_rate: float, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Process-ordered wafers with SECOM's awkward traits and a learnable fail signal."""
    rng = np.random.default_rng(seed)
    n_factors = 20
    t = np.linspace(0.0, 1.0, n_rows)
    factors = rng.normal(size=(n_rows, n_factors))
    factors[:, :3] += np.outer(t, [1.0, -0.7, 0.5])  # slow drift of three process factors
    loadings = rng.normal(scale=rng.uniform(0.2, 1.5, size=n_factors), size=(n_features, n_factors)).T
    X = factors @ loadings + rng.normal(scale=1.0, size=(n_rows, n_features))
    X = X * rng.lognormal(0.0, 1.5, size=n_features) + rng.normal(0, 50, size=n_features)

    # Fail signal: a few sensors, linear + threshold + interaction terms.
    s = (X - X.mean(0)) / X.std(0)
    sig = [5, 17, 42, 99, 150, 233]
    logit = (
        0.9 * s[:, sig[0]]
        - 0.7 * s[:, sig[1]]
        + 1.4 * (s[:, sig[2]] > 1.0)
        + 0.8 * s[:, sig[3]] * s[:, sig[4]]
        + 1.2 * (np.abs(s[:, sig[5]]) > 1.5)
    )
    logit += rng.normal(scale=1.6, size=n_rows)
    cut = np.quantile(logit, 1 - fail_rate)
    y = (logit > cut).astype(int)

    cols = [f"s{i:03d}" for i in range(n_features)]
    df = pd.DataFrame(X, columns=cols)
    free = [i for i in range(n_features) if i not in sig]
    const = rng.choice(free, size=int(0.2 * n_features), replace=False)
    df.iloc[:, const] = 0.0
    free = [i for i in free if i not in set(const)]
    for i in rng.choice(free, size=28, replace=False):  # mostly-missing sensors
        share = rng.uniform(0.5, 0.95)
        df.iloc[rng.random(n_rows) < share, i] = np.nan
    for i in rng.choice(free, size=60, replace=False):  # sporadic sensor dropouts
        df.iloc[rng.random(n_rows) < 0.03, i] = np.nan
    return df, y


def naive_search(X: pd.DataFrame, y: np.ndarray, folds, n_trials: int, seed: int, pos_weight_max: float):
    """What one writes first: sklearn API, cross_val_score, a searched n_estimators."""

    def objective(trial: optuna.Trial) -> float:
        model = lgb.LGBMClassifier(
            n_estimators=trial.suggest_int("n_estimators", 100, 1000),
            learning_rate=trial.suggest_float("learning_rate", 0.01, 0.3, log=True),
            num_leaves=trial.suggest_int("num_leaves", 4, 64, log=True),
            min_child_samples=trial.suggest_int("min_child_samples", 5, 100, log=True),
            colsample_bytree=trial.suggest_float("colsample_bytree", 0.2, 1.0),
            subsample=trial.suggest_float("subsample", 0.5, 1.0),
            subsample_freq=1,
            reg_alpha=trial.suggest_float("reg_alpha", 1e-8, 10.0, log=True),
            reg_lambda=trial.suggest_float("reg_lambda", 1e-8, 10.0, log=True),
            scale_pos_weight=trial.suggest_float("scale_pos_weight", 1.0, pos_weight_max, log=True),
            random_state=seed,
            verbose=-1,
        )
        return float(cross_val_score(model, X, y, cv=folds, scoring="roc_auc").mean())

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=n_trials)
    return study


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1500)
    ap.add_argument("--features", type=int, default=590)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--fail-rate", type=float, default=0.07)
    ap.add_argument("--holdout-rows", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--max-bin", type=int, default=None, help="override RetrainPolicy.max_bin")
    ap.add_argument("--skip-naive", action="store_true", help="only time fabloop (for quick iteration)")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    df, y_all = make_secom_like(args.rows + args.holdout_rows, args.features, args.fail_rate, args.seed)
    X, y = df.iloc[: args.rows].reset_index(drop=True), y_all[: args.rows]
    X_hold, y_hold = df.iloc[args.rows :].reset_index(drop=True), y_all[args.rows :]
    extra = {"max_bin": args.max_bin} if args.max_bin else {}
    policy = RetrainPolicy(n_trials=args.trials, timeout_s=None, n_folds=4, seed=args.seed, **extra)
    folds = time_folds(y, policy.n_folds, policy.min_train_share)
    pos_weight_max = float((len(y) - y.sum()) / y.sum())
    load_before = os.getloadavg()[0]

    t0, c0 = time.perf_counter(), time.process_time()
    res = tune(X, y, policy)
    fabloop_s, fabloop_cpu = time.perf_counter() - t0, time.process_time() - c0
    # Refit on all tuning rows (as the naive winner is); the later wafers only score.
    final = res.fit_final(X, y, X_hold, y_hold)
    fabloop_hold = float(roc_auc_score(y_hold, final.predict_score(X_hold)))
    print(
        f"fabloop: {fabloop_s:.1f}s winner={res.winner} lgbm_cv={res.lgbm_cv_auc:.4f} "
        f"baseline_cv={res.baseline_cv_auc:.4f} pruned={res.n_pruned}/{res.n_trials} "
        f"best_iter={res.best_iteration} baseline_s={res.baseline_s:.1f} holdout_auc={fabloop_hold:.4f}",
        file=sys.stderr,
    )
    out = {"bench": "tuning", "rows": len(y), "features": X.shape[1], "trials": args.trials}
    if args.skip_naive:
        out.update(
            {
                "fabloop_s": round(fabloop_s, 2),
                "fabloop_cpu_s": round(fabloop_cpu, 2),
                "fabloop_cv_auc": round(res.lgbm_cv_auc, 4),
                "fabloop_holdout_auc": round(fabloop_hold, 4),
            }
        )
        print(json.dumps(out))
        return

    t0, c0 = time.perf_counter(), time.process_time()
    naive = naive_search(X, y, folds, args.trials, args.seed, pos_weight_max)
    naive_s, naive_cpu = time.perf_counter() - t0, time.process_time() - c0
    nb = naive.best_trial.params
    naive_model = lgb.LGBMClassifier(subsample_freq=1, random_state=args.seed, verbose=-1, **nb).fit(X, y)
    naive_hold = float(roc_auc_score(y_hold, naive_model.predict_proba(X_hold)[:, 1]))
    print(f"naive: {naive_s:.1f}s cv={naive.best_value:.4f} holdout_auc={naive_hold:.4f}", file=sys.stderr)

    fab_auc = max(res.lgbm_cv_auc, res.baseline_cv_auc)  # the winner's CV AUC
    out.update(
        {
            "fabloop_s": round(fabloop_s, 2),
            "naive_s": round(naive_s, 2),
            "speedup": round(naive_s / fabloop_s, 2),
            "fabloop_cv_auc": round(fab_auc, 4),
            "naive_cv_auc": round(naive.best_value, 4),
            "auc_delta": round(fab_auc - naive.best_value, 4),
            "fabloop_winner": res.winner,
            "fabloop_lgbm_cv_auc": round(res.lgbm_cv_auc, 4),
            "fabloop_pruned": res.n_pruned,
            "fabloop_cpu_s": round(fabloop_cpu, 2),
            "naive_cpu_s": round(naive_cpu, 2),
            "fabloop_holdout_auc": round(fabloop_hold, 4),
            "naive_holdout_auc": round(naive_hold, 4),
            "holdout_rows": len(y_hold),
            "loadavg_1m_start": round(load_before, 2),
            "loadavg_1m_end": round(os.getloadavg()[0], 2),
        }
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
