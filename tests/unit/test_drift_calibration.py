"""The calibrated data-drift alarm: a reference's own null of the drifted-sensor share (fabloop.core.calibration)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from fabloop.core.calibration import (
    _block_starts,
    _window_mask,
    calibrate_drift,
    calibration_fingerprint,
    null_threshold,
)
from fabloop.core.drift import _check_feature, _evidently_options, check_drift
from fabloop.core.policies import DriftPolicy

POLICY = DriftPolicy(min_window_rows=1)  # the default rule: calibrated, alpha 0.01, 200 draws


def _process(seed: int, n: int, n_sensors: int = 20, shift: float = 0.0, shifted: int = 0) -> pd.DataFrame:
    """Correlated sensors (two latent factors), as FDC summaries are; ``shift`` sigma on the first ``shifted``."""
    rng = np.random.default_rng(seed)
    loadings = np.random.default_rng(0).normal(0, 0.7, (2, n_sensors))
    values = rng.normal(size=(n, 2)) @ loadings + rng.normal(size=(n, n_sensors))
    values[:, :shifted] += shift * np.sqrt((loadings[:, :shifted] ** 2).sum(axis=0) + 1)
    return pd.DataFrame(values * 3 + 50, columns=[f"sensor_{i:02d}" for i in range(n_sensors)])


def test_reference_like_windows_do_not_alarm_and_shifted_ones_do():
    reference = _process(1, 600)
    calibration = calibrate_drift(reference, POLICY, 150)
    assert calibration.draws == 200
    quiet = [check_drift(reference, _process(100 + k, 150), POLICY, calibration=calibration) for k in range(40)]
    # alpha = 0.01 per window: about 0.4 false alarms expected in 40; three or more has probability < 0.01
    assert sum(r.drifted for r in quiet) <= 2, [r.reason for r in quiet if r.drifted]
    shifted = check_drift(reference, _process(7, 150, shift=1.0, shifted=12), POLICY, calibration=calibration)
    assert shifted.drifted and shifted.share > calibration.threshold
    assert shifted.alarm_rule == "calibrated" and shifted.threshold_share == calibration.threshold
    assert shifted.calibration_draws == 200 and shifted.calibration_window_rows == 150


def test_calibrated_reason_says_share_threshold_percentile_and_draws():
    reference = _process(1, 600)
    result = check_drift(reference, _process(2, 150), POLICY)
    pattern = (
        r"No dataset drift: \d+ of 20 sensors drifted \(share (0\.\d{3})\) vs (0\.\d{3}|1\.000) at the reference's "
        r"own 99th percentile \(200 draws of 150 wafers\): no alarm\.$"
    )
    match = re.match(pattern, result.reason)
    assert match, result.reason
    assert float(match[1]) == pytest.approx(result.share, abs=5e-4)
    alarm = check_drift(reference, _process(3, 150, shift=2.0, shifted=15), POLICY)
    assert alarm.drifted and re.match(r"Dataset drift: .* > 0\.\d{3} at the reference's own 99th .*: alarm\.$",
                                      alarm.reason), alarm.reason
    assert "calibrated, share >" in alarm.to_markdown()


def test_calibration_is_deterministic_and_keyed_by_window_size_and_policy():
    reference = _process(4, 400)
    a = calibrate_drift(reference, POLICY, 100)
    b = calibrate_drift(reference.copy(), POLICY, 100)
    assert a == b
    assert calibrate_drift(reference, POLICY, 120).fingerprint != a.fingerprint
    stricter = POLICY.model_copy(update={"alpha": 0.05})
    assert calibration_fingerprint(reference, stricter, 100, list(reference.columns)) != a.fingerprint
    # a check given the calibration decides exactly as one that calibrates itself
    window = _process(5, 100)
    assert check_drift(reference, window, POLICY, calibration=a) == check_drift(reference, window, POLICY)
    with pytest.raises(ValueError, match="another reference, window size"):
        check_drift(reference, _process(5, 120), POLICY, calibration=a)


def test_null_is_the_same_per_sensor_evidently_tests_draw_by_draw():
    """The vectorised draws give the share _check_feature gives on each pseudo-window and the rest."""
    rng = np.random.default_rng(3)
    reference = _process(6, 500, n_sensors=8)
    reference["sensor_00"] = reference["sensor_00"].round(0)  # ties
    reference.loc[rng.random(500) < 0.3, "sensor_01"] = np.nan
    reference["sensor_02"] = 3.0  # stuck
    reference["sensor_03"] = rng.choice([1.0, 2.0, 3.0], 500)  # setpoint: chi-square
    reference["sensor_04"] = rng.choice([0.0, 1.0], 500)  # z-test
    reference["sensor_05"] = np.cumsum(rng.normal(size=500))  # wandering
    policy = POLICY.model_copy(update={"calibration_draws": 20})
    calibration = calibrate_drift(reference, policy, 120)
    mask = _window_mask(500, 120, _block_starts(500, 20, int(calibration.fingerprint[:16], 16)))
    options = _evidently_options(policy)
    for d in range(20):
        verdicts = [
            _check_feature(f, reference[f][~mask[d]], reference[f][mask[d]], options, policy) for f in reference.columns
        ]
        tested = [v for v in verdicts if v.status == "ok"]
        assert calibration.shares[d] == sum(v.drifted for v in tested) / len(tested), d


def test_blocks_follow_a_wandering_reference_where_random_rows_would_not():
    """Contiguous blocks see the reference's own wander, so a window that wanders as much does not alarm."""
    rng = np.random.default_rng(8)
    n, sensors = 1400, 10
    walk = np.cumsum(rng.normal(0, 0.08, (n, sensors)), axis=0)
    frame = pd.DataFrame(walk + rng.normal(size=(n, sensors)), columns=[f"s{i}" for i in range(sensors)])
    reference, window = frame.iloc[:1000].reset_index(drop=True), frame.iloc[1000:1200]
    calibration = calibrate_drift(reference, POLICY, 200)
    assert calibration.threshold >= 0.5  # the wander makes drifted sensors common between blocks
    assert not check_drift(reference, window, POLICY, calibration=calibration).drifted


def test_a_reference_under_three_windows_falls_back_to_the_share_rule_and_says_so():
    reference = _process(9, 500)
    window = _process(10, 200, shift=3.0, shifted=9)
    result = check_drift(reference, window, POLICY)
    assert calibrate_drift(reference, POLICY, 200).draws == 0
    assert result.alarm_rule == "share" and result.threshold_share == POLICY.drift_share
    assert result.drifted is (result.share >= POLICY.drift_share)
    expected = "by the fixed share rule: the reference's 500 wafers are too few to calibrate windows of 200"
    assert expected in result.reason
    assert calibrate_drift(_process(9, 600), POLICY, 200).draws == 200


def test_quantile_rank_and_strict_rule():
    shares = [i / 200 for i in range(200)]
    assert null_threshold(shares, 0.01) == (shares[198], 199)  # ceil(0.99 * 201) = 199th smallest
    assert null_threshold(shares, 0.05) == (shares[190], 191)
    assert null_threshold(shares[:20], 0.01) == (1.0, 21)  # too few draws: only critical sensors alarm


def test_share_rule_is_unchanged():
    reference = _process(11, 400)
    window = _process(12, 400, shift=3.0, shifted=5)
    result = check_drift(reference, window, DriftPolicy(min_window_rows=1, alarm_rule="share", drift_share=0.25))
    assert result.alarm_rule == "share" and result.threshold_share == 0.25 and result.calibration_draws is None
    assert result.drifted is (result.share >= 0.25)
    assert f"(share {result.share:.3f} >= 0.250)" in result.reason and "percentile" not in result.reason


def test_critical_sensor_alarms_on_its_own_under_the_calibrated_rule():
    reference = _process(13, 600)
    window = _process(14, 150, shift=3.0, shifted=1)
    result = check_drift(reference, window, POLICY.model_copy(update={"critical_sensors": ["sensor_00"]}))
    assert result.share <= (result.threshold_share or 0)
    assert result.drifted and result.drifted_critical_sensors == ["sensor_00"]
