"""The policies an operator tunes per model: how a window is judged, how a model is retrained.

Plain pydantic values with no numerical dependencies: the Prefect blocks that wrap
them (``fabloop.blocks.policies``) are loaded by every flow run and CLI command, and
must not pull in pandas, scikit-learn or Evidently to do so. Evidently's registry is
consulted only when a stattest is named.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def _known_stattests() -> dict[str, object]:
    """Evidently's stattest registry, by name (imported on first use: Evidently takes seconds)."""
    from evidently.legacy.calculations.stattests.registry import _registered_stat_tests

    registry: dict[str, object] = _registered_stat_tests
    return registry


def _check_stattest_name(name: str, where: str) -> str:
    registered = _known_stattests()
    if name not in registered:
        raise ValueError(f"{where}: unknown stattest {name!r}; Evidently knows {sorted(registered)}")
    return name


# --------------------------------------------------------------------------- drift

AlarmRule = Literal["calibrated", "share"]

class _PolicyFields(BaseModel):
    """Validation shared by the policy and its per-model partial overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("stattest", check_fields=False)
    @classmethod
    def _known_stattest(cls, v: str | None) -> str | None:
        return None if v is None else _check_stattest_name(v, "stattest")

    @field_validator("per_feature_stattest", check_fields=False)
    @classmethod
    def _known_feature_stattests(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for feature, name in (v or {}).items():
            _check_stattest_name(name, f"per_feature_stattest[{feature!r}]")
        return v


class DriftPolicyOverride(_PolicyFields):
    """A partial :class:`DriftPolicy` for one model; only the fields set here apply.

    Dict fields (``per_feature_stattest``, ``per_feature_threshold``) are merged into
    the base policy's (the override wins per sensor); every other field replaces.
    Setting ``stattest=None`` explicitly returns that model to Evidently's defaults.
    """

    stattest: str | None = None
    stattest_threshold: float | None = Field(default=None, gt=0)
    per_feature_stattest: dict[str, str] | None = None
    per_feature_threshold: dict[str, float] | None = None
    drift_share: float | None = Field(default=None, gt=0, le=1)
    alarm_rule: AlarmRule | None = None
    alpha: float | None = Field(default=None, gt=0, lt=0.5)
    calibration_draws: int | None = Field(default=None, ge=20)
    performance_alpha: float | None = Field(default=None, gt=0, lt=0.5)
    critical_sensors: list[str] | None = None
    min_window_rows: int | None = Field(default=None, ge=1)
    min_feature_values: int | None = Field(default=None, ge=1)
    cooldown_minutes: float | None = Field(default=None, ge=0)
    roc_auc_drop_tolerance: float | None = Field(default=None, ge=0, le=1)
    fail_rate_tolerance: float | None = Field(default=None, ge=0, le=1)
    min_labelled_wafers: int | None = Field(default=None, ge=1)
    min_failing_wafers: int | None = Field(default=None, ge=1)


class DriftPolicy(_PolicyFields):
    """How a window is judged against the champion's reference data.

    A plain value model: the lead wraps it in a Prefect Block so operators can tune
    it per model without a deploy. Stattest names are Evidently's registry names
    (``ks``, ``wasserstein``, ``psi``, ``jensenshannon``, ...).
    """

    stattest: str | None = Field(
        default=None,
        description="Test for every sensor; None = Evidently's default per column (by sample size and type).",
    )
    stattest_threshold: float | None = Field(
        default=None, gt=0, description="Threshold for every sensor; None = the test's own default."
    )
    per_feature_stattest: dict[str, str] = Field(default_factory=dict)
    per_feature_threshold: dict[str, float] = Field(default_factory=dict)
    drift_share: float = Field(
        default=0.5, gt=0, le=1,
        description="alarm_rule='share' only: dataset drift when the share of drifted sensors is >= this.",
    )
    alarm_rule: AlarmRule = Field(
        default="calibrated",
        description=(
            "'calibrated': the window alarms when its share of drifted sensors exceeds the (1 - alpha) quantile "
            "of that share between sub-samples of the reference itself; 'share': Evidently's fixed drift_share."
        ),
    )
    alpha: float = Field(
        default=0.01, gt=0, lt=0.5,
        description="False-alarm probability per window that the calibrated data-drift rule is set to.",
    )
    calibration_draws: int = Field(
        default=200, ge=20, description="Reference sub-samples drawn to calibrate the data-drift rule."
    )
    performance_alpha: float = Field(
        default=0.01, gt=0, lt=0.5,
        description="Significance level of the ROC-AUC drop and fail-rate tests on a window's labelled wafers.",
    )
    critical_sensors: list[str] = Field(
        default_factory=list, description="Any of these drifting is dataset drift on its own."
    )
    min_window_rows: int = Field(default=100, ge=1, description="Fewer wafers in the window: no verdict.")
    min_feature_values: int = Field(
        default=10, ge=1, description="Fewer finite values of a sensor on either side: not tested."
    )
    cooldown_minutes: float = Field(
        default=60, ge=0,
        description=(
            "No new retrain trigger while both the wall time and the event time (process time of the wafers) "
            "since the last retraining are shorter than this."
        ),
    )
    roc_auc_drop_tolerance: float = Field(default=0.05, ge=0, le=1)
    fail_rate_tolerance: float = Field(default=0.05, ge=0, le=1)
    min_labelled_wafers: int = Field(default=30, ge=1, description="Fewer labelled wafers: no performance verdict.")
    min_failing_wafers: int = Field(
        default=10, ge=1, description="Fewer failing (or passing) wafers: no ROC-AUC verdict, it would be noise."
    )
    overrides: dict[str, DriftPolicyOverride] = Field(default_factory=dict)

    @field_validator("per_feature_threshold")
    @classmethod
    def _positive_thresholds(cls, v: dict[str, float]) -> dict[str, float]:
        for feature, t in v.items():
            if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
                raise ValueError(f"per_feature_threshold[{feature!r}] must be a positive number, got {t!r}")
        return v

    def for_model(self, name: str) -> DriftPolicy:
        """The policy for model ``name``: this one with that model's override applied."""
        override = self.overrides.get(name)
        base = self.model_dump(exclude={"overrides"})
        if override is not None:
            # None means "not overridden": a block saved from the UI stores every
            # field of the override, unset ones as null.
            for field, value in override.model_dump(exclude_unset=True).items():
                if value is None:
                    continue
                if field in ("per_feature_stattest", "per_feature_threshold"):
                    base[field] = {**base[field], **value}
                else:
                    base[field] = value
        return DriftPolicy(**base)

    def in_cooldown(self, last_trigger: datetime | None, now: datetime) -> bool:
        """True while a retrain triggered at ``last_trigger`` still blocks a new one."""
        return last_trigger is not None and now - last_trigger < timedelta(minutes=self.cooldown_minutes)


# --------------------------------------------------------------------------- retraining


class RetrainPolicy(BaseModel):
    """Everything that decides how a scope (tool/chamber/recipe) is retrained and judged.

    A plain value model: the lead wraps it in a Prefect Block so operators can edit it
    per scope without a deploy.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- tuning budget -------------------------------------------------------------
    n_trials: int = Field(30, ge=1, description="Optuna trials per retrain (per worker).")
    timeout_s: float | None = Field(600.0, gt=0, description="Wall-clock cap on the search.")
    n_folds: int = Field(3, ge=2, description="Forward-chaining time folds for CV.")
    min_train_share: float = Field(
        0.5, gt=0, lt=1, description="Share of the tuning rows the first fold trains on."
    )
    max_boost_rounds: int = Field(1000, ge=10)
    early_stopping_rounds: int = Field(50, ge=5)
    max_bin: int = Field(
        63, ge=7, le=255, description="Fixed for the whole study: binned datasets are reused."
    )
    num_threads: int = Field(
        2, ge=1, description="Folds boosted in parallel, one LightGBM thread each (2 shared cores)."
    )
    # --- data gate -----------------------------------------------------------------
    min_rows: int = Field(200, ge=10)
    max_missing_share: float = Field(
        0.5, ge=0, le=1, description="A sensor missing on more than this share of the wafers: see missing_action."
    )
    missing_action: Literal["fail", "drop"] = Field(
        "drop",
        description="'drop' removes a sensor missing more than max_missing_share and lists it; 'fail' refuses the set.",
    )
    max_dropped_share: float = Field(
        0.5, ge=0, le=1,
        description=(
            "Refuse the set when more than this share of its sensors would be dropped (dead, mostly missing, constant)."
        ),
    )
    min_class_count: int = Field(10, ge=1, description="Minimum wafers of each class.")
    # --- split -----------------------------------------------------------------------
    holdout_share: float = Field(0.15, gt=0, lt=0.5)
    validation_share: float = Field(0.15, gt=0, lt=0.5)
    # --- operating point for "recall at operating point" ------------------------------
    target_recall: float | None = Field(
        0.8, gt=0, le=1, description="Pick the highest threshold that catches this share of fails."
    )
    threshold: float | None = Field(None, description="Fixed score threshold instead.")
    # --- challenger vs champion gate ---------------------------------------------------
    min_roc_auc: float = Field(
        0.7, ge=0, le=1,
        description=(
            "Floor on the challenger's ROC-AUC: on the holdout (which must also beat chance at gate_alpha), or on "
            "its CV estimate when the holdout holds fewer than min_holdout_fails fails."
        ),
    )
    max_regression: float = Field(
        0.01, ge=0,
        description="Largest ROC-AUC drop vs champion tolerated (paired holdout difference, or CV vs recorded CV).",
    )
    required_gain: float = Field(
        0.0, ge=0,
        description="ROC-AUC gain over champion needed to promote; on the holdout it must also be significant.",
    )
    min_holdout_fails: int = Field(
        10, ge=1,
        description=(
            "Fewer failing wafers in the holdout: the gate judges on the time-series CV estimates, and says so."
        ),
    )
    gate_alpha: float = Field(
        0.05, gt=0, lt=0.5, description="Confidence intervals (1 - gate_alpha) and paired tests of the challenger gate."
    )
    seed: int = 42

    @model_validator(mode="after")
    def _one_operating_point(self) -> RetrainPolicy:
        if (self.target_recall is None) == (self.threshold is None):
            raise ValueError("set exactly one of target_recall or threshold")
        if self.holdout_share + self.validation_share >= 0.8:
            raise ValueError("holdout_share + validation_share leaves too little to train on")
        return self
