"""The backtest's event time: windows per scope in process order, labels as they arrived, cooldowns."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from fabloop.core.backtest import (
    LABEL,
    RAN,
    TESTED_AT,
    Cooldown,
    count,
    cut_windows,
    history_frame,
    run_backtest,
    visible_labels,
)
from fabloop.core.policies import DriftPolicy, RetrainPolicy
from fabloop.core.replay import ReplayColumns, replay_events
from fabloop.core.scopes import ModelSpec

T0 = datetime(2024, 3, 1, 6, 0, tzinfo=UTC)


def _table(n: int = 50, seed: int = 3) -> pd.DataFrame:
    """Two tools' wafers, rows shuffled (as two exports of interleaved partitions arrive), every 10th failing."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "timestamp": [(T0 + timedelta(minutes=7 * i)).isoformat() for i in range(n)],
        "wafer": [f"W{i:03d}" for i in range(n)],
        "tool": ["ETCH-01" if i % 3 else "ETCH-02" for i in range(n)],
        "s1": rng.normal(size=n),
        "s2": rng.normal(size=n),
        "label": ["fail" if i % 10 == 0 else "pass" for i in range(n)],
    })
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


COLS = ReplayColumns(tool="tool")


def _history(n: int = 50, delay: timedelta = timedelta(hours=1)) -> pd.DataFrame:
    return history_frame(replay_events(_table(n), COLS, test_delay=delay))


def test_history_is_in_event_time_with_labels_and_their_arrival() -> None:
    history = _history()
    assert history["ts"].is_monotonic_increasing
    assert list(history["wafer"]) == sorted(history["wafer"])  # wafer ids were numbered in process order
    assert (history[TESTED_AT] - history["ts"] == pd.Timedelta(hours=1)).all()
    assert history.loc[history["wafer"] == "W010", LABEL].item() == 1.0
    assert history.loc[history["wafer"] == "W011", LABEL].item() == 0.0


def test_windows_of_a_scope_follow_process_time_and_never_overlap() -> None:
    history = _history()
    windows = cut_windows(history, ModelSpec(window_wafers=6))
    by_model: dict[str, list[tuple[datetime, datetime, int]]] = {}
    for w in windows:
        rows = history.iloc[w.rows]
        assert set(rows["tool"]) == {w.scope["tool"]}
        assert rows["ts"].is_monotonic_increasing
        assert (w.ts_start, w.ts_end) == (rows["ts"].iloc[0], rows["ts"].iloc[-1])
        by_model.setdefault(w.model, []).append((w.ts_start, w.ts_end, len(w.rows)))
    assert set(by_model) == {"yield-ETCH-01", "yield-ETCH-02"}
    for spans in by_model.values():
        for (_, end, _), (start, _, _) in zip(spans, spans[1:], strict=False):
            assert end < start  # consecutive windows of a scope: disjoint in time
        assert [n for *_, n in spans[:-1]] == [6] * (len(spans) - 1)
    counts = history["tool"].value_counts()
    assert sum(len(w.rows) for w in windows) == counts.sum()
    assert [w.full for w in windows if w.model == "yield-ETCH-02"][-1] == (counts["ETCH-02"] % 6 == 0)
    # Decided in the order they close, whichever scope they belong to.
    assert [w.ts_end for w in windows] == sorted(w.ts_end for w in windows)


def test_a_step_filter_and_several_scope_fields() -> None:
    history = _history()
    history["chamber"] = np.where(np.arange(len(history)) % 2, "A", "B")
    windows = cut_windows(history, ModelSpec(scope_by=["tool", "chamber"], window_wafers=5))
    assert {w.model for w in windows} == {"yield-ETCH-01-A", "yield-ETCH-01-B", "yield-ETCH-02-A", "yield-ETCH-02-B"}
    assert cut_windows(history, ModelSpec(step="CMP", window_wafers=5)) == []


def test_a_window_sees_only_the_labels_that_had_arrived_when_it_closed() -> None:
    history = _history(delay=timedelta(minutes=30))
    window = cut_windows(history, ModelSpec(window_wafers=8))[0]
    current = history.iloc[window.rows]
    seen = visible_labels(current, window.ts_end)
    arrived = current[TESTED_AT] <= pd.Timestamp(window.ts_end)
    assert seen[arrived].notna().all() and seen[~arrived].isna().all()
    assert 0 < int(arrived.sum()) < len(current)  # the newest wafers of the window are not tested yet


def test_cooldown_counts_event_time_per_family() -> None:
    policy = DriftPolicy(cooldown_minutes=120)
    cool = Cooldown()
    assert cool.suppresses(policy, "drift", T0) is None
    cool.record("drift", T0, "refused")  # a refusal ran: it starts the cooldown
    assert "cooldown" in (cool.suppresses(policy, "performance", T0 + timedelta(minutes=119)) or "")
    assert cool.suppresses(policy, "drift", T0 + timedelta(minutes=120)) is None
    assert cool.suppresses(policy, "first_training", T0 + timedelta(minutes=1)) is None  # another family
    cool.record("first_training", T0, "refused")  # no challenger: the next window may try again
    assert cool.suppresses(policy, "first_training", T0 + timedelta(minutes=1)) is None
    cool.record("first_training", T0, "rejected")  # a challenger was trained
    assert cool.suppresses(policy, "first_training", T0 + timedelta(minutes=1)) is not None
    later = Cooldown()
    later.record("drift", T0, "suppressed")  # nothing ran
    assert later.suppresses(policy, "drift", T0 + timedelta(minutes=1)) is None


def test_refused_first_trainings_are_counted_and_retried_every_window() -> None:
    """A gate that refuses every set: each full window of each scope asks, and is refused."""
    history = _history(n=60)
    result = run_backtest(history, ModelSpec(window_wafers=10), DriftPolicy(min_window_rows=10, cooldown_minutes=1e6),
                          RetrainPolicy(n_trials=1))  # min_rows 200 > any scope's wafers
    full = [w for w in cut_windows(history, ModelSpec(window_wafers=10)) if w.full]
    assert [s.action for s in result.steps if s.trigger == "first_training"] == ["refused"] * len(full)
    assert all("min_rows" in s.detail for s in result.steps if s.action == "refused")
    c = result.counts
    assert (c.windows, c.first_trainings, c.retrains, c.refusals, c.promotions, c.alarms) == (
        len(result.steps), len(full), len(full), len(full), 0, 0)
    assert result.static_auc is None and result.adaptive_auc is None and result.scored_wafers == 0
    assert c == count(result.steps)
    assert c.retrains == sum(s.action in RAN for s in result.steps)

