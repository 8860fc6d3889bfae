"""The Optuna/LightGBM tuner: learns, persists its study, calls back per trial, is deterministic."""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd
import pytest

from fabloop.core.policies import RetrainPolicy
from fabloop.core.training import DataGateError
from fabloop.core.tuning import TrialRecord, time_folds, tune


def learnable_wafers(n: int = 600, n_features: int = 30, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Process-ordered wafers whose fails depend (non-linearly) on three sensors."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_features))
    logit = 2.0 * X[:, 0] - 1.5 * X[:, 1] + 2.0 * (X[:, 2] > 0.8) + rng.normal(scale=0.7, size=n)
    y = (logit > np.quantile(logit, 0.88)).astype(int)
    X[rng.random(X.shape) < 0.02] = np.nan  # sporadic sensor dropouts
    return pd.DataFrame(X, columns=[f"sensor_{i:02d}" for i in range(n_features)]), y


FAST = dict(n_trials=4, timeout_s=None, n_folds=3, max_boost_rounds=200, early_stopping_rounds=20)


@pytest.fixture(scope="module")
def wafers():
    return learnable_wafers()


@pytest.fixture(scope="module")
def persisted(tmp_path_factory, wafers):
    """One search persisted to a sqlite study, recording every trial callback."""
    X, y = wafers
    url = f"sqlite:///{tmp_path_factory.mktemp('optuna') / 'studies.db'}"
    records: list[TrialRecord] = []
    result = tune(X, y, RetrainPolicy(**FAST, seed=11), storage=url, study_name="etch-ch2", on_trial=records.append)
    return url, result, records


def test_tuner_learns_the_signal(persisted):
    _, result, _ = persisted
    assert result.lgbm_cv_auc > 0.8
    assert result.baseline_cv_auc > 0.5
    assert len(result.lgbm_fold_aucs) == len(result.baseline_fold_aucs) == 3
    assert result.lgbm_cv_auc == pytest.approx(np.mean(result.lgbm_fold_aucs))
    assert result.winner == ("lightgbm" if result.lgbm_cv_auc > result.baseline_cv_auc else "baseline")
    assert 1 <= result.best_iteration <= FAST["max_boost_rounds"]
    assert result.n_complete + result.n_pruned + result.n_failed == result.n_trials == 4
    assert {"learning_rate", "num_leaves", "scale_pos_weight"} <= result.best_params.keys()


def test_study_is_persisted_and_shared_through_storage(persisted, wafers):
    url, result, _ = persisted
    study = optuna.load_study(study_name="etch-ch2", storage=url)
    trials = study.get_trials()
    assert len(trials) == 4
    assert all(t.state.is_finished() for t in trials)
    assert study.best_value == pytest.approx(result.lgbm_cv_auc)
    # A second worker pointed at the same study adds its trials to it.
    X, y = wafers
    again = tune(X, y, RetrainPolicy(**{**FAST, "n_trials": 2}, seed=12), storage=url, study_name="etch-ch2")
    assert again.n_trials == 6
    assert len(optuna.load_study(study_name="etch-ch2", storage=url).trials) == 6
    assert again.lgbm_cv_auc >= result.lgbm_cv_auc


def test_on_trial_is_called_once_per_trial(persisted):
    _, result, records = persisted
    assert [r.number for r in records] == [0, 1, 2, 3]
    for r in records:
        assert r.state in ("COMPLETE", "PRUNED")
        assert r.duration_s > 0
        if r.state == "COMPLETE":
            assert 0.5 < r.cv_auc <= 1 and len(r.fold_aucs) == 3 and r.best_iteration >= 1
        else:
            assert r.cv_auc is None and r.last_round is not None
    assert max(r.cv_auc for r in records if r.cv_auc is not None) == pytest.approx(result.lgbm_cv_auc)


def test_same_seed_gives_the_same_search(wafers):
    X, y = wafers
    policy = RetrainPolicy(**{**FAST, "n_trials": 3}, seed=5)
    runs = []
    for _ in range(2):
        records: list[TrialRecord] = []
        res = tune(X, y, policy, on_trial=records.append)
        runs.append((res, [(r.params, r.cv_auc, r.last_round) for r in records]))
    (a, trials_a), (b, trials_b) = runs
    assert trials_a == trials_b
    assert a.best_params == b.best_params and a.lgbm_cv_auc == b.lgbm_cv_auc
    assert a.study_name != b.study_name  # fresh in-memory studies, not a shared one
    other = tune(X, y, policy.model_copy(update={"seed": 6, "n_trials": 1}))
    assert other.best_params != a.best_params


def test_fit_final_trains_the_winner(persisted, wafers):
    _, result, _ = persisted
    X, y = wafers
    X_tr, y_tr, X_val, y_val = X.iloc[:480], y[:480], X.iloc[480:], y[480:]
    final = result.model_copy(update={"winner": "lightgbm"}).fit_final(X_tr, y_tr, X_val, y_val)
    assert final.kind == "lightgbm"
    assert final.best_iteration == result.cv_rounds_for(480) == final.model.current_iteration()
    scores = final.predict_score(X_val[list(reversed(X.columns))])  # columns matched by name
    assert scores.shape == (120,) and ((scores >= 0) & (scores <= 1)).all()
    assert final.val_auc > 0.75

    stopped = result.model_copy(update={"winner": "lightgbm"}).fit_final(
        X_tr, y_tr, X_val, y_val, rounds="early_stopping"
    )
    assert 1 <= stopped.best_iteration <= result.policy.max_boost_rounds

    base = result.model_copy(update={"winner": "baseline"}).fit_final(X_tr, y_tr, X_val, y_val)
    assert base.kind == "baseline" and base.val_auc > 0.75
    with pytest.raises(DataGateError, match="sensor_03"):
        base.predict_score(X_val.drop(columns=["sensor_03"]))


def test_time_folds_only_look_back():
    y = np.tile([0, 0, 0, 1], 50)
    folds = time_folds(y, n_folds=4, min_train_share=0.5)
    assert sum(len(va) for _, va in folds) == 100
    fails = [int(y[va].sum()) for _, va in folds]
    assert max(fails) - min(fails) <= 1  # blocks share the fails, so each has an AUC
    for train_idx, val_idx in folds:
        assert train_idx.max() < val_idx.min()  # nothing from the future in training
        assert train_idx.min() == 0 and (np.diff(val_idx) == 1).all()
    assert folds[0][1][0] == 100 and folds[-1][1][-1] == 199


def test_time_folds_follow_the_fails_not_the_rows():
    y = np.zeros(400, dtype=int)
    y[200:260:6] = 1  # all the recent fails sit in one stretch
    y[[5, 50, 120]] = 1
    folds = time_folds(y, n_folds=3)
    assert all(0 < int(y[va].sum()) < len(va) for _, va in folds)


def test_time_fold_without_fails_is_named():
    y = np.zeros(200, dtype=int)
    y[:100:5] = 1  # fails stop after wafer 100: later validation blocks have none
    with pytest.raises(DataGateError, match=r"time fold 0: validation rows \[100:133\) hold 0 fails of 33"):
        time_folds(y, n_folds=3)


def test_tune_rejects_misaligned_labels(wafers):
    X, y = wafers
    with pytest.raises(DataGateError, match="600 rows but y has 599"):
        tune(X, y[:-1], RetrainPolicy(**FAST))


def test_binned_fold_datasets_are_reused_across_trials(wafers):
    """Changing booster params between trials must not re-bin the fold datasets."""
    from fabloop.core.tuning import build_fold_datasets, fixed_lgbm_params, lockstep_cv

    X, y = wafers
    policy = RetrainPolicy(**FAST)
    fold_data = build_fold_datasets(X, y, time_folds(y, 3), policy)
    handles = [(tr._handle.value, va._handle.value) for tr, va in fold_data]
    for min_leaf, leaves in ((5, 31), (60, 4)):  # min_data_in_leaf is a dataset param unless pre-filter is off
        params = {**fixed_lgbm_params(policy), "min_data_in_leaf": min_leaf, "num_leaves": leaves}
        out = lockstep_cv(params, fold_data, policy)
        assert out.mean_auc > 0.7 and out.best_iteration <= out.last_round
    assert [(tr._handle.value, va._handle.value) for tr, va in fold_data] == handles


def test_time_folds_share_the_fails_not_the_rows():
    y = np.zeros(400, dtype=int)
    y[:200:10] = 1  # the training-only half
    y[200:300:25] = 1  # 4 sparse fails, then a cluster of 8 late ones
    y[300:400:12] = 1
    folds = time_folds(y, n_folds=3)
    fails = [int(y[va].sum()) for _, va in folds]
    sizes = [len(va) for _, va in folds]
    assert max(fails) - min(fails) <= 1 and sum(fails) == int(y[200:].sum())
    assert sizes[0] > sizes[-1]  # the sparse early block is wider
    assert folds[0][1][0] == 200 and folds[-1][1][-1] == 399
    for train_idx, val_idx in folds:
        assert train_idx.max() + 1 == val_idx.min()
