"""The statistics every verdict on a metric rests on, checked against known values."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fabloop.core.stats import (
    AucEstimate,
    auc_drop_p,
    binomial_excess_p,
    bootstrap_ci,
    delong_auc,
    hanley_mcneil_var,
    paired_bootstrap,
    paired_delong,
    proportion_ci,
)


def _scored(seed: int, n: int, fail_rate: float, separation: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < fail_rate).astype(int)
    return y, rng.normal(size=n) + separation * y


def test_delong_by_hand_with_ties() -> None:
    # Fails score 0.5 and 0.9, passes 0.1 and 0.5: the tie counts one half.
    est = delong_auc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9])
    assert est.auc == pytest.approx(0.875) and (est.n_fail, est.n_pass) == (2, 2)
    # Structural components: fails (0.75, 1), passes (1, 0.75); var = s²/2 + s²/2 with s² = 0.03125.
    assert est.var == pytest.approx(0.03125)


def test_delong_auc_matches_sklearn_and_a_bootstrap() -> None:
    y, s = _scored(0, 400, 0.1, 1.2)
    est = delong_auc(y, s)
    assert est.auc == pytest.approx(roc_auc_score(y, s))
    rng = np.random.default_rng(1)
    boot = []
    for _ in range(1500):
        idx = rng.integers(0, len(y), len(y))
        boot.append(roc_auc_score(y[idx], s[idx]))
    assert est.var == pytest.approx(np.var(boot), rel=0.2)
    lo, hi = est.ci(0.05)
    assert lo < est.auc < hi and hi - lo == pytest.approx(2 * 1.959964 * math.sqrt(est.var))


def test_hanley_mcneil_by_hand_and_against_delong() -> None:
    # A = 0.9 on 50 fails / 50 passes: Q1 = 0.9/1.1, Q2 = 2*0.81/1.9,
    # var = (0.09 + 49 (Q1 - 0.81) + 49 (Q2 - 0.81)) / 2500 = 0.0010319.
    assert hanley_mcneil_var(0.9, 50, 50) == pytest.approx(0.0010319, rel=1e-4)
    # For a binormal scorer its exponential model is conservative: wider than DeLong, same order.
    y, s = _scored(2, 3000, 0.1, 1.0)
    est = delong_auc(y, s)
    assert est.var < hanley_mcneil_var(est.auc, est.n_fail, est.n_pass) < 2 * est.var


def test_paired_delong_matches_two_single_ones_and_detects_a_better_scorer() -> None:
    y, s = _scored(3, 500, 0.1, 1.5)
    worse = s + np.random.default_rng(4).normal(size=len(s)) * 1.5
    paired = paired_delong(y, s, worse)
    a, b = delong_auc(y, s), delong_auc(y, worse)
    assert (paired.auc_a, paired.var_a) == pytest.approx((a.auc, a.var))
    assert (paired.auc_b, paired.var_b) == pytest.approx((b.auc, b.var))
    assert paired.cov > 0  # same wafers: the two AUCs move together, the difference is tighter than unpaired
    assert paired.se < math.sqrt(a.var + b.var)
    assert paired.diff > 0 and paired.p_value < 0.01 and paired.ci(0.05)[0] > 0
    same = paired_delong(y, s, s)
    assert same.diff == 0 and same.p_value == 1.0


def test_auc_drop_p_uses_both_variances() -> None:
    window = AucEstimate(auc=0.899, var=hanley_mcneil_var(0.899, 13, 187), n_fail=13, n_pass=187)
    exact_ref = auc_drop_p(window, 0.961, 0.0)
    with_ref = auc_drop_p(window, 0.961, hanley_mcneil_var(0.961, 14, 286))
    assert 0.05 < exact_ref < with_ref < 0.5


def test_binomial_and_proportion_interval() -> None:
    # 13 fails of 200 where 5 % are expected: P(X >= 13 | n=200, p=0.05) (scipy: 0.2035).
    assert binomial_excess_p(13, 200, 0.05) == pytest.approx(0.2035, abs=1e-3)
    assert binomial_excess_p(40, 200, 0.05) < 1e-10
    lo, hi = proportion_ci(3, 90)
    assert 0 < lo < 3 / 90 < hi < 0.1  # Wilson stays inside [0, 1] on three fails
    assert proportion_ci(0, 0) == (0.0, 1.0)


def test_bootstrap_ci_keeps_the_fail_count() -> None:
    y, s = _scored(5, 300, 0.1, 1.5)
    lo, hi = bootstrap_ci(y, s, roc_auc_score, draws=300, seed=0)
    est = delong_auc(y, s)
    assert lo < est.auc < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * est.se, rel=0.3)


def test_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both classes"):
        delong_auc([0, 0, 0], [0.1, 0.2, 0.3])


def test_paired_bootstrap_agrees_with_paired_delong_on_roc_auc() -> None:
    y, s = _scored(6, 500, 0.1, 1.5)
    worse = s + np.random.default_rng(7).normal(size=len(s)) * 1.5
    diff, lo, hi, p = paired_bootstrap(y, s, worse, roc_auc_score, draws=400, seed=1)
    delong = paired_delong(y, s, worse)
    assert diff == pytest.approx(delong.diff)
    assert (hi - lo) == pytest.approx(2 * 1.96 * delong.se, rel=0.3)
    assert p < 0.05 and delong.p_value < 0.05
    same = paired_bootstrap(y, s, s, roc_auc_score, draws=50)
    assert same[0] == 0 and same[3] == 1.0
