"""Is a closed window of wafers still like the data the champion learnt from?

The verdict uses Evidently's *own* per-column machinery, not a reimplementation:
``DataDriftOptions`` resolves which stattest and threshold a sensor gets (policy,
per-sensor override, or Evidently's default for the sample size and column type),
``get_stattest`` picks the test exactly as ``DataDriftPreset`` does, and the
registered ``StatTest`` computes the score and the drifted flag. What is skipped is
the Report machinery around it (correlations, histograms, plots, widgets): on a
1,000 x 590 window that machinery is ~99 % of a ``DataDriftPreset`` run, and it is
kept only for the human-facing HTML (:func:`drift_report_html`), built when a check
breaches.

Missing values follow Evidently (``get_one_column_drift``): per sensor, +-inf become
NaN and NaN rows are dropped before the test, and the default test is chosen from
the cleaned reference size and the distinct values of both samples. Where Evidently
would raise (a sensor with no finite value) or give a verdict on a handful of values,
a sensor with fewer than ``min_feature_values`` finite values on either side gets
``status="insufficient_data"`` and is left out of the drift share.

Convention (as in ``fabloop.core.training``): the label is 1 for a *failing* wafer.

Evidently is imported lazily: importing it costs several seconds, which a CLI or a
flow that never checks drift should not pay.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from fabloop.core.policies import AlarmRule, DriftPolicy

if TYPE_CHECKING:
    from fabloop.core.calibration import DriftCalibration

# Tests whose score is a p-value (drift when the p-value is *below* the threshold);
# every other registered test returns a distance/divergence (drift when *above*).
# Read off each implementation's return statement in evidently 0.7's
# legacy/calculations/stattests; only used to label and rank scores, never to decide.
_P_VALUE_TESTS = frozenset(
    {
        "anderson",
        "chisquare",
        "cramer_von_mises",
        "es",
        "fisher_exact",
        "g_test",
        "ks",
        "mannw",
        "empirical_mmd",
        "t_test",
        "TVD",
        "z",
    }
)
_TESTABLE_TYPES = ("num", "cat", "text")
# The calibrated rule needs a reference of at least this many windows (fabloop.core.calibration says why).
MIN_REFERENCE_WINDOWS = 3


@cache
def _ev() -> SimpleNamespace:
    """The Evidently pieces the verdict is made of (imported once, on first use: importing
    Evidently takes seconds, and the schemas and policies in this module are needed without it)."""
    import evidently
    from evidently.core.datasets import infer_column_type
    from evidently.legacy.calculations import stattests
    from evidently.legacy.calculations.stattests.registry import get_stattest
    from evidently.legacy.core import ColumnType
    from evidently.legacy.options.data_drift import DataDriftOptions

    return SimpleNamespace(
        version=evidently.__version__,
        infer_column_type=infer_column_type,
        get_stattest=get_stattest,
        stattests=stattests,
        ColumnType=ColumnType,
        DataDriftOptions=DataDriftOptions,
    )


def _evidently_options(policy: DriftPolicy) -> Any:
    """The policy as Evidently's ``DataDriftOptions``: Evidently resolves each sensor's test from it."""
    return _ev().DataDriftOptions(
        drift_share=policy.drift_share,
        all_features_stattest=policy.stattest,
        all_features_threshold=policy.stattest_threshold,
        per_feature_stattest=dict(policy.per_feature_stattest) or None,
        per_feature_threshold=dict(policy.per_feature_threshold) or None,
    )


# --------------------------------------------------------------------------- results

FeatureStatus = Literal["ok", "insufficient_data", "unsupported_type"]


class FeatureDrift(BaseModel):
    """One sensor's verdict, with the numbers exactly as Evidently computed them."""

    model_config = ConfigDict(frozen=True)

    feature: str
    status: FeatureStatus
    column_type: str = Field(description="Evidently's inferred type: num, cat, text (or other when untested).")
    stattest: str | None = Field(default=None, description="Evidently registry name, e.g. 'ks'.")
    stattest_display: str | None = Field(default=None, description="Evidently display name, e.g. 'K-S p_value'.")
    score_kind: Literal["p_value", "distance"] | None = None
    score: float | None = None
    threshold: float | None = None
    drifted: bool = False
    n_reference: int = Field(description="Finite values of the sensor in the reference.")
    n_current: int = Field(description="Finite values of the sensor in the window.")
    critical: bool = False
    detail: str | None = None

    @property
    def severity(self) -> float:
        """How far past its threshold the score is (>= 1 when drifted); ranks mixed tests."""
        if self.status != "ok" or self.score is None or self.threshold is None or math.isnan(self.score):
            return 0.0
        if self.score_kind == "p_value":
            return math.inf if self.score <= 0 else self.threshold / self.score
        return self.score / self.threshold


DriftStatus = Literal["ok", "window_too_small", "no_testable_features"]


class DriftResult(BaseModel):
    """Per-sensor verdicts and the dataset verdict for one window."""

    model_config = ConfigDict(frozen=True)

    status: DriftStatus
    drifted: bool
    reason: str
    share: float = Field(description="Drifted sensors / tested sensors (0 when none tested).")
    drift_share: float = Field(description="The policy's fixed share (the rule only when alarm_rule='share').")
    alarm_rule: AlarmRule = "share"
    threshold_share: float | None = Field(
        default=None,
        description="The share the window was judged against: drift_share ('share', alarm at >=) or the "
        "reference's own (1 - alpha) quantile ('calibrated', alarm at >).",
    )
    alpha: float | None = Field(default=None, description="'calibrated': the false-alarm rate the rule is set to.")
    calibration_draws: int | None = Field(default=None, description="'calibrated': reference sub-samples drawn.")
    calibration_window_rows: int | None = Field(
        default=None,
        description="'calibrated': wafers per pseudo-window (the window's size unless the reference is small).",
    )
    n_features: int
    n_tested: int
    n_drifted: int
    drifted_critical_sensors: list[str]
    missing_critical_sensors: list[str] = Field(description="Critical sensors not among the checked features.")
    untested: list[str]
    reference_rows: int
    current_rows: int
    evidently_version: str
    features: list[FeatureDrift]

    def feature(self, name: str) -> FeatureDrift:
        for f in self.features:
            if f.feature == name:
                return f
        raise KeyError(f"feature {name!r} was not checked")

    def top_drifted(self, n: int = 10) -> list[FeatureDrift]:
        """The ``n`` drifted sensors furthest past their thresholds, worst first."""
        drifted = [f for f in self.features if f.drifted]
        return sorted(drifted, key=lambda f: (-f.severity, f.feature))[:n]

    def to_markdown(self, report_url: str | None = None, top: int = 10) -> str:
        """A short summary for a Prefect markdown artifact."""
        verdict = "DRIFT" if self.drifted else "no drift"
        lines = [
            f"## Drift check: **{verdict}**",
            "",
            self.reason,
            "",
            f"- window: {self.current_rows} wafers vs reference: {self.reference_rows} wafers",
            f"- sensors drifted: {self.n_drifted} of {self.n_tested} tested (share {self.share:.3f})",
        ]
        if self.alarm_rule == "calibrated" and self.threshold_share is not None:
            lines.append(
                f"- alarm rule: calibrated, share > {self.threshold_share:.3f} (the reference's own "
                f"{_percentile(self.alpha or 0.0)} over {self.calibration_draws} draws of "
                f"{self.calibration_window_rows} wafers)"
            )
        else:
            lines.append(f"- alarm rule: fixed share, share >= {self.drift_share:.3f}")
        if self.drifted_critical_sensors:
            lines.append(f"- critical sensors drifted: {', '.join(self.drifted_critical_sensors)}")
        if self.untested:
            shown = ", ".join(self.untested[:10]) + (" ..." if len(self.untested) > 10 else "")
            lines.append(f"- not tested ({len(self.untested)}): {shown}")
        lines.append(f"- Evidently {self.evidently_version}")
        worst = self.top_drifted(top)
        if worst:
            lines += [
                "",
                f"### Top {len(worst)} drifted sensors",
                "",
                "| sensor | test | score | threshold | critical |",
                "|---|---|---:|---:|:---:|",
            ]
            for f in worst:
                lines.append(
                    f"| {f.feature} | {f.stattest_display} ({f.score_kind}) | {f.score:.4g} "
                    f"| {f.threshold:.4g} | {'yes' if f.critical else ''} |"
                )
        if report_url:
            lines += ["", f"[Full Evidently drift report]({report_url})"]
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- data drift


def _require_frame(df: Any, name: str) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{name} must be a pandas DataFrame, got {type(df).__name__}")
    if df.columns.has_duplicates:
        dupes = sorted({str(c) for c in df.columns[df.columns.duplicated()]})
        raise ValueError(f"{name} has duplicate columns: {dupes}")
    return df


def _testable_columns(frame: pd.DataFrame) -> list[str]:
    """The columns ``DataDriftPreset`` would check when given no column list."""
    infer = _ev().infer_column_type
    return [c for c in frame.columns if infer(frame[c]).value in _TESTABLE_TYPES]


def _resolve_features(reference: pd.DataFrame, current: pd.DataFrame, features: Sequence[str] | None) -> list[str]:
    if features is None:
        chosen = _testable_columns(current)
    else:
        chosen = list(features)
        dupes = sorted({f for f in chosen if chosen.count(f) > 1})
        if dupes:
            raise ValueError(f"features lists these more than once: {dupes}")
        absent = [f for f in chosen if f not in current.columns]
        if absent:
            raise ValueError(f"features not in the current window: {absent}")
    absent_ref = [f for f in chosen if f not in reference.columns]
    if absent_ref:
        raise ValueError(f"features not in the reference data: {absent_ref}")
    return chosen


def _is_float(series: pd.Series) -> bool:
    """A plain numpy float column (not a pandas extension dtype)."""
    return isinstance(series.dtype, np.dtype) and series.dtype.kind == "f"


def _finite(series: pd.Series) -> pd.Series:
    """Evidently's cleaning in ``get_one_column_drift``: +-inf -> NaN, then drop NaN.

    For a float sensor that is keeping the finite values, which numpy does ~10x
    faster than ``replace`` + ``dropna`` (the same values, index and dtype).
    """
    if _is_float(series):
        finite = np.isfinite(series.to_numpy())
        return series if finite.all() else series[finite]
    return series.replace([-np.inf, np.inf], np.nan).dropna()


def _default_numerical_stattest(ref: pd.Series, cur: pd.Series) -> Any:
    """Evidently's default test for a numerical column (``_get_default_stattest``).

    The same rule on the same counts: sample size of the reference, then the number
    of distinct values in both. Evidently counts them with ``pd.concat(...).nunique()``
    per column, most of a check's time at 590 sensors; ``np.unique`` on the finite
    values counts the same.
    """
    st = _ev().stattests
    n_values = len(np.unique(np.concatenate([ref.to_numpy(), cur.to_numpy()])))
    if ref.shape[0] <= 1000:
        if n_values <= 5:
            return st.chi_stat_test if n_values > 2 else st.z_stat_test
        return st.ks_stat_test
    return st.jensenshannon_stat_test if n_values <= 5 else st.wasserstein_stat_test


def _check_feature(
    feature: str,
    reference: pd.Series,
    current: pd.Series,
    options: Any,
    policy: DriftPolicy,
) -> FeatureDrift:
    ev = _ev()
    column_type = ev.infer_column_type(current)  # DataDriftPreset types a column from the current data
    ref = _finite(reference)
    cur = _finite(current)
    base = {
        "feature": feature,
        "column_type": column_type.value,
        "n_reference": len(ref),
        "n_current": len(cur),
        "critical": feature in policy.critical_sensors,
    }
    if column_type.value not in _TESTABLE_TYPES:
        return FeatureDrift(
            status="unsupported_type",
            detail=f"Evidently infers type {column_type.value!r} (dtype {current.dtype}); drift needs num/cat/text",
            **base,
        )
    if len(ref) < policy.min_feature_values or len(cur) < policy.min_feature_values:
        return FeatureDrift(
            status="insufficient_data",
            detail=(
                f"{len(ref)} finite values in reference, {len(cur)} in window; "
                f"need >= {policy.min_feature_values} on each side"
            ),
            **base,
        )
    if column_type == ev.ColumnType.Numerical and not pd.api.types.is_numeric_dtype(ref):
        raise ValueError(f"column {feature!r} is numerical in the window but not in the reference (dtype {ref.dtype})")

    requested = options.get_feature_stattest_func(feature, column_type.value)
    threshold = options.get_threshold(feature, column_type.value)
    try:
        if requested is None and column_type == ev.ColumnType.Numerical and _is_float(ref) and _is_float(cur):
            stattest = _default_numerical_stattest(ref, cur)
        else:
            stattest = ev.get_stattest(ref, cur, column_type, requested)
    except ValueError as exc:  # e.g. 'chisquare' asked for a numerical sensor
        raise ValueError(f"column {feature!r}: {exc}") from exc
    outcome = stattest(ref, cur, column_type, threshold)
    return FeatureDrift(
        status="ok",
        stattest=stattest.name,
        stattest_display=stattest.display_name,
        score_kind="p_value" if stattest.name in _P_VALUE_TESTS else "distance",
        score=float(outcome.drift_score),
        threshold=float(outcome.actual_threshold),
        drifted=bool(outcome.drifted),
        **base,
    )


def _percentile(alpha: float) -> str:
    """'99th percentile' for alpha 0.01, '97.5 percentile' for 0.025."""
    label = f"{round(100 * (1 - alpha), 2):g}"
    if not label.isdigit():
        return f"{label} percentile"
    n = int(label)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{label}{suffix} percentile"


def _reason(
    drifted: bool,
    share: float,
    policy: DriftPolicy,
    n_drifted: int,
    n_tested: int,
    critical: list[str],
    untested: list[str],
    missing_critical: list[str],
    calibration: DriftCalibration | None = None,
) -> str:
    counted = f"{n_drifted} of {n_tested} sensors drifted"
    if calibration is None or not calibration.draws:
        over = share >= policy.drift_share
        share_part = f"{counted} (share {share:.3f} {'>=' if over else '<'} {policy.drift_share:.3f})"
        if calibration is not None:
            share_part += (
                f" by the fixed share rule: the reference's {calibration.reference_rows} wafers are too few to "
                f"calibrate windows of {calibration.window_rows} (it needs {MIN_REFERENCE_WINDOWS} windows' worth)"
            )
    else:
        over = share > calibration.threshold
        share_part = (
            f"{counted} (share {share:.3f}) {'>' if over else 'vs'} {calibration.threshold:.3f} at the reference's "
            f"own {_percentile(calibration.alpha)} ({calibration.draws} draws of {calibration.pseudo_window_rows} "
            f"wafers): {'alarm' if over else 'no alarm'}"
        )
    if critical and over:
        text = f"Dataset drift: {share_part}; critical sensors drifted: {', '.join(critical)}."
    elif critical:
        text = f"Dataset drift: critical sensors drifted: {', '.join(critical)} ({share_part})."
    elif drifted:
        text = f"Dataset drift: {share_part}."
    else:
        text = f"No dataset drift: {share_part}"
        text += "; no critical sensor drifted." if policy.critical_sensors else "."
    if calibration is not None and calibration.draws and calibration.rank > calibration.draws:
        text += (
            f" {calibration.draws} draws are too few for alpha={calibration.alpha:g}: "
            "only critical sensors can alarm."
        )
    if untested:
        text += f" {len(untested)} sensors not tested (too few values or unsupported type)."
    if missing_critical:
        text += f" Critical sensors not in this window's features: {', '.join(missing_critical)}."
    return text


def _no_verdict(
    status: DriftStatus, reason: str, *, untested: list[str], features: list[FeatureDrift], common: dict[str, Any]
) -> DriftResult:
    """A result that judges nothing (window too small, nothing testable): never a breach."""
    return DriftResult(
        status=status, drifted=False, reason=reason, share=0.0, n_tested=0, n_drifted=0,
        drifted_critical_sensors=[], untested=untested, features=features, **common,
    )


def check_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    policy: DriftPolicy,
    features: list[str] | None = None,
    *,
    calibration: DriftCalibration | None = None,
) -> DriftResult:
    """Per-sensor drift with Evidently's stattests, and the dataset verdict under ``policy``.

    ``features=None`` checks the columns ``DataDriftPreset`` would (num/cat/text in
    the window); a given list is checked as is and must exist in both frames.

    ``alarm_rule='share'``: dataset drift when the drifted share is >= ``drift_share``
    (Evidently's rule). ``'calibrated'``: when it is > the reference's own null quantile
    (:mod:`fabloop.core.calibration`); pass ``calibration`` (from
    :func:`~fabloop.core.calibration.calibrate_drift` for this reference, window size,
    features and policy) to skip computing it. Either way a drifted critical sensor is
    dataset drift on its own.
    """
    _require_frame(reference, "reference")
    _require_frame(current, "current")
    chosen = _resolve_features(reference, current, features)
    missing_critical = [s for s in policy.critical_sensors if s not in chosen]
    common = {
        "drift_share": policy.drift_share,
        "n_features": len(chosen),
        "missing_critical_sensors": missing_critical,
        "reference_rows": len(reference),
        "current_rows": len(current),
        "evidently_version": _ev().version,
    }
    if len(current) < policy.min_window_rows:
        return _no_verdict(
            "window_too_small",
            f"No verdict: the window has {len(current)} wafers, the policy needs at least {policy.min_window_rows}.",
            untested=chosen, features=[], common={**common, "alarm_rule": policy.alarm_rule},
        )

    options = _evidently_options(policy)
    results = [_check_feature(f, reference[f], current[f], options, policy) for f in chosen]
    tested = [r for r in results if r.status == "ok"]
    untested = [r.feature for r in results if r.status != "ok"]
    n_drifted = sum(r.drifted for r in tested)
    critical = [r.feature for r in tested if r.drifted and r.critical]
    if not tested:
        return _no_verdict(
            "no_testable_features",
            f"No verdict: none of the {len(chosen)} sensors has enough finite values to test.",
            untested=untested, features=results, common={**common, "alarm_rule": policy.alarm_rule},
        )
    share = n_drifted / len(tested)
    rule: dict[str, Any] = {"alarm_rule": policy.alarm_rule}
    if policy.alarm_rule == "calibrated":
        calibration = _calibration_for(reference, policy, len(current), chosen, calibration)
    if policy.alarm_rule == "calibrated" and calibration is not None and calibration.draws:
        drifted = share > calibration.threshold or bool(critical)
        rule |= {
            "threshold_share": calibration.threshold,
            "alpha": calibration.alpha,
            "calibration_draws": calibration.draws,
            "calibration_window_rows": calibration.pseudo_window_rows,
        }
    else:  # the 'share' rule, or a reference too small to calibrate (said in the reason)
        drifted = share >= policy.drift_share or bool(critical)  # Evidently: share >= drift_share
        rule |= {"threshold_share": policy.drift_share, "alarm_rule": "share"}
    return DriftResult(
        status="ok",
        drifted=drifted,
        reason=_reason(
            drifted, share, policy, n_drifted, len(tested), critical, untested, missing_critical, calibration
        ),
        share=share,
        n_tested=len(tested),
        n_drifted=n_drifted,
        drifted_critical_sensors=critical,
        untested=untested,
        features=results,
        **common,
        **rule,
    )


def _calibration_for(
    reference: pd.DataFrame,
    policy: DriftPolicy,
    window_rows: int,
    features: list[str],
    given: DriftCalibration | None,
) -> DriftCalibration:
    """The given calibration if it was made for this reference, window size and policy; else a fresh one."""
    from fabloop.core.calibration import calibrate_drift, calibration_fingerprint

    if given is None:
        return calibrate_drift(reference, policy, window_rows, features)
    expected = calibration_fingerprint(reference, policy, window_rows, features, given.method)
    if given.fingerprint != expected:
        raise ValueError(
            f"calibration {given.fingerprint} was made for another reference, window size ({given.window_rows} "
            f"wafers), feature list or policy than this check ({window_rows} wafers, fingerprint {expected})"
        )
    return given


def drift_report_html(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    policy: DriftPolicy,
    features: list[str] | None = None,
) -> str:
    """The full Evidently ``DataDriftPreset`` HTML, configured like :func:`check_drift`.

    Slow (about a minute for 590 sensors): build it only when a check breaches.
    Sensors :func:`check_drift` cannot test are left out, since Evidently's Report
    raises on a sensor with no finite value.
    """
    from evidently import Report
    from evidently.presets import DataDriftPreset

    _require_frame(reference, "reference")
    _require_frame(current, "current")
    chosen = _resolve_features(reference, current, features)
    columns = [
        f
        for f in chosen
        if _ev().infer_column_type(current[f]).value in _TESTABLE_TYPES
        and len(_finite(reference[f])) >= policy.min_feature_values
        and len(_finite(current[f])) >= policy.min_feature_values
    ]
    if not columns:
        raise ValueError("no feature has enough finite values for an Evidently drift report")
    preset = DataDriftPreset(
        columns=columns,
        drift_share=policy.drift_share,
        method=policy.stattest,
        threshold=policy.stattest_threshold,
        per_column_method={k: v for k, v in policy.per_feature_stattest.items() if k in columns} or None,
        per_column_threshold={k: v for k, v in policy.per_feature_threshold.items() if k in columns} or None,
    )
    report = Report([preset], include_tests=True)
    snapshot = report.run(current_data=current[columns], reference_data=reference[columns])
    return str(snapshot.get_html_str(as_iframe=False))


# --------------------------------------------------------------------------- performance drift


class PerformanceDriftResult(BaseModel):
    """The champion's ranking and calibration on the window's labelled wafers vs its reference.

    Each figure comes with its uncertainty: an ROC-AUC on a dozen failing wafers
    moves by several points between two samples of the same process, so a drop is a
    breach only when it is both significant (``performance_alpha``) and larger than
    the tolerance.
    """

    model_config = ConfigDict(frozen=True)

    n_wafers: int
    n_labelled: int
    n_failing: int
    roc_auc: float | None
    reference_auc: float
    auc_drop: float | None
    auc_note: str | None = Field(default=None, description="Why there is no AUC, when there is none.")
    observed_fail_rate: float | None
    predicted_fail_rate: float | None = Field(description="Mean predicted fail probability on labelled wafers.")
    reference_fail_rate: float
    fail_rate_gap: float | None = Field(description="observed - predicted fail rate.")
    breached: bool
    breaches: list[Literal["roc_auc", "fail_rate"]]
    reason: str
    roc_auc_ci: tuple[float, float] | None = Field(default=None, description="95 % DeLong interval of the window AUC.")
    auc_p_value: float | None = Field(
        default=None, description="One-sided p-value of the drop (window DeLong + reference variance)."
    )
    reference_n_fail: int | None = None
    reference_se: float | None = Field(default=None, description="Standard error of the reference AUC, if known.")
    fail_rate_ci: tuple[float, float] | None = Field(default=None, description="95 % Wilson interval.")
    fail_rate_p_value: float | None = Field(
        default=None, description="One-sided binomial p-value of more fails than predicted."
    )
    auc_verdict: Literal["breach", "no_breach", "no_verdict"] = "no_verdict"


def _as_float_array(values: Any, name: str) -> np.ndarray:
    try:
        arr = pd.to_numeric(pd.Series(values, dtype=object), errors="raise").to_numpy(dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional")
    return np.asarray(arr, dtype=float)


def _reference_variance(
    reference_auc: float, reference_var: float | None, reference_n_fail: int | None, reference_n_pass: int | None
) -> tuple[float, str]:
    """The reference AUC's variance (logged DeLong, else Hanley-McNeil from its counts, else 0) and its source."""
    from fabloop.core.stats import hanley_mcneil_var

    if reference_var is not None and math.isfinite(reference_var) and reference_var >= 0:
        return float(reference_var), "delong"
    if reference_n_fail and reference_n_pass:
        return hanley_mcneil_var(reference_auc, reference_n_fail, reference_n_pass), "hanley-mcneil"
    return 0.0, "unknown"


def performance_drift(
    y_true: Sequence[float | int | bool | None] | np.ndarray | pd.Series,
    y_score: Sequence[float] | np.ndarray | pd.Series,
    reference_auc: float,
    reference_fail_rate: float,
    policy: DriftPolicy,
    score_bias: float = 0.0,
    *,
    reference_var: float | None = None,
    reference_n_fail: int | None = None,
    reference_n_pass: int | None = None,
) -> PerformanceDriftResult:
    """Compare the champion on the window's labelled wafers with its reference figures.

    ``y_true`` is 1 for a failing wafer, 0 for a passing one and None/NaN while the
    wafer has no test result yet; ``y_score`` is the predicted fail probability for
    every wafer.

    ROC-AUC: with fewer than ``min_failing_wafers`` fails (or passes) there is no
    verdict, never a breach. Otherwise the drop from the reference is tested with the
    window's DeLong variance plus the reference's own (``reference_var``, its logged
    DeLong variance; else Hanley-McNeil from ``reference_n_fail``/``reference_n_pass``;
    else the reference is taken as exact and the reason says so). A breach needs the
    drop significant at ``performance_alpha`` *and* beyond ``roc_auc_drop_tolerance``.

    Fail rate: a one-sided binomial test of the observed fails against the predicted
    rate; a breach needs it significant and the gap beyond ``fail_rate_tolerance``.
    More wafers failing than the model expects is a yield excursion it misses; fewer
    is the normal state of a fab between excursions, never a breach.

    ``score_bias`` is the model's mean score minus the true fail rate on its own
    holdout: a model trained with ``scale_pos_weight`` ranks wafers well but
    over-predicts, and that known bias is removed from the predicted fail rate.
    """
    for name, value in (("reference_auc", reference_auc), ("reference_fail_rate", reference_fail_rate)):
        if not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    truth = _as_float_array(y_true, "y_true")
    score = _as_float_array(y_score, "y_score")
    if len(truth) != len(score):
        raise ValueError(f"y_true has {len(truth)} wafers but y_score has {len(score)}")
    bad_score = np.flatnonzero(~np.isfinite(score) | (score < 0) | (score > 1))
    if bad_score.size:
        i = int(bad_score[0])
        raise ValueError(f"y_score[{i}] = {score[i]!r}: must be a fail probability in [0, 1]")
    labelled = ~np.isnan(truth)
    bad_label = np.flatnonzero(labelled & (truth != 0) & (truth != 1))
    if bad_label.size:
        i = int(bad_label[0])
        raise ValueError(f"y_true[{i}] = {truth[i]!r}: must be 1 (fail), 0 (pass) or missing")

    t, s = truth[labelled].astype(int), score[labelled]
    n_labelled, n_failing = len(t), int(t.sum())
    common: dict[str, Any] = {
        "n_wafers": len(truth),
        "n_labelled": n_labelled,
        "n_failing": n_failing,
        "reference_auc": float(reference_auc),
        "reference_fail_rate": float(reference_fail_rate),
        "reference_n_fail": reference_n_fail,
    }
    if n_labelled < policy.min_labelled_wafers:
        note = f"{n_labelled} labelled wafers, the policy needs at least {policy.min_labelled_wafers}"
        return PerformanceDriftResult(
            roc_auc=None,
            auc_drop=None,
            auc_note=note,
            observed_fail_rate=None if n_labelled == 0 else n_failing / n_labelled,
            predicted_fail_rate=None if n_labelled == 0 else float(s.mean()),
            fail_rate_gap=None,
            breached=False,
            breaches=[],
            reason=f"No performance verdict: {note}.",
            **common,
        )
    # Lazy: SciPy takes seconds to import, and a drift check without labelled wafers never needs it.
    from fabloop.core.stats import auc_drop_p, binomial_excess_p, delong_auc, fmt_p, proportion_ci

    alpha = policy.performance_alpha
    observed = n_failing / n_labelled
    predicted = float(np.clip(s.mean() - score_bias, 0.0, 1.0))
    gap = observed - predicted
    breaches: list[Literal["roc_auc", "fail_rate"]] = []
    parts: list[str] = []
    auc_fields: dict[str, Any] = {"roc_auc": None, "auc_drop": None}
    auc_verdict: Literal["breach", "no_breach", "no_verdict"] = "no_verdict"

    if n_failing in (0, n_labelled):
        kind = "failing" if n_failing else "passing"
        auc_note = f"ROC-AUC undefined: all {n_labelled} labelled wafers are {kind}"
        parts.append(auc_note)
    elif min(n_failing, n_labelled - n_failing) < policy.min_failing_wafers:
        auc_note = (
            f"no ROC-AUC verdict: {n_failing} failing / {n_labelled - n_failing} passing wafers, "
            f"the policy needs {policy.min_failing_wafers} of each"
        )
        parts.append(auc_note)
    else:
        auc_note = None
        window = delong_auc(t, s)
        ref_var, ref_source = _reference_variance(reference_auc, reference_var, reference_n_fail, reference_n_pass)
        drop = reference_auc - window.auc
        p = auc_drop_p(window, reference_auc, ref_var)
        lo, hi = window.ci(0.05)
        significant, beyond = p < alpha, drop > policy.roc_auc_drop_tolerance
        auc_verdict = "breach" if significant and beyond else "no_breach"
        if auc_verdict == "breach":
            breaches.append("roc_auc")
        ref_on = f" on {reference_n_fail} fails" if reference_n_fail else ""
        ref_note = "" if ref_source != "unknown" else " (reference uncertainty unknown: taken as exact)"
        if significant and beyond:
            judged = f"significant at α = {alpha:g} and beyond the tolerance {policy.roc_auc_drop_tolerance:.3f}"
        elif significant:
            judged = f"significant, but within the tolerance {policy.roc_auc_drop_tolerance:.3f}"
        elif beyond:
            judged = (f"beyond the tolerance {policy.roc_auc_drop_tolerance:.3f} but not significant at "
                      f"α = {alpha:g}: within sampling noise")
        else:
            judged = f"not significant at α = {alpha:g}"
        parts.append(
            f"ROC-AUC {window.auc:.3f} (95% CI {lo:.2f}–{hi:.2f}) on {n_failing} fails vs reference "
            f"{reference_auc:.3f}{ref_on}{ref_note}: drop {drop:+.3f}, {fmt_p(p)}, {judged}"
        )
        auc_fields = {"roc_auc": window.auc, "auc_drop": drop, "roc_auc_ci": (lo, hi), "auc_p_value": p,
                      "reference_se": math.sqrt(ref_var) if ref_source != "unknown" else None}

    rate_p = binomial_excess_p(n_failing, n_labelled, predicted)
    rate_lo, rate_hi = proportion_ci(n_failing, n_labelled, 0.05)
    rate_significant, rate_beyond = rate_p < alpha, gap > policy.fail_rate_tolerance
    if rate_significant and rate_beyond:
        breaches.append("fail_rate")
        rate_judged = f"significant at α = {alpha:g} and beyond the tolerance {policy.fail_rate_tolerance:.3f}"
    elif gap <= 0:
        rate_judged = "no more fails than predicted"
    elif rate_significant:
        rate_judged = f"significant, but within the tolerance {policy.fail_rate_tolerance:.3f}"
    else:
        rate_judged = f"not significant at α = {alpha:g}"
    parts.append(
        f"fail rate {observed:.3f} ({n_failing}/{n_labelled}, 95% CI {rate_lo:.3f}–{rate_hi:.3f}) vs predicted "
        f"{predicted:.3f} (reference {reference_fail_rate:.3f}): gap {gap:+.3f}, {fmt_p(rate_p)}, {rate_judged}"
    )
    head = f"Performance breach ({', '.join(breaches)})" if breaches else "No performance breach"
    return PerformanceDriftResult(
        **auc_fields,
        auc_note=auc_note,
        observed_fail_rate=observed,
        predicted_fail_rate=predicted,
        fail_rate_gap=gap,
        breached=bool(breaches),
        breaches=breaches,
        reason=f"{head} on {n_labelled} labelled wafers: " + "; ".join(parts) + ".",
        fail_rate_ci=(rate_lo, rate_hi),
        fail_rate_p_value=rate_p,
        auc_verdict=auc_verdict,
        **common,
    )
