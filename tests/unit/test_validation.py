import numpy as np
import pytest

from fabloop.core.policies import RetrainPolicy
from fabloop.core.stats import PairedAuc, paired_delong
from fabloop.core.training import holdout_metrics
from fabloop.core.validation import judge_challenger

# A holdout with enough fails to be judged on (the policy's min_holdout_fails is 10).
HOLDOUT = {"n_fail": 30.0, "n_rows": 400.0}


def _paired(diff: float, se: float, n_fail: int = 30) -> PairedAuc:
    """A paired comparison with the given difference and standard error."""
    return PairedAuc(auc_a=0.85 + diff, auc_b=0.85, var_a=se**2, var_b=se**2, cov=se**2 / 2, n_fail=n_fail,
                     n_pass=370)


def test_first_model_only_needs_the_floor() -> None:
    policy = RetrainPolicy(min_roc_auc=0.7)
    assert judge_challenger({"roc_auc": 0.75, **HOLDOUT}, None, policy).passed
    assert not judge_challenger({"roc_auc": 0.65, **HOLDOUT}, None, policy).passed


def test_regression_beyond_tolerance_is_rejected() -> None:
    policy = RetrainPolicy(min_roc_auc=0.5, max_regression=0.01)
    verdict = judge_challenger({"roc_auc": 0.80, **HOLDOUT}, {"roc_auc": 0.85, **HOLDOUT}, policy,
                               paired=_paired(-0.05, 0.03))
    assert not verdict.passed and "regresses" in verdict.summary()
    # The paired test is stated next to the rejection: difference, interval, p-value.
    assert "paired DeLong on the same 30 fails: -0.050, 95% CI" in verdict.summary() and "p = " in verdict.summary()
    assert verdict.paired is not None and verdict.paired["roc_auc_diff"] == pytest.approx(-0.05)
    assert judge_challenger({"roc_auc": 0.845, **HOLDOUT}, {"roc_auc": 0.85, **HOLDOUT}, policy).passed


def test_required_gain_must_be_reached_and_significant() -> None:
    policy = RetrainPolicy(min_roc_auc=0.5, required_gain=0.02)
    champion = {"roc_auc": 0.85, **HOLDOUT}
    assert not judge_challenger({"roc_auc": 0.86, **HOLDOUT}, champion, policy, paired=_paired(0.01, 0.005)).passed
    assert judge_challenger({"roc_auc": 0.88, **HOLDOUT}, champion, policy, paired=_paired(0.03, 0.005)).passed
    # The same gain inside the noise (paired SE 0.03) does not change production.
    noisy = judge_challenger({"roc_auc": 0.88, **HOLDOUT}, champion, policy, paired=_paired(0.03, 0.03))
    assert not noisy.passed and "not significant" in noisy.summary()


def test_nan_auc_never_passes() -> None:
    assert not judge_challenger({"roc_auc": float("nan"), **HOLDOUT}, None, RetrainPolicy()).passed


def test_a_three_fail_holdout_cannot_pass_on_its_point_estimate() -> None:
    # The real-data case: 90 holdout wafers holding 3 fails, holdout ROC-AUC 0.893, CV 0.653.
    rng = np.random.default_rng(0)
    y = np.zeros(90, dtype=int)
    y[[20, 50, 80]] = 1
    scores = np.where(y == 1, 0.8, 0.3) + rng.normal(0, 0.2, 90)
    policy = RetrainPolicy()
    challenger = holdout_metrics(y, np.clip(scores, 0, 1), policy)
    assert challenger["n_fail"] == 3 and challenger["roc_auc"] > policy.min_roc_auc
    without_cv = judge_challenger(challenger, None, policy)
    assert not without_cv.passed and without_cv.basis == "cv"
    assert "holdout holds 3 fails (< min_holdout_fails 10)" in without_cv.summary()
    on_cv = judge_challenger(challenger, None, policy, challenger_cv=0.653)
    assert not on_cv.passed and "CV ROC-AUC 0.653 below the floor 0.700" in on_cv.summary()
    assert "shown, not used" in on_cv.summary()
    # A good CV estimate passes, and says what it was judged on.
    good = judge_challenger(challenger, None, policy, challenger_cv=0.82)
    assert good.passed and good.basis == "cv" and "CV ROC-AUC 0.820 ≥ floor" in good.summary()


def test_small_holdout_compares_cv_estimates_with_the_champion() -> None:
    policy = RetrainPolicy(max_regression=0.01)
    small = {"roc_auc": 0.95, "n_fail": 4.0, "n_rows": 90.0}
    worse = judge_challenger(small, {"roc_auc": 0.7, **small}, policy, challenger_cv=0.75, champion_cv=0.80)
    assert not worse.passed and "regresses vs champion" in worse.summary() and "recorded CV 0.800" in worse.summary()
    assert judge_challenger(small, {"roc_auc": 0.7, **small}, policy, challenger_cv=0.80, champion_cv=0.80).passed


def test_a_holdout_barely_better_than_chance_is_rejected() -> None:
    # Above the floor on its point estimate, but 10 fails cannot show it beats a coin.
    y = np.array([1] * 10 + [0] * 10)
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45, 0.3, 0.2, 0.1] + [0.85, 0.65, 0.5, 0.4, 0.35, 0.3, 0.25,
                                                                         0.15, 0.05, 0.01])
    policy = RetrainPolicy(min_roc_auc=0.6)
    metrics = holdout_metrics(y, s, policy)
    assert 0.6 < metrics["roc_auc"] < 0.75
    verdict = judge_challenger(metrics, None, policy)
    assert not verdict.passed and "not significantly better than chance" in verdict.summary()


def test_paired_delong_feeds_the_gate() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(600) < 0.08).astype(int)
    strong = rng.normal(size=600) + 2.0 * y
    weak = strong + rng.normal(size=600) * 2.0
    policy = RetrainPolicy()
    to_prob = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    chall, champ = holdout_metrics(y, to_prob(weak), policy), holdout_metrics(y, to_prob(strong), policy)
    verdict = judge_challenger(chall, champ, policy, paired=paired_delong(y, weak, strong))
    assert not verdict.passed and verdict.basis == "holdout" and "regresses vs champion" in verdict.summary()
