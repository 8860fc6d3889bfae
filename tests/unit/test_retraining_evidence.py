"""The paired evidence a retraining logs next to its holdout metrics (pure: no stack)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fabloop.core.policies import RetrainPolicy
from fabloop.tasks.retraining import _paired_bootstrapped


def _holdout(seed: int = 3) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(600) < 0.1).astype(int)
    sharp = np.clip(0.7 * y + rng.normal(0.2, 0.12, y.size), 0, 1)  # separates fails well
    blunt = np.clip(0.25 * y + rng.normal(0.3, 0.2, y.size), 0, 1)  # many passes above its threshold
    return pd.Series(y), sharp, blunt


def test_precision_at_each_models_operating_point_is_compared_paired_with_interval_and_p() -> None:
    y, sharp, blunt = _holdout()
    policy = RetrainPolicy()
    out = _paired_bootstrapped(y, sharp, blunt, (0.6, 0.45), policy)
    assert {"pr_auc_diff", "pr_auc_diff_p", "precision_at_op_diff", "precision_at_op_diff_p"} <= out.keys()
    assert out["precision_at_op_diff"] > 0.2 and out["precision_at_op_diff_p"] < 0.01
    assert out["precision_at_op_diff_ci_low"] <= out["precision_at_op_diff"] <= out["precision_at_op_diff_ci_high"]
    same = _paired_bootstrapped(y, sharp, sharp, (0.6, 0.6), policy)
    assert same["precision_at_op_diff"] == 0 and same["precision_at_op_diff_p"] == 1.0


def test_without_a_champion_threshold_only_pr_auc_is_compared() -> None:
    y, sharp, blunt = _holdout()
    out = _paired_bootstrapped(y, sharp, blunt, (0.6, None), RetrainPolicy())
    assert "pr_auc_diff" in out and "precision_at_op_diff" not in out
