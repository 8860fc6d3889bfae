"""fabloop.core.drift: verdicts must be Evidently's own, checked against an Evidently Report run on the same data."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from evidently import Report
from evidently.presets import DataDriftPreset

from fabloop.core.drift import check_drift, drift_report_html, performance_drift
from fabloop.core.policies import DriftPolicy, DriftPolicyOverride

# The fixed-share rule (Evidently's drift_share) these parity tests compare against; the calibrated
# default is tested in test_drift_calibration.py.
LOOSE = DriftPolicy(min_window_rows=1, alarm_rule="share")


# --------------------------------------------------------------------------- helpers


def _sensor_frames(
    seed: int, n_ref: int, n_cur: int, n_features: int, shifts: dict[int, float]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Gaussian sensors plus the awkward kinds a fab produces; ``shifts`` moves columns of the window by k sigma."""
    rng = np.random.default_rng(seed)
    cols = [f"sensor_{i:03d}" for i in range(n_features)]
    ref = pd.DataFrame(rng.normal(10.0, 2.0, size=(n_ref, n_features)), columns=cols)
    cur = pd.DataFrame(rng.normal(10.0, 2.0, size=(n_cur, n_features)), columns=cols)
    for i, k in shifts.items():
        cur[cols[i]] += 2.0 * k
    # sparse missing readings and a broken sensor reporting inf
    ref.loc[rng.choice(n_ref, n_ref // 20, replace=False), cols[1]] = np.nan
    cur.loc[rng.choice(n_cur, n_cur // 10, replace=False), cols[2]] = np.nan
    cur.loc[rng.choice(n_cur, 7, replace=False), cols[3]] = np.inf
    # Evidently's ValueDrift always drops +-inf, but its DriftedColumnsCount path only does so in a column
    # that also holds a NaN (and crashes on inf in psi); one NaN makes both of its paths see the same data.
    cur.loc[cur.index[cur[cols[3]] != np.inf][0], cols[3]] = np.nan
    # a stuck sensor, a 3-level and a 2-level setpoint (float dtype, so Evidently calls them numerical)
    ref[cols[4]] = 1.5
    cur[cols[4]] = 1.5
    ref[cols[5]] = rng.choice([0.0, 1.0, 2.0], n_ref)
    cur[cols[5]] = rng.choice([0.0, 1.0, 2.0], n_cur, p=[0.5, 0.3, 0.2] if shifts else None)
    ref[cols[6]] = rng.choice([0.0, 1.0], n_ref)
    cur[cols[6]] = rng.choice([0.0, 1.0], n_cur)
    return ref, cur


def _evidently_report(reference: pd.DataFrame, current: pd.DataFrame, **preset_kwargs) -> dict:
    """Run a DataDriftPreset Report and read back per-column method/threshold/score/verdict and the count."""
    snapshot = Report([DataDriftPreset(**preset_kwargs)], include_tests=True).run(
        current_data=current, reference_data=reference
    )
    data = snapshot.dict()
    status_by_metric = {t["metric_config"]["metric_id"]: str(t["status"]) for t in data["tests"] if t["id"] == "drift"}
    columns, count = {}, None
    for metric in data["metrics"]:
        cfg = metric["config"]
        if cfg["type"] == "evidently:metric_v2:ValueDrift":
            columns[cfg["column"]] = {
                "method": cfg["method"],
                "threshold": cfg["threshold"],
                "score": float(metric["value"]),
                "drifted": status_by_metric[metric["id"]].endswith("FAIL"),
            }
        elif cfg["type"] == "evidently:metric_v2:DriftedColumnsCount":
            count = metric["value"]
    return {"columns": columns, "count": count}


def _assert_agrees(result, report: dict, named: bool) -> None:
    """Every per-feature verdict equals the Report's: same test, threshold, score (1e-9) and flag."""
    assert result.status == "ok"
    assert {f.feature for f in result.features} == set(report["columns"])
    for f in result.features:
        ev = report["columns"][f.feature]
        assert f.status == "ok", f
        # the Report records the name it was given, or the display name it resolved by default
        assert ev["method"] == (f.stattest if named else f.stattest_display), f.feature
        assert f.threshold == pytest.approx(ev["threshold"], abs=1e-12), f.feature
        assert f.score == pytest.approx(ev["score"], rel=1e-9, abs=1e-9), f.feature
        assert f.drifted is ev["drifted"], f.feature
    assert result.n_drifted == int(report["count"]["count"])
    assert result.share == pytest.approx(report["count"]["share"], abs=1e-12)


# --------------------------------------------------------------------------- agreement with Evidently


@pytest.mark.parametrize(
    ("label", "shifts", "drifted_range"),
    [
        ("none", {}, (0, 1)),
        ("mild", {7: 0.3, 8: 0.3, 9: 0.25, 10: 0.2, 11: 0.15}, (2, 6)),
        ("strong", {i: 1.0 for i in range(5, 20)}, (12, 20)),
    ],
)
def test_default_stattests_agree_with_evidently_report(label, shifts, drifted_range):
    ref, cur = _sensor_frames(seed=len(label), n_ref=300, n_cur=300, n_features=20, shifts=shifts)
    result = check_drift(ref, cur, LOOSE)
    _assert_agrees(result, _evidently_report(ref, cur), named=False)
    lo, hi = drifted_range
    assert lo <= result.n_drifted <= hi, f"{label}: dataset does not show the intended drift"
    assert result.drifted is (result.share >= 0.5)


def test_small_reference_defaults_are_ks_chisquare_and_z():
    ref, cur = _sensor_frames(seed=11, n_ref=300, n_cur=200, n_features=8, shifts={})
    result = check_drift(ref, cur, LOOSE)
    assert result.feature("sensor_000").stattest == "ks"
    assert result.feature("sensor_004").stattest == "z"  # stuck sensor: one value
    assert result.feature("sensor_004").score == 1.0 and not result.feature("sensor_004").drifted
    assert result.feature("sensor_005").stattest == "chisquare"  # 3 values
    assert result.feature("sensor_006").stattest == "z"  # 2 values
    _assert_agrees(result, _evidently_report(ref, cur), named=False)


def test_large_reference_defaults_are_wasserstein_and_jensenshannon():
    ref, cur = _sensor_frames(seed=12, n_ref=1100, n_cur=300, n_features=8, shifts={0: 0.5})
    # Evidently sizes the sample after dropping NaN: 1,000 finite values is a "small" reference again
    ref.loc[ref.index[:100], "sensor_007"] = np.nan
    result = check_drift(ref, cur, LOOSE)
    assert result.feature("sensor_000").stattest == "wasserstein"
    assert result.feature("sensor_000").drifted
    assert result.feature("sensor_004").stattest == "jensenshannon"
    assert result.feature("sensor_005").stattest == "jensenshannon"
    assert result.feature("sensor_007").stattest == "ks"
    _assert_agrees(result, _evidently_report(ref, cur), named=False)


@pytest.mark.parametrize(("stattest", "threshold"), [("psi", None), ("wasserstein", 0.05)])
def test_named_stattest_and_threshold_agree_with_evidently_report(stattest, threshold):
    ref, cur = _sensor_frames(seed=5, n_ref=300, n_cur=300, n_features=10, shifts={7: 0.4, 8: 0.2})
    ref, cur = ref.drop(columns=["sensor_004"]), cur.drop(columns=["sensor_004"])  # psi on one value divides 0/0
    policy = DriftPolicy(min_window_rows=1, stattest=stattest, stattest_threshold=threshold)
    result = check_drift(ref, cur, policy)
    assert {f.stattest for f in result.features} == {stattest}
    _assert_agrees(result, _evidently_report(ref, cur, method=stattest, threshold=threshold), named=True)


def test_per_feature_stattest_agrees_with_evidently_report():
    ref, cur = _sensor_frames(seed=6, n_ref=300, n_cur=300, n_features=10, shifts={8: 0.5})
    per = {"sensor_008": "psi", "sensor_009": "jensenshannon"}
    result = check_drift(ref, cur, DriftPolicy(min_window_rows=1, per_feature_stattest=per))
    assert result.feature("sensor_008").stattest == "psi"
    assert result.feature("sensor_000").stattest == "ks"
    report = _evidently_report(ref, cur, per_column_method=per)
    for f in result.features:
        ev = report["columns"][f.feature]
        assert ev["method"] in (f.stattest, f.stattest_display)
        assert f.score == pytest.approx(ev["score"], rel=1e-9, abs=1e-9)
        assert f.drifted is ev["drifted"]


# --------------------------------------------------------------------------- dataset rules


def _one_drifted_of_four() -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(3)
    ref = pd.DataFrame(rng.normal(size=(400, 4)), columns=["rf_power", "pressure", "temp", "flow"])
    cur = pd.DataFrame(rng.normal(size=(400, 4)), columns=ref.columns)
    cur["rf_power"] += 3.0
    return ref, cur


def test_drift_share_rule_is_greater_or_equal():
    ref, cur = _one_drifted_of_four()
    at = check_drift(ref, cur, DriftPolicy(min_window_rows=1, alarm_rule="share", drift_share=0.25))
    above = check_drift(ref, cur, DriftPolicy(min_window_rows=1, alarm_rule="share", drift_share=0.26))
    assert at.n_drifted == 1 and at.share == 0.25
    assert at.drifted and "Dataset drift" in at.reason
    assert not above.drifted and "No dataset drift" in above.reason


def test_any_critical_sensor_drifting_is_dataset_drift():
    ref, cur = _one_drifted_of_four()
    plain = check_drift(ref, cur, LOOSE)
    share_rule = DriftPolicy(min_window_rows=1, alarm_rule="share")
    critical = check_drift(ref, cur, share_rule.model_copy(update={"critical_sensors": ["rf_power", "flow"]}))
    calm_critical = check_drift(ref, cur, share_rule.model_copy(update={"critical_sensors": ["flow"]}))
    assert not plain.drifted
    assert critical.drifted and critical.drifted_critical_sensors == ["rf_power"]
    assert "rf_power" in critical.reason and critical.feature("rf_power").critical
    assert not calm_critical.drifted and calm_critical.drifted_critical_sensors == []


def test_critical_sensor_missing_from_features_is_reported():
    ref, cur = _one_drifted_of_four()
    result = check_drift(ref, cur, DriftPolicy(min_window_rows=1, critical_sensors=["chuck_temp"]))
    assert result.missing_critical_sensors == ["chuck_temp"]
    assert "chuck_temp" in result.reason


def test_window_smaller_than_policy_gives_no_verdict():
    ref, cur = _one_drifted_of_four()
    result = check_drift(ref, cur.head(50), DriftPolicy(min_window_rows=100))
    assert result.status == "window_too_small" and not result.drifted
    assert "50 wafers" in result.reason and result.features == []


def test_sparse_and_non_numeric_sensors_get_a_status_not_a_crash():
    ref, cur = _one_drifted_of_four()
    cur["temp"] = np.nan  # dead sensor in the window: Evidently's Report raises here
    cur.loc[cur.index[:5], "flow"] = cur["flow"].iloc[:5]
    cur.loc[cur.index[5:], "flow"] = np.nan
    ref["recipe"] = [object()] * len(ref)
    cur["recipe"] = [object()] * len(cur)
    result = check_drift(
        ref, cur, DriftPolicy(min_window_rows=1, alarm_rule="share", drift_share=0.5), features=list(cur.columns)
    )
    assert result.feature("temp").status == "insufficient_data" and result.feature("temp").n_current == 0
    assert result.feature("flow").status == "insufficient_data" and "5 in window" in result.feature("flow").detail
    assert result.feature("recipe").status == "unsupported_type"
    assert sorted(result.untested) == ["flow", "recipe", "temp"]
    assert result.n_tested == 2 and result.share == 0.5 and result.drifted  # rf_power of (rf_power, pressure)
    assert "3 sensors not tested" in result.reason
    # features=None picks what DataDriftPreset would: the object column is not a drift column
    assert "recipe" not in {f.feature for f in check_drift(ref, cur, LOOSE).features}


def test_no_testable_sensor_gives_no_verdict():
    ref, cur = _one_drifted_of_four()
    cur[:] = np.nan
    result = check_drift(ref, cur, LOOSE)
    assert result.status == "no_testable_features" and not result.drifted


def test_bad_input_names_the_column():
    ref, cur = _one_drifted_of_four()
    with pytest.raises(ValueError, match="chuck_temp"):
        check_drift(ref, cur, LOOSE, features=["rf_power", "chuck_temp"])
    with pytest.raises(ValueError, match=r"reference.*'pressure'"):
        check_drift(ref.drop(columns=["pressure"]), cur, LOOSE)
    with pytest.raises(ValueError, match="rf_power.*chisquare"):
        check_drift(ref, cur, DriftPolicy(min_window_rows=1, per_feature_stattest={"rf_power": "chisquare"}))


def test_unknown_stattest_is_refused_with_its_field():
    with pytest.raises(ValueError, match="stattest.*'kss'"):
        DriftPolicy(stattest="kss")
    with pytest.raises(ValueError, match=r"per_feature_stattest\['rf_power'\]"):
        DriftPolicy(overrides={"etch_yield": {"per_feature_stattest": {"rf_power": "nope"}}})


# --------------------------------------------------------------------------- per-model overrides


def test_for_model_applies_that_models_override_only():
    base = DriftPolicy(
        stattest="ks",
        per_feature_stattest={"rf_power": "psi"},
        critical_sensors=["rf_power"],
        overrides={
            "etch_yield": DriftPolicyOverride(
                stattest="wasserstein", per_feature_stattest={"pressure": "jensenshannon"}, drift_share=0.2
            ),
            "litho_yield": DriftPolicyOverride(stattest=None, critical_sensors=[]),
        },
    )
    etch = base.for_model("etch_yield")
    assert etch.stattest == "wasserstein" and etch.drift_share == 0.2
    assert etch.per_feature_stattest == {"rf_power": "psi", "pressure": "jensenshannon"}
    assert etch.critical_sensors == ["rf_power"] and etch.overrides == {}
    litho = base.for_model("litho_yield")
    # None means "not overridden" (a block reloaded from Prefect stores unset fields as null)
    assert litho.stattest == "ks" and litho.critical_sensors == [] and litho.drift_share == 0.5
    assert base.for_model("cmp_yield") == base.model_copy(update={"overrides": {}})

    ref, cur = _one_drifted_of_four()
    used = {
        f.feature: f.stattest for f in check_drift(ref, cur, etch.model_copy(update={"min_window_rows": 1})).features
    }
    assert used == {"rf_power": "psi", "pressure": "jensenshannon", "temp": "wasserstein", "flow": "wasserstein"}


def test_cooldown():
    policy = DriftPolicy(cooldown_minutes=30)
    now = datetime(2025, 1, 1, 12, tzinfo=UTC)
    assert policy.in_cooldown(now - timedelta(minutes=10), now)
    assert not policy.in_cooldown(now - timedelta(minutes=31), now)
    assert not policy.in_cooldown(None, now)


# --------------------------------------------------------------------------- summary and report


def test_top_drifted_and_markdown():
    ref, cur = _sensor_frames(seed=9, n_ref=300, n_cur=300, n_features=12, shifts={8: 0.3, 9: 1.5, 10: 0.8})
    result = check_drift(ref, cur, DriftPolicy(min_window_rows=1, critical_sensors=["sensor_010"]))
    top = result.top_drifted(2)
    assert [f.feature for f in top] == ["sensor_009", "sensor_010"]
    assert top[0].score < top[1].score  # p-values: the strongest drift has the smallest
    md = result.to_markdown("http://mlflow.local/artifacts/drift.html")
    assert md.startswith("## Drift check: **DRIFT**")
    assert "| sensor_009 | K-S p_value (p_value) |" in md
    assert "critical sensors drifted: sensor_010" in md
    assert "(http://mlflow.local/artifacts/drift.html)" in md
    assert all(f"| {f.feature} |" not in md for f in result.features if not f.drifted)
    assert sum(line.startswith("| sensor_") for line in md.splitlines()) == min(result.n_drifted, 10)


def test_drift_report_html_is_evidentlys_report():
    ref, cur = _one_drifted_of_four()
    cur["temp"] = np.nan  # would make Evidently raise; the report leaves it out
    html = drift_report_html(ref.head(200), cur.head(200), DriftPolicy(stattest="psi"), features=list(cur.columns))
    assert html.lstrip().lower().startswith("<html") or "<!doctype html" in html.lower()[:200]
    assert "rf_power" in html and "PSI" in html


# --------------------------------------------------------------------------- performance drift


def _scored_window(seed: int, n: int, separation: float, fail_rate: float = 0.2):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < fail_rate).astype(float)
    logit = rng.normal(size=n) + separation * (y - 0.5) + np.log(fail_rate / (1 - fail_rate))
    return y, 1 / (1 + np.exp(-logit))


def test_performance_no_breach_when_ranking_holds():
    y, s = _scored_window(1, 2000, separation=2.5)
    ref_auc = 0.92
    result = performance_drift(
        y, s, reference_auc=ref_auc, reference_fail_rate=0.2, policy=DriftPolicy(fail_rate_tolerance=0.1)
    )
    assert result.roc_auc is not None and abs(result.roc_auc - ref_auc) < 0.05
    assert not result.breached and result.breaches == []
    assert result.reason.startswith("No performance breach")


def test_performance_breach_on_auc_drop_and_fail_rate_gap():
    y, s = _scored_window(2, 2000, separation=0.3)  # the model barely ranks any more
    s_low = s * 0.3  # and now under-predicts failures
    result = performance_drift(y, s_low, reference_auc=0.92, reference_fail_rate=0.2, policy=DriftPolicy())
    assert result.roc_auc < 0.7 and result.auc_drop > 0.2
    assert result.breaches == ["roc_auc", "fail_rate"] and result.breached
    assert result.fail_rate_gap == pytest.approx(result.observed_fail_rate - result.predicted_fail_rate)


def test_fewer_fails_than_predicted_is_not_a_breach():
    y, s = _scored_window(3, 2000, separation=2.5, fail_rate=0.05)
    over = np.clip(s + 0.2, 0, 1)  # the model over-predicts fails by 20 points
    result = performance_drift(y, over, reference_auc=0.9, reference_fail_rate=0.05, policy=DriftPolicy())
    assert result.fail_rate_gap < -0.1 and "fail_rate" not in result.breaches


def test_performance_one_class_window_has_no_auc_and_says_why():
    y = [0.0] * 50 + [None] * 10
    s = [0.02] * 60
    result = performance_drift(y, s, reference_auc=0.9, reference_fail_rate=0.02, policy=DriftPolicy())
    assert result.roc_auc is None and result.auc_drop is None
    assert "all 50 labelled wafers are passing" in result.auc_note
    assert result.n_labelled == 50 and result.observed_fail_rate == 0.0
    assert not result.breached


def test_performance_needs_enough_labelled_wafers_and_valid_inputs():
    few = performance_drift([1, 0, None], [0.9, 0.1, 0.5], 0.9, 0.1, DriftPolicy(min_labelled_wafers=30))
    assert few.roc_auc is None and not few.breached and "2 labelled wafers" in few.reason
    with pytest.raises(ValueError, match=r"y_true\[1\]"):
        performance_drift([1, 2], [0.5, 0.5], 0.9, 0.1, DriftPolicy())
    with pytest.raises(ValueError, match=r"y_score\[0\]"):
        performance_drift([1, 0], [1.5, 0.5], 0.9, 0.1, DriftPolicy())
    with pytest.raises(ValueError, match="y_true has 2 wafers but y_score has 3"):
        performance_drift([1, 0], [0.5, 0.5, 0.5], 0.9, 0.1, DriftPolicy())


def _etch01_like_window() -> tuple[np.ndarray, np.ndarray]:
    """200 wafers, 13 fails, ROC-AUC about 0.9: the issue's quiet ETCH-01 window."""
    passes = np.linspace(0.01, 0.5, 187)
    at = np.array([0.6, 0.7, 0.78, 0.85, 0.9, 0.94, 0.97, 0.98, 0.99, 1.0, 1.0, 1.0, 1.0])
    fails = np.quantile(passes, at) + 0.001
    return np.r_[np.ones(13), np.zeros(187)], np.r_[fails, passes] * 0.2


def test_an_auc_drop_inside_the_sampling_noise_is_no_breach():
    y, s = _etch01_like_window()
    result = performance_drift(y, s, reference_auc=0.961, reference_fail_rate=0.065, policy=DriftPolicy(),
                               reference_n_fail=14, reference_n_pass=286)
    assert result.roc_auc == pytest.approx(0.899, abs=0.01)
    assert result.auc_drop > DriftPolicy().roc_auc_drop_tolerance  # the old rule breached here
    assert not result.breached and result.auc_verdict == "no_breach"
    assert 0.01 < result.auc_p_value < 0.5 and result.roc_auc_ci[0] < 0.85 < 0.95 < result.roc_auc_ci[1]
    head = f"No performance breach on 200 labelled wafers: ROC-AUC {result.roc_auc:.3f} (95% CI"
    assert result.reason.startswith(head)
    assert "on 13 fails vs reference 0.961 on 14 fails" in result.reason
    assert "not significant at α = 0.01" in result.reason
    # A reference logged with its DeLong variance is used as it is.
    logged = performance_drift(y, s, 0.961, 0.065, DriftPolicy(), reference_var=0.0004, reference_n_fail=14)
    assert logged.reference_se == pytest.approx(0.02) and not logged.breached


def test_a_significant_auc_drop_beyond_tolerance_breaches():
    y, s = _scored_window(4, 1000, separation=1.0, fail_rate=0.1)  # ROC-AUC about 0.75 on ~100 fails
    result = performance_drift(y, s, reference_auc=0.95, reference_fail_rate=0.1, policy=DriftPolicy(),
                               reference_var=0.0002)
    assert result.breaches == ["roc_auc"] and result.auc_verdict == "breach"
    assert result.auc_p_value < 0.001 and "significant at α = 0.01 and beyond the tolerance" in result.reason
    # The same drop with a wide tolerance is significant but accepted.
    wide = performance_drift(y, s, 0.95, 0.1, DriftPolicy(roc_auc_drop_tolerance=0.3), reference_var=0.0002)
    assert not wide.breached and "significant, but within the tolerance 0.300" in wide.reason


def test_too_few_fails_gives_no_auc_verdict_never_a_breach():
    y = np.r_[np.ones(5), np.zeros(195)]
    s = np.r_[np.full(5, 0.01), np.full(195, 0.9)]  # ranks every fail last: AUC 0
    result = performance_drift(y, s, reference_auc=0.95, reference_fail_rate=0.025, policy=DriftPolicy())
    assert result.roc_auc is None and result.auc_verdict == "no_verdict" and "roc_auc" not in result.breaches
    assert "no ROC-AUC verdict: 5 failing / 195 passing wafers" in result.reason


def test_fail_rate_excess_needs_significance():
    # 6 fails of 40 where 5 % are predicted: a 10-point gap, but p ≈ 0.05 on 40 wafers.
    y = np.r_[np.ones(6), np.zeros(34)]
    s = np.full(40, 0.05)
    small = performance_drift(y, s, 0.9, 0.05, DriftPolicy(min_failing_wafers=10))
    assert small.fail_rate_gap > 0.05 and "fail_rate" not in small.breaches
    assert small.fail_rate_p_value > 0.01 and "fail rate 0.150 (6/40, 95% CI" in small.reason
    # The same rate on 400 wafers is no longer noise.
    big = performance_drift(np.tile(y, 10), np.tile(s, 10), 0.9, 0.05, DriftPolicy(min_failing_wafers=1000))
    assert big.breaches == ["fail_rate"] and big.fail_rate_p_value < 1e-6
