"""How many sensors drift when nothing changed: the calibrated data-drift alarm's null.

A window of m wafers is compared with the champion's reference sensor by sensor, and
even with no change some sensors cross their stattest threshold: with hundreds of
correlated, wandering fab sensors, far more than the tests' nominal rate. A fixed
``drift_share`` cannot know how many. So each reference calibrates its own rule: cut
it into pseudo-windows of the window's size, run the *same* per-sensor Evidently tests
between each pseudo-window and the rest of the reference, and take the share of
drifted sensors per draw. That is the null distribution of the share; a window alarms
when its share exceeds the null's (1 - alpha) quantile.

Sub-sampling: each pseudo-window is a **contiguous block** of m rows of the reference
in time order (circular, a block may wrap round the end), tested against the n - m rows
outside it, so the two sides are disjoint like a real window and its reference. Random
rows would be the exchangeable null of i.i.d. wafers, but fab sensors are not i.i.d.:
chambers age between maintenances, a PM re-centres sensors, consumables wear. A real
window is a contiguous stretch of time, and a block carries the same wander within it
and against the rest (and a fab's lot-by-lot mix of recipes and chambers); random rows
average all of it away, give a far narrower null, and on the simulator's streams alarm
on most quiet windows (``method="random_rows"`` is kept to show it; the reference is the
champion's training set, kept in time order).

A small reference cannot say how much its process wanders: split into two or three
blocks, it shows far less variation than windows drawn later, and the null is too
narrow (on the simulator, a reference of two windows false-alarms several times more
often than alpha). So the reference must hold at least ``MIN_REFERENCE_WINDOWS`` windows;
a smaller one gets no calibration (``draws == 0``) and the check falls back to the
fixed ``drift_share`` rule, and says so.

Quantile: with k draws sorted ``s(1) <= ... <= s(k)``, the threshold is ``s(j)`` with
``j = ceil((1 - alpha) (k + 1))``, and a window alarms when its share is strictly
greater. If the window's share is exchangeable with the draws, P(share > s(j)) <=
1 - j / (k + 1) <= alpha, whatever the ties. When j > k (too few draws for alpha) the
threshold is 1.0: the share alone never alarms.

Same tests, faster: the sensor's test is resolved once as the real check resolves it
(policy, per-sensor override or Evidently's default for the reference's size and
distinct values). For the tests a real float sensor gets by default, KS (reference <=
1,000 values) and normed Wasserstein (larger), the statistic is computed for all draws
at once from the reference's sort order. KS's exact p-value depends only on the two
sizes and the statistic's integer numerator, and does not increase with it, so for each
pair of sizes the verdict is a step in the numerator: Evidently's own test, run on a
draw's real data, places the step, and the draws on either side share it. A
Wasserstein value within 1e-6 of its threshold is re-decided by Evidently's own test.
Every other test (chi-square, z, a named stattest) runs Evidently per draw, shared
between draws with the same value counts when the sensor has few distinct values; a
non-float sensor goes through the check's own per-sensor function draw by draw.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from fabloop.core.drift import (
    _TESTABLE_TYPES,
    MIN_REFERENCE_WINDOWS,
    _check_feature,
    _default_numerical_stattest,
    _ev,
    _evidently_options,
    _finite,
    _is_float,
)
from fabloop.core.policies import DriftPolicy

CALIBRATION_VERSION = 2
NullMethod = Literal["contiguous_blocks", "random_rows"]
_KS_EXACT_MAX_N = 10_000  # scipy's ks_2samp switches to the asymptotic p-value above this
_FEW_VALUES = 5


class DriftCalibration(BaseModel):
    """The null distribution of the drifted-sensor share for one reference, window size and policy."""

    model_config = ConfigDict(frozen=True)

    version: int = CALIBRATION_VERSION
    fingerprint: str = Field(description="Reference content, features, window size and policy it was computed for.")
    method: NullMethod = "contiguous_blocks"
    window_rows: int = Field(description="Wafers in the windows this null is for.")
    pseudo_window_rows: int = Field(description="Rows per pseudo-window (the window's size).")
    reference_rows: int
    draws: int = Field(description="0: the reference is too small to calibrate (the fixed share rule applies).")
    alpha: float
    threshold: float = Field(description="Alarm when a window's share is greater than this.")
    rank: int = Field(description="The threshold is the rank-th smallest share of the draws (k + 1 when none).")
    shares: list[float] = Field(description="Share of drifted sensors per draw.")
    n_features: int


def _digest(reference: pd.DataFrame) -> str:
    hashed = pd.util.hash_pandas_object(reference, index=False).to_numpy()
    h = hashlib.sha256(hashed.tobytes())
    h.update(json.dumps([str(c) for c in reference.columns]).encode())
    return h.hexdigest()


def calibration_fingerprint(
    reference: pd.DataFrame,
    policy: DriftPolicy,
    window_rows: int,
    features: Sequence[str],
    method: NullMethod = "contiguous_blocks",
) -> str:
    """What a calibration depends on: the reference's sensors, the window size, and the policy's test settings."""
    settings = {
        "version": CALIBRATION_VERSION,
        "method": method,
        "window_rows": int(window_rows),
        "features": [str(f) for f in features],
        "reference": _digest(reference[list(features)]),
        "stattest": policy.stattest,
        "stattest_threshold": policy.stattest_threshold,
        "per_feature_stattest": dict(sorted(policy.per_feature_stattest.items())),
        "per_feature_threshold": dict(sorted(policy.per_feature_threshold.items())),
        "min_feature_values": policy.min_feature_values,
        "alpha": policy.alpha,
        "draws": policy.calibration_draws,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]


def null_threshold(shares: Sequence[float], alpha: float) -> tuple[float, int]:
    """The (1 - alpha) conformal quantile of the draws, and its rank (see the module docstring)."""
    k = len(shares)
    rank = math.ceil((1 - alpha) * (k + 1) - 1e-9)
    if rank > k or k == 0:
        return 1.0, k + 1
    return float(np.sort(np.asarray(shares, dtype=float))[rank - 1]), rank


def _block_starts(n: int, draws: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(n, size=draws, replace=draws > n)


def _window_mask(n: int, m: int, starts: np.ndarray) -> np.ndarray:
    """(draws, n) bool: row i is in draw d's pseudo-window (circular block)."""
    offsets = (np.arange(n)[None, :] - starts[:, None]) % n
    mask: np.ndarray = offsets < m
    return mask


def _random_rows_mask(n: int, m: int, draws: int, seed: int) -> np.ndarray:
    """(draws, n) bool: m rows drawn without replacement per draw (the i.i.d. null)."""
    rng = np.random.default_rng(seed)
    keys = rng.random((draws, n))
    mask: np.ndarray = keys <= np.sort(keys, axis=1)[:, m - 1 : m]
    return mask


class _Sensor:
    """One sensor's finite values in sort order, and each draw's cumulative window counts per distinct value."""

    def __init__(self, column: pd.Series, mask: np.ndarray) -> None:
        values = column.to_numpy(dtype=float)
        finite_pos = np.flatnonzero(np.isfinite(values))
        order = np.argsort(values[finite_pos], kind="mergesort")
        self.pos = finite_pos[order]  # reference rows, by value
        self.x = values[self.pos]
        ends = np.flatnonzero(np.r_[self.x[1:] != self.x[:-1], True]) if len(self.x) else np.zeros(0, dtype=int)
        self.ends = ends  # last index of each distinct value
        self.total_end = (ends + 1).astype(np.int64)
        cw = np.cumsum(mask[:, self.pos], axis=1, dtype=np.int64) if len(self.x) else np.zeros((len(mask), 0), np.int64)
        self.cw_end = cw[:, ends]  # window rows <= each distinct value, per draw
        self.m = cw[:, -1] if len(self.x) else np.zeros(len(mask), dtype=np.int64)
        self.r = len(self.x) - self.m


def _ks_h(s: _Sensor) -> np.ndarray:
    """Per draw, scipy's exact KS numerator h = |a n_w - b n_r| / gcd, maximised over values."""
    a = s.total_end[None, :] - s.cw_end  # rest rows <= value
    diff = np.abs(a * s.m[:, None] - s.cw_end * s.r[:, None])
    g = np.gcd(s.m, s.r)
    g[g == 0] = 1
    out: np.ndarray = diff.max(axis=1) // g
    return out


def _wasserstein_norm(s: _Sensor) -> np.ndarray:
    """Per draw, Evidently's Wasserstein distance normed by the rest's std."""
    m = np.maximum(s.m, 1)[:, None].astype(float)
    r = np.maximum(s.r, 1)[:, None].astype(float)
    fw = s.cw_end / m
    fr = (s.total_end[None, :] - s.cw_end) / r
    gaps = np.diff(s.x[s.ends])
    wd = (np.abs(fr - fw)[:, :-1] * gaps[None, :]).sum(axis=1)
    centred = s.x - s.x.mean()
    # rest sums = all - window; window sums from the per-value cumulative counts
    counts_w = np.diff(np.c_[np.zeros((len(s.cw_end), 1), np.int64), s.cw_end], axis=1)
    vals = centred[s.ends]
    s1 = centred.sum() - counts_w @ vals
    s2 = (centred**2).sum() - counts_w @ (vals**2)
    rr = np.maximum(s.r, 1).astype(float)
    var = np.maximum(s2 / rr - (s1 / rr) ** 2, 0.0)
    norm = np.maximum(np.sqrt(var), 0.001)
    out: np.ndarray = wd / norm
    return out


class _KsVerdicts:
    """KS verdicts by (threshold, sizes, statistic numerator), each decided by Evidently's own test.

    For fixed sizes the exact p-value ``P(D >= d)`` does not increase with ``d``, so
    the verdict is a step in the numerator h: every h at or above the smallest drifted h
    seen is drifted, every h at or below the largest undrifted one is not; only an h
    between the two is asked of Evidently (on a draw's real data).
    """

    def __init__(self) -> None:
        self._bounds: dict[tuple[float, int, int], list[int]] = {}  # [max undrifted h, min drifted h]
        self.calls = 0

    def verdict(self, threshold: float, r: int, m: int, h: int, decide: Callable[[], bool]) -> bool:
        bounds = self._bounds.setdefault((threshold, r, m), [-1, 1 << 62])
        if h >= bounds[1]:
            return True
        if h <= bounds[0]:
            return False
        self.calls += 1
        drifted = decide()
        if drifted:
            bounds[1] = h
        else:
            bounds[0] = h
        return drifted


def _decide(
    stattest: Any, column: pd.Series, mask: np.ndarray, column_type: Any, threshold: float | None, d: int
) -> bool:
    """Evidently's own verdict for draw d: its stattest on the finite values of the rest and of the block."""
    rest, win = _finite(column[~mask[d]]), _finite(column[mask[d]])
    return bool(stattest(rest, win, column_type, threshold).drifted)


def calibrate_drift(
    reference: pd.DataFrame,
    policy: DriftPolicy,
    window_rows: int,
    features: Sequence[str] | None = None,
    method: NullMethod = "contiguous_blocks",
) -> DriftCalibration:
    """The null distribution of the drifted-sensor share for windows of ``window_rows`` wafers.

    Pure and deterministic: the draws are seeded from the reference's content and the
    window size. ``features`` defaults to every column of the reference. ``method``:
    contiguous blocks (the default, see the module docstring) or random rows.
    """
    chosen = list(reference.columns) if features is None else list(features)
    absent = [f for f in chosen if f not in reference.columns]
    if absent:
        raise ValueError(f"features not in the reference data: {absent}")
    if window_rows < 1:
        raise ValueError(f"window_rows must be >= 1, got {window_rows}")
    fingerprint = calibration_fingerprint(reference, policy, window_rows, chosen, method)
    n = len(reference)
    m = window_rows
    draws = policy.calibration_draws
    base = {
        "fingerprint": fingerprint, "window_rows": window_rows, "pseudo_window_rows": m,
        "reference_rows": n, "alpha": policy.alpha, "n_features": len(chosen), "method": method,
    }
    if n < MIN_REFERENCE_WINDOWS * m:
        return DriftCalibration(draws=0, threshold=1.0, rank=1, shares=[], **base)

    seed = int(fingerprint[:16], 16)
    if method == "random_rows":
        mask = _random_rows_mask(n, m, draws, seed)
    else:
        mask = _window_mask(n, m, _block_starts(n, draws, seed))
    ref = reference[chosen].reset_index(drop=True)
    drifted = np.zeros((draws, len(chosen)), dtype=bool)
    tested = np.zeros((draws, len(chosen)), dtype=bool)
    options = _evidently_options(policy)
    ev = _ev()
    ks = _KsVerdicts()

    for j, feature in enumerate(chosen):
        column = ref[feature]
        if not _is_float(column):
            for d in range(draws):
                rest, win = column[~mask[d]], column[mask[d]]
                verdict = _check_feature(feature, rest, win, options, policy)
                tested[d, j] = verdict.status == "ok"
                drifted[d, j] = verdict.drifted
            continue
        column_type = ev.infer_column_type(column)
        if column_type.value not in _TESTABLE_TYPES:
            continue
        s = _Sensor(column, mask)
        ok = (s.m >= policy.min_feature_values) & (s.r >= policy.min_feature_values)
        tested[:, j] = ok
        if not ok.any():
            continue
        requested = options.get_feature_stattest_func(feature, column_type.value)
        threshold = options.get_threshold(feature, column_type.value)
        finite_all = _finite(column)
        if requested is None and column_type == ev.ColumnType.Numerical:
            stattest = _default_numerical_stattest(finite_all, finite_all.iloc[:0])
        else:
            stattest = ev.get_stattest(finite_all, finite_all, column_type, requested)
        actual = stattest.default_threshold if threshold is None else threshold

        decide = partial(_decide, stattest, column, mask, column_type, threshold)
        rows = np.flatnonzero(ok).tolist()
        if stattest.name == "ks" and n <= _KS_EXACT_MAX_N:
            h = _ks_h(s)
            for d in rows:
                drifted[d, j] = ks.verdict(float(actual), int(s.r[d]), int(s.m[d]), int(h[d]), partial(decide, d))
        elif stattest.name == "wasserstein":
            value = _wasserstein_norm(s)
            drifted[:, j] = ok & (value >= actual)
            for d in np.flatnonzero(ok & (np.abs(value - actual) <= 1e-6 * max(1.0, abs(actual)))).tolist():
                drifted[d, j] = decide(d)
        elif len(s.ends) <= _FEW_VALUES:
            memo: dict[tuple[int, ...], bool] = {}
            for d in rows:
                key = (int(s.r[d]), *(int(c) for c in s.cw_end[d]))
                if key not in memo:
                    memo[key] = decide(d)
                drifted[d, j] = memo[key]
        else:
            for d in rows:
                drifted[d, j] = decide(d)

    n_tested = tested.sum(axis=1)
    shares = np.where(n_tested > 0, (drifted & tested).sum(axis=1) / np.maximum(n_tested, 1), 0.0)
    threshold_share, rank = null_threshold(shares.tolist(), policy.alpha)
    return DriftCalibration(
        draws=draws, threshold=threshold_share, rank=rank, shares=[float(x) for x in shares], **base
    )
