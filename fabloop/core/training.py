"""What a training set must satisfy before fabloop retrains on it, and how it is split.

A retrain is triggered by drift, i.e. exactly when the data is least trustworthy: a
broken sensor, a join that lost the wafer-sort labels or a lot that never got
tested all show up as a "new" training set. ``gate_training_set`` refuses such a
set with a :class:`DataGateError` that names the column and the counts, instead of
letting the tuner fit a model on it. ``time_ordered_split`` keeps the most recent
wafers as a holdout so that a challenger is judged on the process as it is now,
never on wafers that were processed before the ones it learnt from.

Convention: the label is 1 for a *failing* wafer (the rare, positive class) and 0
for a passing one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field
from sklearn.metrics import average_precision_score, roc_auc_score

from fabloop.core.policies import RetrainPolicy


class DataGateError(ValueError):
    """The training set is not fit to train on; the message names what and where."""


class GateReport(BaseModel):
    """What the gate saw, which sensors survive into training, and which were dropped and why."""

    n_rows: int
    n_fail: int
    n_pass: int
    fail_rate: float
    label_col: str
    n_sensors: int = Field(description="Sensors offered to the gate, dropped ones included.")
    features: list[str] = Field(description="Features to train on, in input order.")
    dropped_constant: list[str] = Field(default_factory=list)
    dropped_missing: dict[str, float] = Field(
        default_factory=dict,
        description="Sensor -> missing share, for each missing on more than the policy's max_missing_share "
        "of the wafers (1.0: dead, never read).",
    )
    max_missing_share: float = Field(description="Worst missing share among kept features.")
    missing_limit: float = Field(description="The policy's max_missing_share the gate applied.")

    @property
    def dead(self) -> list[str]:
        """Sensors without a single reading in the training set."""
        return [c for c, share in self.dropped_missing.items() if share >= 1.0]

    @property
    def n_dropped(self) -> int:
        return len(self.dropped_missing) + len(self.dropped_constant)

    def dropped(self) -> dict[str, str]:
        """Each dropped sensor and why, in words: what an engineer checks the feed of."""
        why = {
            c: "dead: no reading on any wafer" if share >= 1.0
            else f"mostly missing: {share:.0%} of wafers > max_missing_share {self.missing_limit:.0%}"
            for c, share in self.dropped_missing.items()
        }
        why.update({c: "constant: the same value on every wafer that reads it" for c in self.dropped_constant})
        return why

    def dropped_summary(self) -> str:
        """One line: how many sensors were dropped, of how many, and of which kind."""
        dead = len(self.dead)
        return (
            f"{self.n_dropped} of {self.n_sensors} sensors dropped: {dead} dead, "
            f"{len(self.dropped_missing) - dead} mostly missing, {len(self.dropped_constant)} constant"
        )

    def dropped_markdown(self) -> str:
        """The dropped sensors as a Markdown section (empty when none was dropped)."""
        if not self.n_dropped:
            return ""
        rows = "\n".join(f"| `{c}` | {why} |" for c, why in self.dropped().items())
        return f"### Sensors not trained on\n\n{self.dropped_summary()}.\n\n| sensor | why |\n|---|---|\n{rows}\n"


def _names(cols: Sequence[str], limit: int = 10) -> str:
    cols = list(cols)
    shown = ", ".join(repr(c) for c in cols[:limit])
    return shown + (f" (+{len(cols) - limit} more)" if len(cols) > limit else "")


def gate_training_set(
    frame: pd.DataFrame,
    label_col: str,
    feature_cols: Sequence[str],
    policy: RetrainPolicy,
    expected_features: Sequence[str] | None = None,
) -> GateReport:
    """Refuse a training set that would produce a meaningless model; drop dead features.

    Raises :class:`DataGateError` for: missing/unexpected columns, non-numeric or
    infinite features, a label that is missing or not 0/1, too few rows, a class with
    fewer than ``policy.min_class_count`` wafers, and features missing more than
    ``policy.max_missing_share`` when ``missing_action='fail'``. By default (``'drop'``)
    dead and mostly-missing sensors are dropped and listed, as constant ones always
    are: real FDC exports carry many of both. The cap ``policy.max_dropped_share``
    refuses a set that would lose more than that share of its sensors, which is a
    broken feed rather than a few dead channels.
    """
    feature_cols = list(feature_cols)
    if len(set(feature_cols)) != len(feature_cols):
        dup = sorted({c for c in feature_cols if feature_cols.count(c) > 1})
        raise DataGateError(f"duplicate feature names: {_names(dup)}")
    if label_col in feature_cols:
        raise DataGateError(f"label column {label_col!r} is also listed as a feature")
    if expected_features is not None:
        expected = set(expected_features)
        missing, unexpected = sorted(expected - set(feature_cols)), sorted(set(feature_cols) - expected)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing expected features {_names(missing)}")
            if unexpected:
                parts.append(f"unexpected features {_names(unexpected)}")
            raise DataGateError("feature set differs from the champion's: " + "; ".join(parts))
    absent = [c for c in [label_col, *feature_cols] if c not in frame.columns]
    if absent:
        raise DataGateError(f"columns not in the training frame: {_names(absent)}")

    non_numeric = [c for c in feature_cols if not pd.api.types.is_numeric_dtype(frame[c])]
    if non_numeric:
        detail = ", ".join(f"{c!r} ({frame[c].dtype})" for c in non_numeric[:10])
        raise DataGateError(f"non-numeric feature columns: {detail}")

    n_rows = len(frame)
    if n_rows < policy.min_rows:
        raise DataGateError(f"too few rows: {n_rows} < min_rows={policy.min_rows}")

    label = frame[label_col]
    n_null = int(label.isna().sum())
    if n_null:
        raise DataGateError(f"label column {label_col!r} has {n_null} missing values of {n_rows} rows")
    values = set(pd.unique(label).tolist())
    if not values <= {0, 1}:
        bad = sorted(map(repr, values - {0, 1}))[:5]
        raise DataGateError(f"label column {label_col!r} must be 0 (pass) / 1 (fail); found {', '.join(bad)}")
    n_fail = int((label == 1).sum())
    n_pass = n_rows - n_fail
    if min(n_fail, n_pass) < policy.min_class_count:
        which = "fail (1)" if n_fail < n_pass else "pass (0)"
        raise DataGateError(
            f"label column {label_col!r}: class {which} has {min(n_fail, n_pass)} rows "
            f"< min_class_count={policy.min_class_count} (fail={n_fail}, pass={n_pass})"
        )

    feats = frame[feature_cols]
    numeric = feats.astype("float64")
    inf_counts = np.isinf(numeric.to_numpy()).sum(axis=0)
    if inf_counts.any():
        bad_inf = [f"{c!r} ({int(k)} rows)" for c, k in zip(feature_cols, inf_counts, strict=True) if k][:10]
        raise DataGateError(f"infinite values in features: {', '.join(bad_inf)}")

    missing_share = numeric.isna().mean()
    # Worst first; stable, so sensors missing alike keep their input order.
    too_missing = missing_share[missing_share > policy.max_missing_share].sort_values(
        ascending=False, kind="mergesort"
    )
    dropped_missing: dict[str, float] = {}
    if len(too_missing):
        if policy.missing_action == "fail":
            detail = ", ".join(f"{c!r} {s:.0%} missing" for c, s in too_missing.head(10).items())
            more = f" (+{len(too_missing) - 10} more)" if len(too_missing) > 10 else ""
            raise DataGateError(
                f"{len(too_missing)} feature(s) exceed max_missing_share="
                f"{policy.max_missing_share:.0%}: {detail}{more}"
            )
        dropped_missing = {str(c): round(float(s), 6) for c, s in too_missing.items()}

    candidates = [c for c in feature_cols if c not in dropped_missing]
    nunique = numeric[candidates].nunique(dropna=True)
    dropped_constant = [c for c in candidates if nunique[c] <= 1]
    kept = [c for c in candidates if c not in set(dropped_constant)]
    n_dropped = len(dropped_missing) + len(dropped_constant)
    if n_dropped > policy.max_dropped_share * len(feature_cols):
        dead = [c for c, s in dropped_missing.items() if s >= 1.0]
        raise DataGateError(
            f"{n_dropped} of {len(feature_cols)} sensors ({n_dropped / len(feature_cols):.0%}) would be dropped, "
            f"more than max_dropped_share={policy.max_dropped_share:.0%} of the RetrainPolicy: "
            f"{len(dead)} dead, {len(dropped_missing) - len(dead)} mostly missing, "
            f"{len(dropped_constant)} constant ({_names([*dropped_missing, *dropped_constant])})"
        )
    if not kept:
        raise DataGateError(
            f"no usable features left: {len(dropped_constant)} constant, {len(dropped_missing)} mostly missing"
        )
    return GateReport(
        n_rows=n_rows,
        n_fail=n_fail,
        n_pass=n_pass,
        fail_rate=n_fail / n_rows,
        label_col=label_col,
        n_sensors=len(feature_cols),
        features=kept,
        dropped_constant=dropped_constant,
        dropped_missing=dropped_missing,
        max_missing_share=float(missing_share[kept].max()),
        missing_limit=policy.max_missing_share,
    )


@dataclass(frozen=True)
class Split:
    """Train / validation / holdout, each strictly earlier in process time than the next."""

    train: pd.DataFrame
    validation: pd.DataFrame
    holdout: pd.DataFrame
    time_col: str
    train_end: Any  # last process time in train
    validation_end: Any  # last process time in validation

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "holdout": len(self.holdout)}


def _advance_past_ties(times: np.ndarray, cut: int) -> int:
    """Move a cut forward so wafers with the same timestamp never straddle it."""
    while 0 < cut < len(times) and times[cut] == times[cut - 1]:
        cut += 1
    return cut


def time_ordered_split(
    frame: pd.DataFrame, time_col: str, policy: RetrainPolicy, label_col: str | None = None
) -> Split:
    """Split by process time: oldest wafers train, then validation, newest are the holdout.

    Random splits would let a model learn from wafers processed *after* the ones it is
    scored on (chamber aging, PM resets), which flatters it exactly when drift happened.
    Wafers sharing a timestamp are kept on the same side of a boundary. With
    ``label_col``, each part must contain both classes (else the holdout AUC is undefined).
    """
    if time_col not in frame.columns:
        raise DataGateError(f"time column {time_col!r} not in the frame")
    n_null = int(frame[time_col].isna().sum())
    if n_null:
        raise DataGateError(f"time column {time_col!r} has {n_null} missing values")
    ordered = frame.sort_values(time_col, kind="mergesort")  # stable: keeps arrival order on ties
    times = ordered[time_col].to_numpy()
    n = len(ordered)
    n_hold = math.ceil(n * policy.holdout_share)
    n_val = math.ceil(n * policy.validation_share)
    val_start = _advance_past_ties(times, n - n_hold - n_val)
    hold_start = _advance_past_ties(times, max(n - n_hold, val_start + 1))
    train, val, hold = ordered.iloc[:val_start], ordered.iloc[val_start:hold_start], ordered.iloc[hold_start:]
    for name, part in (("train", train), ("validation", val), ("holdout", hold)):
        if part.empty:
            raise DataGateError(
                f"time split left {name} empty ({n} rows, {pd.Series(times).nunique()} distinct "
                f"{time_col!r} values)"
            )
        if label_col is not None:
            counts = part[label_col].value_counts()
            if len(counts) < 2:
                raise DataGateError(
                    f"time split: {name} part ({len(part)} rows) has only label "
                    f"{label_col!r}={counts.index[0]}"
                )
    # No wafer from the future may reach an earlier part.
    assert train[time_col].max() < val[time_col].min(), "train overlaps validation in time"
    assert val[time_col].max() < hold[time_col].min(), "validation overlaps holdout in time"
    return Split(
        train=train,
        validation=val,
        holdout=hold,
        time_col=time_col,
        train_end=train[time_col].max(),
        validation_end=val[time_col].max(),
    )


def data_hash(frame: pd.DataFrame) -> str:
    """sha256 of the training data's content, stable across processes and column order.

    Row order is part of the content (it is process order and decides the time folds);
    the index is not. Column names and dtypes are included so a renamed or re-typed
    sensor changes the hash.
    """
    h = hashlib.sha256()
    h.update(f"rows={len(frame)};".encode())
    for col in sorted(frame.columns, key=str):
        series = frame[col]
        h.update(f"{col!s}:{series.dtype};".encode())
        h.update(pd.util.hash_pandas_object(series, index=False).to_numpy().tobytes())
    return h.hexdigest()


def _threshold_for_recall(y_true: np.ndarray, y_score: np.ndarray, target: float) -> float:
    """Highest threshold whose recall on fails is at least ``target``."""
    fail_scores = np.sort(y_score[y_true == 1])[::-1]
    k = max(1, math.ceil(target * len(fail_scores)))
    return float(fail_scores[k - 1])


def holdout_metrics(y_true: Sequence[int] | np.ndarray, y_score: Sequence[float] | np.ndarray,
                    policy: RetrainPolicy) -> dict[str, float]:
    """ROC-AUC, PR-AUC and recall/precision at the policy's operating point (fail = 1), with their uncertainty.

    PR-AUC (average precision) is reported because with ~1 fail in 15 ROC-AUC alone
    hides how many good wafers an alarm would scrap per caught fail. Each metric
    comes with its (1 - ``gate_alpha``) interval (``<metric>_ci_low``/``_ci_high``):
    DeLong for ROC-AUC (its variance ``roc_auc_var`` is kept as the reference of
    later performance checks, and ``roc_auc_p_chance`` tests it against 0.5), Wilson
    for recall, precision and fail rate, a class-stratified bootstrap for PR-AUC.
    """
    y_true = np.asarray(y_true).astype(int)
    y_score = np.asarray(y_score, dtype=float)
    if y_true.shape != y_score.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_score has {y_score.shape}")
    n_fail = int(y_true.sum())
    if n_fail == 0 or n_fail == len(y_true):
        raise DataGateError(f"holdout has a single class ({n_fail} fails of {len(y_true)} rows)")
    if policy.threshold is not None:
        thr = float(policy.threshold)
    else:
        assert policy.target_recall is not None  # the policy's validator sets exactly one of the two
        thr = _threshold_for_recall(y_true, y_score, float(policy.target_recall))
    alarm = y_score >= thr
    tp = int((alarm & (y_true == 1)).sum())
    from fabloop.core.stats import bootstrap_ci, delong_auc, proportion_ci

    alpha = policy.gate_alpha
    auc = delong_auc(y_true, y_score)
    out = {
        "roc_auc": float(roc_auc_score(y_true, y_score)),
        "pr_auc": float(average_precision_score(y_true, y_score)),
        "recall_at_op": tp / n_fail,
        "precision_at_op": tp / int(alarm.sum()) if alarm.any() else 0.0,
        "threshold": thr,
        "fail_rate": n_fail / len(y_true),
        "n_rows": float(len(y_true)),
        "n_fail": float(n_fail),
        "roc_auc_var": auc.var,
        "roc_auc_p_chance": auc.p_above(0.5),
    }
    intervals = {
        "roc_auc": auc.ci(alpha),
        "pr_auc": bootstrap_ci(y_true, y_score, average_precision_score, alpha, draws=200, seed=policy.seed),
        "recall_at_op": proportion_ci(tp, n_fail, alpha),
        "precision_at_op": proportion_ci(tp, int(alarm.sum()), alpha),
        "fail_rate": proportion_ci(n_fail, len(y_true), alpha),
    }
    for name, (lo, hi) in intervals.items():
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = float(lo), float(hi)
    return out
