"""How sure a metric is: ROC-AUC variance and tests, binomial tests, proportion intervals.

A fab's windows and holdouts hold a handful of failing wafers, and an ROC-AUC on 13
fails moves by several points between two samples of the same process. Every
verdict fabloop gives on a metric (performance drift, the challenger gate) goes
through here, so that it can say how large that noise is.

- ROC-AUC variance: DeLong et al. (1988), computed with the midrank algorithm of
  Sun & Xu (2014, "Fast implementation of DeLong's algorithm"), which also gives the
  covariance of several scorers on the *same* wafers (the paired test of the gate).
- Hanley & McNeil (1982): the variance from the AUC and the class counts alone,
  for a reference whose scores were not kept (champions trained before the DeLong
  variance was logged).
- Binomial tests and Wilson intervals for counts of failing wafers (SciPy).

Convention (as everywhere in fabloop): label 1 = a failing wafer; ROC-AUC is the
probability that a failing wafer scores above a passing one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy import stats as st


def _z(alpha: float) -> float:
    """The two-sided normal quantile of a (1 - alpha) interval."""
    return float(st.norm.ppf(1 - alpha / 2))


class AucEstimate(BaseModel):
    """One scorer's ROC-AUC on one sample of wafers, with its sampling variance."""

    model_config = ConfigDict(frozen=True)

    auc: float
    var: float
    n_fail: int
    n_pass: int
    method: str = "delong"

    @property
    def se(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def ci(self, alpha: float = 0.05) -> tuple[float, float]:
        """The (1 - alpha) normal interval, clipped to [0, 1]."""
        half = _z(alpha) * self.se
        return max(0.0, self.auc - half), min(1.0, self.auc + half)

    def p_above(self, value: float = 0.5) -> float:
        """One-sided p-value of "the AUC is not above ``value``" (default: no better than chance)."""
        if self.se == 0:
            return 0.0 if self.auc > value else 1.0
        return float(st.norm.sf((self.auc - value) / self.se))


class PairedAuc(BaseModel):
    """Two scorers on the same wafers (challenger ``a`` vs champion ``b``): the difference and its test."""

    model_config = ConfigDict(frozen=True)

    auc_a: float
    auc_b: float
    var_a: float
    var_b: float
    cov: float
    n_fail: int
    n_pass: int

    @property
    def diff(self) -> float:
        return self.auc_a - self.auc_b

    @property
    def se(self) -> float:
        return math.sqrt(max(self.var_a + self.var_b - 2 * self.cov, 0.0))

    def ci(self, alpha: float = 0.05) -> tuple[float, float]:
        half = _z(alpha) * self.se
        return self.diff - half, self.diff + half

    @property
    def p_value(self) -> float:
        """Two-sided p-value of "both rank the wafers equally well"."""
        if self.se == 0:
            return 1.0 if self.diff == 0 else 0.0
        return float(2 * st.norm.sf(abs(self.diff) / self.se))

    def p_greater(self, margin: float = 0.0) -> float:
        """One-sided p-value of "a does not beat b by more than ``margin``"."""
        if self.se == 0:
            return 0.0 if self.diff > margin else 1.0
        return float(st.norm.sf((self.diff - margin) / self.se))


def _labels_and_scores(y_true: Sequence[int] | np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int)
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    if s.shape[1] != len(y):
        raise ValueError(f"{len(y)} labels but {s.shape[1]} scores")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (pass) or 1 (fail)")
    n_fail = int(y.sum())
    if n_fail == 0 or n_fail == len(y):
        raise ValueError(f"ROC-AUC needs both classes: {n_fail} fails of {len(y)} wafers")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y, s


def _fast_delong(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (k,) and their covariance (k, k) for k scorers: Sun & Xu's midrank algorithm."""
    fails, passes = s[:, y == 1], s[:, y == 0]
    m, n = fails.shape[1], passes.shape[1]
    tx = st.rankdata(fails, axis=1)  # midranks within the fails
    ty = st.rankdata(passes, axis=1)  # within the passes
    tz = st.rankdata(np.concatenate([fails, passes], axis=1), axis=1)  # within all wafers
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1) / (2 * n)
    v01 = (tz[:, :m] - tx) / n  # per failing wafer: share of passes it outranks
    v10 = 1 - (tz[:, m:] - ty) / m  # per passing wafer: share of fails that outrank it
    sx = np.atleast_2d(np.cov(v01)) if m > 1 else np.zeros((len(s), len(s)))
    sy = np.atleast_2d(np.cov(v10)) if n > 1 else np.zeros((len(s), len(s)))
    return aucs, sx / m + sy / n


def delong_auc(y_true: Sequence[int] | np.ndarray, y_score: Sequence[float] | np.ndarray) -> AucEstimate:
    """ROC-AUC with its DeLong variance."""
    y, s = _labels_and_scores(y_true, np.asarray(y_score, dtype=float))
    aucs, cov = _fast_delong(y, s)
    n_fail = int(y.sum())
    return AucEstimate(auc=float(aucs[0]), var=float(cov[0, 0]), n_fail=n_fail, n_pass=len(y) - n_fail)


def paired_delong(
    y_true: Sequence[int] | np.ndarray, score_a: Sequence[float] | np.ndarray, score_b: Sequence[float] | np.ndarray
) -> PairedAuc:
    """Two scorers on the same wafers: DeLong's test of their AUC difference (``a`` - ``b``)."""
    y, s = _labels_and_scores(y_true, np.vstack([np.asarray(score_a, float), np.asarray(score_b, float)]))
    aucs, cov = _fast_delong(y, s)
    n_fail = int(y.sum())
    return PairedAuc(auc_a=float(aucs[0]), auc_b=float(aucs[1]), var_a=float(cov[0, 0]), var_b=float(cov[1, 1]),
                     cov=float(cov[0, 1]), n_fail=n_fail, n_pass=len(y) - n_fail)


def hanley_mcneil_var(auc: float, n_fail: int, n_pass: int) -> float:
    """The variance of an AUC from its value and class counts alone (Hanley & McNeil 1982)."""
    if n_fail < 1 or n_pass < 1:
        raise ValueError(f"needs both classes: {n_fail} fails, {n_pass} passes")
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    return (auc * (1 - auc) + (n_fail - 1) * (q1 - auc**2) + (n_pass - 1) * (q2 - auc**2)) / (n_fail * n_pass)


def auc_drop_p(current: AucEstimate, reference_auc: float, reference_var: float) -> float:
    """One-sided p-value of "the current AUC is not below the reference" (independent samples)."""
    se = math.sqrt(max(current.var + reference_var, 0.0))
    drop = reference_auc - current.auc
    if se == 0:
        return 0.0 if drop > 0 else 1.0
    return float(st.norm.sf(drop / se))


def binomial_excess_p(n_fail: int, n: int, expected_rate: float) -> float:
    """One-sided binomial p-value of "no more fails than ``expected_rate`` predicts"."""
    rate = min(max(expected_rate, 0.0), 1.0)
    return float(st.binomtest(n_fail, n, rate, alternative="greater").pvalue)


def proportion_ci(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson (1 - alpha) interval of a proportion k/n: it stays inside [0, 1] at a handful of fails."""
    if n <= 0:
        return 0.0, 1.0
    ci = st.binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="wilson")
    return float(ci.low), float(ci.high)


def bootstrap_ci(
    y_true: Sequence[int] | np.ndarray, y_score: Sequence[float] | np.ndarray, metric: object,
    alpha: float = 0.05, draws: int = 400, seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of a ranking metric with no closed-form variance (e.g. PR-AUC).

    Resamples fails and passes separately, so that every draw keeps the sample's fail
    count and the metric stays defined.
    """
    y, s = np.asarray(y_true).astype(int), np.asarray(y_score, dtype=float)
    fails, passes = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    rng = np.random.default_rng(seed)
    values = np.empty(draws)
    for i in range(draws):
        idx = np.concatenate([rng.choice(fails, len(fails)), rng.choice(passes, len(passes))])
        values[i] = metric(y[idx], s[idx])  # type: ignore[operator]
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def fmt_p(p: float) -> str:
    """A p-value as an engineer reads it."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.1 else f"p = {p:.2f}"


def paired_bootstrap(
    y_true: Sequence[int] | np.ndarray, score_a: Sequence[float] | np.ndarray, score_b: Sequence[float] | np.ndarray,
    metric: object, alpha: float = 0.05, draws: int = 400, seed: int = 0,
) -> tuple[float, float, float, float]:
    """Difference ``metric(a) - metric(b)`` on the same wafers: (difference, CI low, CI high, two-sided p).

    For a metric without a paired closed form (PR-AUC): both scorers are scored on the
    same resampled wafers (fails and passes resampled separately); the p-value is the
    share of draws on the other side of zero, doubled.
    """
    y = np.asarray(y_true).astype(int)
    a, b = np.asarray(score_a, dtype=float), np.asarray(score_b, dtype=float)
    fails, passes = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    rng = np.random.default_rng(seed)
    diffs = np.empty(draws)
    for i in range(draws):
        idx = np.concatenate([rng.choice(fails, len(fails)), rng.choice(passes, len(passes))])
        diffs[i] = metric(y[idx], a[idx]) - metric(y[idx], b[idx])  # type: ignore[operator]
    diff = float(metric(y, a) - metric(y, b))  # type: ignore[operator]
    lo, hi = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2 * min(float((diffs <= 0).mean()), float((diffs >= 0).mean())))
    return diff, float(lo), float(hi), max(p, 1 / draws) if diff != 0 else 1.0
