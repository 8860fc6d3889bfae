"""Which checks get an Evidently report, and what their verdict artifact says before and after it is kept.

The report is rendered after a breach's retraining was asked for, so the verdict
artifact is published first with a note, and rewritten with the link once the
report is kept (or with why it is not coming).
"""

from __future__ import annotations

from fabloop.core.drift import DriftResult, PerformanceDriftResult
from fabloop.core.policies import DriftPolicy
from fabloop.core.reports import drift_markdown
from fabloop.core.verdict import judge_window
from fabloop.tasks.checks import REPORT_PENDING, WindowCheck, wants_report

POLICY = DriftPolicy(min_window_rows=100)
URL = "http://mlflow.local/get-artifact?path=drift/window-7.html&run_uuid=abc"


def _data(drifted: bool, n_tested: int = 10) -> DriftResult:
    return DriftResult(
        status="ok" if n_tested else "no_testable_features", drifted=drifted, reason="2/10 sensors drifted",
        share=0.2 if drifted else 0.0, drift_share=0.1, n_features=10, n_tested=n_tested,
        n_drifted=2 if drifted else 0, drifted_critical_sensors=[], missing_critical_sensors=[], untested=[],
        reference_rows=500, current_rows=120, evidently_version="test", features=[],
    )


def _performance_breach() -> PerformanceDriftResult:
    return PerformanceDriftResult(
        n_wafers=120, n_labelled=80, n_failing=40, roc_auc=None, reference_auc=0.80, auc_drop=None,
        observed_fail_rate=0.5, predicted_fail_rate=0.07, reference_fail_rate=0.066, fail_rate_gap=0.43,
        breached=True, breaches=["fail_rate"], reason="fail rate 0.5 vs 0.07",
    )


def _check(data: DriftResult | None, performance: PerformanceDriftResult | None = None,
           champion: str | None = "3") -> WindowCheck:
    verdict = judge_window("etch-ch1", 120, POLICY, champion, data, performance)
    return WindowCheck(7, "etch-ch1", 120, verdict, data, performance)


def test_a_data_breach_gets_a_report_and_a_quiet_window_none() -> None:
    assert wants_report(_check(_data(True)))
    assert not wants_report(_check(_data(False)))


def test_a_breach_without_tested_sensors_or_champion_has_no_report_to_show() -> None:
    performance_only = _check(_data(False, n_tested=0), _performance_breach())
    assert performance_only.verdict.breach and not wants_report(performance_only)
    first_training = _check(None, champion=None)
    assert first_training.verdict.breach and not wants_report(first_training)


def test_the_verdict_notes_the_pending_report_then_links_it() -> None:
    data = _data(True)
    pending = drift_markdown("etch-ch1", 7, "drift", data, None, None, REPORT_PENDING)
    assert "**DRIFT**" in pending and REPORT_PENDING in pending and URL not in pending
    linked = drift_markdown("etch-ch1", 7, "drift", data, None, URL)
    assert f"[Full Evidently drift report]({URL})" in linked and REPORT_PENDING not in linked
