"""fabloop.core.verdict: every branch of a window's verdict, and the trigger kind it asks for."""

from __future__ import annotations

import pytest

from fabloop.core.drift import DriftResult, PerformanceDriftResult
from fabloop.core.policies import DriftPolicy
from fabloop.core.verdict import judge_window

POLICY = DriftPolicy(min_window_rows=100)


def _data(drifted: bool, status: str = "ok", reason: str = "2/10 sensors drifted") -> DriftResult:
    return DriftResult(
        status=status, drifted=drifted, reason=reason, share=0.2 if drifted else 0.0, drift_share=0.3,
        n_features=10, n_tested=10, n_drifted=2 if drifted else 0, drifted_critical_sensors=[],
        missing_critical_sensors=[], untested=[], reference_rows=500, current_rows=120,
        evidently_version="test", features=[],
    )


def _performance(breached: bool) -> PerformanceDriftResult:
    return PerformanceDriftResult(
        n_wafers=120, n_labelled=80, n_failing=6, roc_auc=0.61, reference_auc=0.80, auc_drop=0.19,
        observed_fail_rate=0.075, predicted_fail_rate=0.07, reference_fail_rate=0.066, fail_rate_gap=0.005,
        breached=breached, breaches=["roc_auc"] if breached else [],
        reason="ROC-AUC 0.61 vs 0.80" if breached else "ROC-AUC within tolerance",
    )


def test_no_champion_and_small_window_waits() -> None:
    v = judge_window("etch-ch1", 99, POLICY, champion=None)
    assert (v.status, v.drifted, v.breach, v.performance_breach, v.trigger_kind) == (
        "window_too_small", False, False, False, None)
    assert v.reason == "no champion for etch-ch1 yet, and 99 wafers < min_window_rows=100"


def test_no_champion_and_full_window_asks_for_a_first_training() -> None:
    v = judge_window("etch-ch1", 100, POLICY, champion=None)
    assert (v.status, v.drifted, v.breach, v.performance_breach, v.trigger_kind) == (
        "no_champion", False, True, False, "first_training")
    assert v.reason == "no champion for etch-ch1 yet: first full window (100 wafers) asks for a first training"


def test_champion_without_drift_or_performance_verdict_is_quiet() -> None:
    v = judge_window("etch-ch1", 20, POLICY, champion="3", data=_data(False, reason="no drift"))
    assert (v.status, v.drifted, v.breach, v.performance_breach, v.trigger_kind) == ("ok", False, False, False, None)
    assert v.reason == "no drift"


def test_small_window_with_a_champion_takes_the_data_verdict() -> None:
    small = _data(False, status="window_too_small", reason="5 < 100")
    v = judge_window("etch-ch1", 5, POLICY, champion="3", data=small)
    assert (v.status, v.breach, v.trigger_kind) == ("window_too_small", False, None)


def test_sensor_drift_asks_for_a_drift_retraining() -> None:
    v = judge_window("etch-ch1", 120, POLICY, champion="3", data=_data(True), performance=_performance(False))
    assert (v.status, v.drifted, v.breach, v.performance_breach, v.trigger_kind) == ("ok", True, True, False, "drift")
    assert v.reason == "2/10 sensors drifted | performance: ROC-AUC within tolerance"


def test_drift_wins_over_performance_as_trigger_kind() -> None:
    v = judge_window("etch-ch1", 120, POLICY, champion="3", data=_data(True), performance=_performance(True))
    assert (v.drifted, v.breach, v.performance_breach, v.trigger_kind) == (True, True, True, "drift")


def test_performance_breach_alone_asks_for_a_performance_retraining() -> None:
    v = judge_window("etch-ch1", 120, POLICY, champion="3", data=_data(False, reason="no drift"),
                     performance=_performance(True))
    assert (v.status, v.drifted, v.breach, v.performance_breach, v.trigger_kind) == (
        "ok", False, True, True, "performance")
    assert v.reason == "no drift | performance: ROC-AUC 0.61 vs 0.80"


def test_a_champion_needs_the_data_verdict() -> None:
    with pytest.raises(ValueError, match="data drift verdict"):
        judge_window("etch-ch1", 120, POLICY, champion="3")
