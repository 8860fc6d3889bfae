"""What the loop would have done on a recorded history: its decisions replayed in event time.

A fab switches automatic retraining on after it has seen, on its own history, how
often the loop would have alarmed, retrained and been refused, and whether the
models it would have promoted beat the one it has. This module replays that
history without the stack: no orchestrator, registry or broker, but the same
decision functions the flows call (``check_drift``, ``performance_drift``,
``judge_window``, the data gate, the tuner, the challenger gate, the policy's
cooldown).

Event time throughout. A scope's wafers are ordered by process timestamp and cut
into consecutive windows of ``window_wafers`` (the last one may be short: the live
loop closes it on time), so windows of a scope never overlap. A window closes at
its last wafer's timestamp; its labelled wafers are those whose test result had
arrived by then (``tested_at <= window end``), which is all the live check could
have seen. Cooldowns count event time since the retraining, which is taken to
finish when it starts. Approvals are simulated (``approve="gate"``: every
challenger that passes the gate is promoted; ``"never"``: none is).

Each window is also scored, *before* any retraining it asks for, by the scope's
current champion (adaptive) and by its first champion (static), on every wafer of
the window that was eventually tested (hindsight labels: this is the evaluation,
not the decision).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict
from sklearn.metrics import roc_auc_score

from fabloop.core.calibration import DriftCalibration, calibrate_drift
from fabloop.core.drift import PerformanceDriftResult, check_drift, performance_drift
from fabloop.core.policies import DriftPolicy, RetrainPolicy
from fabloop.core.schemas import SensorReading, TestResult
from fabloop.core.scopes import ModelSpec
from fabloop.core.stats import paired_delong
from fabloop.core.training import DataGateError, gate_training_set, holdout_metrics, time_ordered_split
from fabloop.core.tuning import FinalModel, time_folds, tune
from fabloop.core.validation import GateVerdict, judge_challenger
from fabloop.core.verdict import TriggerKind, WindowVerdict, judge_window

LABEL = "failed"  # 1 = fail, 0 = pass, NaN = never tested (the event store's convention)
TESTED_AT = "tested_at"
META = ("ts", "wafer", "lot", "fab", "tool", "chamber", "recipe", "step")

Approve = Literal["gate", "never"]
Action = Literal["none", "waiting", "suppressed", "refused", "rejected", "not_approved", "promoted"]
RAN = ("refused", "rejected", "not_approved", "promoted")  # actions of a retraining that ran


# ----------------------------------------------------------------------------- history


def history_frame(events: Iterable[tuple[datetime, SensorReading | TestResult]]) -> pd.DataFrame:
    """One row per sensor reading in event-time order, with its wafer's label and when that label arrived.

    Labels join readings by wafer id, the newest wafer-level result winning (a
    retest replaces the first test), as the event store joins them.
    """
    meta: list[tuple[object, ...]] = []
    sensors: list[dict[str, float | None]] = []
    results: dict[str, tuple[datetime, bool]] = {}
    for _ts, event in events:
        if isinstance(event, SensorReading):
            meta.append(tuple(getattr(event, f) for f in META))
            sensors.append(event.sensors)
        elif event.part_id is None:
            seen = results.get(event.wafer)
            if seen is None or event.ts >= seen[0]:
                results[event.wafer] = (event.ts, event.passed)
    left = pd.DataFrame.from_records(meta, columns=list(META))
    right = pd.DataFrame.from_records(sensors).astype("float64") if sensors else pd.DataFrame()
    found = [results.get(w) for w in left["wafer"]]
    left[LABEL] = pd.Series([np.nan if r is None else (0.0 if r[1] else 1.0) for r in found], dtype="float64")
    left[TESTED_AT] = pd.Series([pd.NaT if r is None else r[0] for r in found], dtype="datetime64[ns, UTC]")
    left["ts"] = pd.to_datetime(left["ts"], utc=True)
    frame = pd.concat([left, right], axis=1)
    return frame.sort_values("ts", kind="mergesort").reset_index(drop=True)


def sensor_columns(frame: pd.DataFrame) -> list[str]:
    return [str(c) for c in frame.columns if c not in (*META, LABEL, TESTED_AT)]


# ----------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class Window:
    """Consecutive wafers of one scope in process-time order; it closes at ``ts_end``."""

    model: str
    scope: dict[str, str]
    number: int  # 1-based, per model
    rows: np.ndarray  # positions in the history frame
    ts_start: datetime
    ts_end: datetime
    full: bool  # False: the history ended before the window had window_wafers wafers


def cut_windows(frame: pd.DataFrame, spec: ModelSpec) -> list[Window]:
    """Every scope's windows of ``spec.window_wafers`` wafers, in the order they close (event time).

    ``frame`` must be in process-time order (as :func:`history_frame` returns it);
    wafers with the same timestamp keep their order, so a window boundary never
    puts a later wafer before an earlier one.
    """
    rows = frame if spec.step is None else frame[frame["step"] == spec.step]
    windows: list[Window] = []
    for key, group in rows.groupby(list(spec.scope_by), sort=True):
        values = key if isinstance(key, tuple) else (key,)
        scope: dict[str, str] = {str(f): str(v) for f, v in zip(spec.scope_by, values, strict=True)}
        model = spec.model_name(scope)
        positions = frame.index.get_indexer(group.index)
        ts = group["ts"].to_numpy()
        for number, start in enumerate(range(0, len(positions), spec.window_wafers), start=1):
            stop = min(start + spec.window_wafers, len(positions))
            windows.append(Window(
                model=model, scope=scope, number=number, rows=positions[start:stop],
                ts_start=pd.Timestamp(ts[start]).to_pydatetime(), ts_end=pd.Timestamp(ts[stop - 1]).to_pydatetime(),
                full=stop - start == spec.window_wafers,
            ))
    windows.sort(key=lambda w: (w.ts_end, w.model, w.number))
    return windows


def visible_labels(frame: pd.DataFrame, at: datetime) -> pd.Series:
    """The label column as a check closing at ``at`` saw it: NaN where the result had not arrived."""
    arrived = frame[TESTED_AT].notna() & (frame[TESTED_AT] <= pd.Timestamp(at))
    return frame[LABEL].where(arrived)


# ----------------------------------------------------------------------------- cooldown


@dataclass
class Cooldown:
    """The live loop's cooldown rule (``decide_retrain``) in event time.

    Per family: a first training holds back further first trainings only once it
    produced a challenger; a breach retraining that ran (refused by the data gate
    included) holds back the next breach retraining for ``cooldown_minutes``.
    """

    last_first_training: datetime | None = None
    last_breach: datetime | None = None

    def suppresses(self, policy: DriftPolicy, kind: TriggerKind, at: datetime) -> str | None:
        last = self.last_first_training if kind == "first_training" else self.last_breach
        if not policy.in_cooldown(last, at):
            return None
        assert last is not None  # in_cooldown is False without a last retraining
        return (f"cooldown after the retraining at {last:%Y-%m-%d %H:%M} ({policy.cooldown_minutes:g} min of "
                f"event time)")

    def record(self, kind: TriggerKind, at: datetime, action: Action) -> None:
        if kind == "first_training":
            if action in ("rejected", "not_approved", "promoted"):  # a challenger was trained
                self.last_first_training = at
        elif action in RAN:
            self.last_breach = at


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Champion:
    """A promoted model and the figures the live loop keeps for it in MLflow."""

    version: int
    model: FinalModel
    reference: pd.DataFrame  # its training set's sensors: the drift reference of its scope
    holdout: dict[str, float]
    calibration_mean_score: float
    calibration_fail_rate: float
    cv_roc_auc: float  # of the model family it registered
    # Its drift calibrations by window size: computed once per champion, as the live
    # check caches them on the champion's MLflow run.
    calibrations: dict[int, DriftCalibration] = field(default_factory=dict, compare=False)

    def calibration(self, features: list[str], window_rows: int, policy: DriftPolicy) -> DriftCalibration:
        found = self.calibrations.get(window_rows)
        if found is None:
            found = calibrate_drift(self.reference[features], policy, window_rows, features=features)
            self.calibrations[window_rows] = found
        return found

    def score(self, frame: pd.DataFrame) -> np.ndarray | None:
        """Fail probabilities, or None when the frame lacks a sensor the model needs."""
        if any(f not in frame.columns for f in self.model.feature_names):
            return None
        return self.model.predict_score(frame[self.model.feature_names])


@dataclass(frozen=True)
class Trained:
    """A retraining's challenger and the gate's verdict on it."""

    challenger: Champion
    verdict: GateVerdict
    rows: int


def gate_verdict(challenger: Champion, challenger_scores: np.ndarray, champion: Champion | None,
                 holdout: pd.DataFrame, policy: RetrainPolicy) -> GateVerdict:
    """The challenger gate as the retrain flow applies it: both models on the same holdout, paired.

    The one place that knows ``judge_challenger``'s inputs (flows/retrain.py and
    tasks/retraining.py ``train_challenger``).
    """
    y_hold = holdout[LABEL].astype(int).to_numpy()
    champion_scores = None if champion is None else champion.score(holdout)
    champion_metrics = paired = None
    if champion_scores is not None:
        champion_metrics = holdout_metrics(y_hold, champion_scores, policy)
        paired = paired_delong(y_hold, challenger_scores, champion_scores)
    return judge_challenger(challenger.holdout, champion_metrics, policy, paired=paired,
                            challenger_cv=challenger.cv_roc_auc,
                            champion_cv=None if champion is None else champion.cv_roc_auc)


def train(frame: pd.DataFrame, sensors: list[str], policy: RetrainPolicy, champion: Champion | None,
          version: int) -> Trained:
    """Gate, split, tune and fit as the retrain flow does, and judge the challenger against the champion.

    Raises :class:`DataGateError` when the data gate refuses the set.
    """
    gate = gate_training_set(frame, LABEL, sensors, policy)
    split = time_ordered_split(frame, "ts", policy, label_col=LABEL)
    time_folds(split.train[LABEL].astype(int).to_numpy(), policy.n_folds, policy.min_train_share)
    feats = gate.features
    search = tune(split.train[feats], split.train[LABEL].astype(int), policy)
    final = search.fit_final(split.train[feats], split.train[LABEL].astype(int),
                             split.validation[feats], split.validation[LABEL].astype(int))
    scores = final.predict_score(split.holdout[feats])
    unseen = pd.concat([split.validation, split.holdout])
    challenger = Champion(
        version=version, model=final, reference=split.train[feats + gate.dropped_constant],
        holdout=holdout_metrics(split.holdout[LABEL].astype(int), scores, policy),
        calibration_mean_score=float(final.predict_score(unseen[feats]).mean()),
        calibration_fail_rate=float(unseen[LABEL].mean()),
        cv_roc_auc=search.baseline_cv_auc if search.winner == "baseline" else search.lgbm_cv_auc,
    )
    return Trained(challenger, gate_verdict(challenger, scores, champion, split.holdout, policy), len(frame))


def judge(model: str, current: pd.DataFrame, labels: pd.Series, sensors: list[str], policy: DriftPolicy,
          champion: Champion | None) -> WindowVerdict:
    """The drift check's verdict on a window (flows/drift_check.py ``_judge``, without the report)."""
    if champion is None:
        return judge_window(model, len(current), policy, None)
    features = [c for c in sensors if c in champion.reference.columns]
    calibration = champion.calibration(features, len(current), policy) if policy.alarm_rule == "calibrated" else None
    data = check_drift(champion.reference[features], current[features], policy, features=features,
                       calibration=calibration)
    return judge_window(model, len(current), policy, str(champion.version), data,
                        performance(current, labels, policy, champion))


def performance(current: pd.DataFrame, labels: pd.Series, policy: DriftPolicy,
                champion: Champion) -> PerformanceDriftResult | None:
    """The champion on the window's labelled wafers vs its holdout (tasks/checks.py ``model_performance``)."""
    seen = labels.notna().to_numpy()
    if int(seen.sum()) < policy.min_labelled_wafers:
        return None
    scores = champion.score(current[seen])
    if scores is None:
        return None
    cal_fail, ref = champion.calibration_fail_rate, champion.holdout
    return performance_drift(labels[seen].to_numpy(), scores, ref["roc_auc"], cal_fail, policy,
                             score_bias=champion.calibration_mean_score - cal_fail,
                             reference_var=ref.get("roc_auc_var"), reference_n_fail=int(ref["n_fail"]),
                             reference_n_pass=int(ref["n_rows"] - ref["n_fail"]))


# ----------------------------------------------------------------------------- report


class Score(BaseModel):
    """A model on a window's eventually-tested wafers."""

    model_config = ConfigDict(frozen=True)

    version: int
    roc_auc: float | None  # None: one class only
    recall: float | None  # share of fails at or above the model's holdout threshold; None: no fails


class Step(BaseModel):
    """One window of the timeline: what the check said and what the loop did."""

    model_config = ConfigDict(frozen=True)

    model: str
    window: int
    ts_start: datetime
    ts_end: datetime
    wafers: int
    labelled: int  # labels that had arrived when the window closed
    tested: int  # wafers of the window that were tested at all (the evaluation's)
    fails: int  # of those, failing
    status: str
    breach: bool
    trigger: TriggerKind | None
    reason: str
    action: Action
    detail: str
    champion: int | None  # the champion's version while the window was judged
    adaptive: Score | None
    static: Score | None


class Counts(BaseModel):
    windows: int
    alarms: int  # breaches of a scope that had a champion (data or performance)
    first_trainings: int  # retrainings asked for by a scope without a champion
    retrains: int  # retrainings that ran: refused + rejected + not approved + promoted
    refusals: int
    rejections: int
    not_approved: int
    promotions: int
    suppressed: int


class BacktestResult(BaseModel):
    steps: list[Step]
    counts: Counts
    static_auc: float | None
    adaptive_auc: float | None
    static_recall: float | None
    adaptive_recall: float | None
    scored_wafers: int

    def summary(self) -> dict[str, object]:
        """The one-line result: the counts, and both models' ROC-AUC and fail recall at their operating points.

        The scores are pooled over every eventually-tested wafer of every window a
        scope judged after its first champion (each window scored before any
        retraining it asked for), not averaged per window: a window holds a dozen
        fails, too few for its own AUC to mean much.
        """
        rounded = {k: None if v is None else round(v, 4) for k, v in (
            ("static_auc", self.static_auc), ("adaptive_auc", self.adaptive_auc),
            ("static_recall", self.static_recall), ("adaptive_recall", self.adaptive_recall))}
        return {**self.counts.model_dump(), **rounded, "scored_wafers": self.scored_wafers}


def count(steps: list[Step]) -> Counts:
    def n(action: str) -> int:
        return sum(s.action == action for s in steps)

    return Counts(
        windows=len(steps),
        alarms=sum(s.breach and s.trigger != "first_training" for s in steps),
        first_trainings=sum(s.trigger == "first_training" for s in steps),
        retrains=sum(s.action in RAN for s in steps),
        refusals=n("refused"), rejections=n("rejected"), not_approved=n("not_approved"), promotions=n("promoted"),
        suppressed=n("suppressed"),
    )


def _score(model: Champion, current: pd.DataFrame, truth: np.ndarray) -> tuple[Score, np.ndarray | None]:
    scores = model.score(current)
    if scores is None:
        return Score(version=model.version, roc_auc=None, recall=None), None
    fails = truth == 1
    auc = float(roc_auc_score(truth, scores)) if 0 < fails.sum() < len(truth) else None
    recall = float((scores[fails] >= model.holdout["threshold"]).mean()) if fails.any() else None
    return Score(version=model.version, roc_auc=auc, recall=recall), scores


def _pooled(truth: list[np.ndarray], scores: list[np.ndarray], thresholds: list[float]) -> tuple[
        float | None, float | None]:
    if not truth:
        return None, None
    y, s = np.concatenate(truth), np.concatenate(scores)
    hit = np.concatenate([sc >= t for sc, t in zip(scores, thresholds, strict=True)])
    auc = float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else None
    recall = float(hit[y == 1].mean()) if y.sum() else None
    return auc, recall


# ----------------------------------------------------------------------------- the replay


@dataclass
class _ScopeState:
    champion: Champion | None = None
    first: Champion | None = None
    versions: int = 0
    cooldown: Cooldown = field(default_factory=Cooldown)


def run_backtest(
    frame: pd.DataFrame,
    spec: ModelSpec,
    drift_policy: DriftPolicy,
    retrain_policy: RetrainPolicy,
    *,
    approve: Approve = "gate",
    train_windows: int | None = None,
    on_step: Callable[[Step], None] | None = None,
) -> BacktestResult:
    """Replay ``frame`` (see :func:`history_frame`) window by window, in the order the windows close.

    ``train_windows``: a retraining trains on the labelled wafers of the scope's
    last ``train_windows`` windows (the current one included); None trains on every
    labelled wafer of the scope so far, as the live loop's training set does.
    ``on_step`` is called with each :class:`Step` as it is decided (progress output).
    """
    sensors = sensor_columns(frame)
    states: dict[str, _ScopeState] = {}
    seen_rows: dict[str, list[np.ndarray]] = {}
    steps: list[Step] = []
    pooled: dict[str, tuple[list[np.ndarray], list[np.ndarray], list[float]]] = {
        "adaptive": ([], [], []), "static": ([], [], [])}
    for window in cut_windows(frame, spec):
        state = states.setdefault(window.model, _ScopeState())
        history = seen_rows.setdefault(window.model, [])
        history.append(window.rows)
        policy = drift_policy.for_model(window.model)
        current = frame.iloc[window.rows].reset_index(drop=True)
        labels = visible_labels(current, window.ts_end)
        tested = current[LABEL].notna().to_numpy()
        truth = current.loc[tested, LABEL].astype(int).to_numpy()

        adaptive = static = None
        if state.champion is not None and state.first is not None and tested.any():
            for name, model in (("adaptive", state.champion), ("static", state.first)):
                result, scores = _score(model, current[tested], truth)
                if scores is not None:
                    pooled[name][0].append(truth)
                    pooled[name][1].append(scores)
                    pooled[name][2].append(model.holdout["threshold"])
                adaptive, static = (result, static) if name == "adaptive" else (adaptive, result)

        verdict = judge(window.model, current, labels, sensors, policy, state.champion)
        before = None if state.champion is None else state.champion.version
        action, detail = _act(window, verdict, state, policy, retrain_policy, frame, history, sensors, approve,
                              train_windows)
        step = Step(
            model=window.model, window=window.number, ts_start=window.ts_start, ts_end=window.ts_end,
            wafers=len(current), labelled=int(labels.notna().sum()), tested=int(tested.sum()),
            fails=int(truth.sum()), status=verdict.status, breach=verdict.breach, trigger=verdict.trigger_kind,
            reason=verdict.reason, action=action, detail=detail,
            champion=before, adaptive=adaptive, static=static,
        )
        steps.append(step)
        if on_step is not None:
            on_step(step)
    static_auc, static_recall = _pooled(*pooled["static"])
    adaptive_auc, adaptive_recall = _pooled(*pooled["adaptive"])
    return BacktestResult(
        steps=steps, counts=count(steps), static_auc=static_auc, adaptive_auc=adaptive_auc,
        static_recall=static_recall, adaptive_recall=adaptive_recall,
        scored_wafers=sum(len(t) for t in pooled["adaptive"][0]),
    )


def _act(
    window: Window, verdict: WindowVerdict, state: _ScopeState, policy: DriftPolicy, retrain_policy: RetrainPolicy,
    frame: pd.DataFrame, history: list[np.ndarray], sensors: list[str], approve: Approve, train_windows: int | None,
) -> tuple[Action, str]:
    """What the loop does after the verdict: nothing, wait, hold back, or retrain (and maybe promote)."""
    if not verdict.breach:
        return ("waiting" if verdict.status == "window_too_small" and state.champion is None else "none"), ""
    kind: TriggerKind = verdict.trigger_kind or "drift"
    held = state.cooldown.suppresses(policy, kind, window.ts_end)
    if held:
        return "suppressed", held
    rows = np.concatenate(history if train_windows is None else history[-train_windows:])
    scope = frame.iloc[np.sort(rows)].reset_index(drop=True)
    scope[LABEL] = visible_labels(scope, window.ts_end)
    labelled = scope[scope[LABEL].notna()].reset_index(drop=True)
    action: Action
    try:
        trained = train(labelled, sensors, retrain_policy, state.champion, state.versions + 1)
    except DataGateError as exc:
        action, detail = "refused", f"data gate: {exc}"
    else:
        state.versions += 1
        version = trained.challenger.version
        detail = f"v{version} on {trained.rows} labelled wafers: {trained.verdict.summary()}"
        if not trained.verdict.passed:
            action = "rejected"
        elif approve == "never":
            action = "not_approved"
        else:
            action = "promoted"
            state.champion = trained.challenger
            state.first = state.first or trained.challenger
    state.cooldown.record(kind, window.ts_end, action)
    return action, detail
