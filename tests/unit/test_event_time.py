"""Event time: windows of a scope never overlap, and cooldowns count the fab's time as well as the clock's.

On a real SQLite event store (migrated, as the ingestor and the drift checks use it).
Kafka messages are stand-ins carrying topic, partition, offset and value: the window
bookkeeping reads nothing else from them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from fabloop.adapters.kafka import partition_key
from fabloop.adapters.store import (
    IngestStore,
    LateReading,
    RetrainTriggerRow,
    SensorReadingRow,
    WindowRow,
    WindowWaferRow,
    decide_retrain,
    finish_trigger,
    make_engine,
    migrate,
    sessionmaker,
)
from fabloop.core.schemas import SensorReading, TestResult
from fabloop.core.scopes import ModelCatalogValue, ModelSpec

T0 = datetime(2008, 7, 19, 12, 0, tzinfo=UTC)
MODEL = "yield-ETCH-01"
COOLDOWN = timedelta(minutes=60)


@dataclass(frozen=True)
class Msg:
    """What the store reads off a consumed message."""

    ev: SensorReading
    part: int
    off: int

    def topic(self) -> str:
        return "fab.sensor"

    def partition(self) -> int:
        return self.part

    def offset(self) -> int:
        return self.off

    def value(self) -> bytes:
        return self.ev.to_json()


def reading(minute: int) -> SensorReading:
    return SensorReading(event_id=f"r{minute}", ts=T0 + timedelta(minutes=minute), fab="F1", tool="ETCH-01",
                         chamber="A", recipe="R", step="ETCH", lot="L1", wafer=f"W{minute:04d}",
                         sensors={"s1": float(minute)})


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    migrate(url)
    return url


def _ingest(db: str, batches: list[list[int]]) -> list[LateReading]:
    """Store and window each batch (readings at these minutes) as one ingest transaction; returns the late ones."""
    catalog = ModelCatalogValue(models=[ModelSpec(window_wafers=10, window_minutes=1e6)])
    late: list[LateReading] = []

    async def run() -> None:
        engine = make_engine(db)
        store = IngestStore(engine, catalog)
        offset = 0
        try:
            for minutes in batches:
                msgs = []
                for m in minutes:
                    ev = reading(m)
                    msgs.append((Msg(ev, m % 3, offset), ev))
                    offset += 1
                async with store.batch() as batch:
                    new = await batch.store_sensor_readings(msgs, datetime.now(UTC))
                    await batch.add_to_windows([(msg, ev) for msg, ev in msgs if ev.event_id in new])
                late.extend(batch.late)
        finally:
            await engine.dispose()

    asyncio.run(run())
    return late


def _rows(db: str, stmt: Any) -> list[Any]:
    async def run() -> list[Any]:
        engine = make_engine(db)
        try:
            async with engine.connect() as conn:
                return list((await conn.execute(stmt)).all())
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _assert_disjoint_in_event_time(db: str) -> list[Any]:
    windows = sorted(_rows(db, select(WindowRow.ts_start, WindowRow.ts_end, WindowRow.status, WindowRow.id)))
    for before, after in zip(windows, windows[1:], strict=False):
        assert before.ts_end <= after.ts_start, f"windows {before.id} and {after.id} overlap: {windows}"
    return windows


def test_readings_older_than_the_last_closed_window_are_stored_late_and_in_no_window(db: str) -> None:
    # Minutes 10–29 first (two full windows), then a partition that lagged behind: 0–9
    # are older than the closed windows, 30–33 are new. The second batch's 90 is newer
    # than anything else.
    late = _ingest(db, [list(range(10, 30)), [*range(0, 10), *range(30, 34), 90]])
    assert sorted(r.ts for r in late) == [T0 + timedelta(minutes=m) for m in range(10)]
    assert {r.closed_until for r in late} == {T0 + timedelta(minutes=29)}
    # The open window holds 30–33 and 90; the next batch closes it with 34–38 and ends
    # it at 90, so the rest of that batch (39–45) is older than the window just closed.
    late = _ingest(db, [list(range(34, 46))])
    assert sorted(r.ts for r in late) == [T0 + timedelta(minutes=m) for m in range(39, 46)]
    assert {r.closed_until for r in late} == {T0 + timedelta(minutes=90)}

    windows = _assert_disjoint_in_event_time(db)
    assert [w.status for w in windows] == ["closed"] * 3
    # Nothing lost: every reading is stored; those in no window are exactly the late ones.
    stored = {r[0] for r in _rows(db, select(SensorReadingRow.event_id))}
    members = [r[0] for r in _rows(db, select(WindowWaferRow.event_id))]
    assert len(stored) == 20 + 15 + 12 and len(members) == len(set(members)) == 30
    assert stored - set(members) == {reading(m).event_id for m in [*range(10), *range(39, 46)]}


def test_in_order_readings_are_never_late_and_the_windows_tile_event_time(db: str) -> None:
    late = _ingest(db, [list(range(0, 7)), list(range(7, 25)), list(range(25, 31))])
    assert late == []
    windows = _assert_disjoint_in_event_time(db)
    assert [w.status for w in windows] == ["closed", "closed", "closed", "open"]
    assert len(_rows(db, select(WindowWaferRow.event_id))) == 31


def test_readings_are_keyed_by_their_scope_and_results_by_their_wafer() -> None:
    a, b = reading(1), reading(2)
    assert partition_key(a) == partition_key(b) == b"F1/ETCH-01"
    other = SensorReading(**{**a.model_dump(), "event_id": "x", "tool": "ETCH-02"})
    assert partition_key(other) != partition_key(a)
    result = TestResult(ts=T0, lot="L1", wafer="W0001", program="P", passed=True)
    assert partition_key(result) == b"W0001"


# --------------------------------------------------------------------------- cooldown in event time


async def _window(engine: Any, ts_end: datetime) -> int:
    async with sessionmaker(engine)() as session, session.begin():
        row = WindowRow(model=MODEL, scope={"tool": "ETCH-01"}, status="closed", opened_at=ts_end,
                        closed_at=ts_end, ts_start=ts_end - timedelta(hours=1), ts_end=ts_end, wafer_count=10,
                        offsets={})
        session.add(row)
        await session.flush()
        return row.id


async def _decide(engine: Any, now: datetime, event_end: datetime | None, kind: str = "drift") -> tuple[str, str, int]:
    window_id = await _window(engine, event_end) if event_end is not None else None

    async def no_run(_flow_run_id: str) -> None:
        raise AssertionError("no trigger of these tests has a flow run")

    d = await decide_retrain(engine, MODEL, "share 0.7", COOLDOWN, window_id=window_id, now=now, kind=kind,
                             run_status=no_run)
    return d.action, d.reason, d.trigger_id


def _episode(db: str, steps: list[tuple[str, Any]]) -> list[tuple[str, str, int]]:
    """Run ``("decide", (now, event_end[, kind]))`` and ``("finish", (now, outcome))`` steps in order."""

    async def run() -> list[tuple[str, str, int]]:
        engine = make_engine(db)
        out: list[tuple[str, str, int]] = []
        try:
            for op, args in steps:
                if op == "decide":
                    out.append(await _decide(engine, *args))
                else:  # the newest started trigger ends
                    at, outcome = args
                    newest = [t for action, _, t in out if action == "started"][-1]
                    assert await finish_trigger(engine, newest, outcome, at)
        finally:
            await engine.dispose()
        return out

    return asyncio.run(run())


NOW = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def test_a_replayed_month_is_not_one_cooldown_event_time_governs_a_catch_up(db: str) -> None:
    started, near, far = _episode(db, [
        ("decide", (NOW, T0)),
        ("finish", (NOW + timedelta(minutes=2), "challenger")),
        # Minutes later on the clock, the next replayed windows: 30 min and 11 days later in event time.
        ("decide", (NOW + timedelta(minutes=3), T0 + timedelta(minutes=30))),
        ("decide", (NOW + timedelta(minutes=4), T0 + timedelta(days=11))),
    ])
    assert started[0] == "started" and far[0] == "started", far
    assert near[0] == "suppressed", near
    assert f"cooldown after retraining (trigger {started[2]}) until 2026-03-01 09:02:00 UTC" in near[1]
    assert "event time 2008-07-19 13:00:00 UTC" in near[1] and "30 min after the retraining's window" in near[1]


def test_live_the_cooldown_holds_only_while_both_clocks_are_short_of_it(db: str) -> None:
    _, clock_out, both_short, fab_out = _episode(db, [
        ("decide", (NOW, T0)),
        ("finish", (NOW + timedelta(minutes=10), "rejected")),
        # 80 min on the clock, 20 min of wafers (a quiet tool): the clock has run out.
        ("decide", (NOW + timedelta(minutes=90), T0 + timedelta(minutes=20))),
        ("finish", (NOW + timedelta(minutes=100), "challenger")),
        # 30 min on both clocks: the cooldown holds.
        ("decide", (NOW + timedelta(minutes=130), T0 + timedelta(minutes=50))),
        # 35 min on the clock, 61 min of wafers (a catch-up): the fab's time has run out.
        ("decide", (NOW + timedelta(minutes=135), T0 + timedelta(minutes=81))),
    ])
    assert clock_out[0] == "started", clock_out
    assert both_short[0] == "suppressed" and "whichever comes first" in both_short[1], both_short
    assert "30 min after the retraining's window" in both_short[1]
    assert fab_out[0] == "started", fab_out


def test_a_trigger_without_a_window_is_paced_by_wall_time_alone(db: str) -> None:
    first, manual, later = _episode(db, [
        ("decide", (NOW, T0)),
        ("finish", (NOW + timedelta(minutes=1), "challenger")),
        ("decide", (NOW + timedelta(minutes=5), None)),
        ("decide", (NOW + timedelta(minutes=62), None)),
    ])
    assert manual[0] == "suppressed" and "wall time; no event time to compare" in manual[1], manual
    assert later[0] == "started"


def test_in_flight_suppression_is_wall_time_whatever_the_windows_say(db: str) -> None:
    first, second = _episode(db, [
        ("decide", (NOW, T0)),
        ("decide", (NOW + timedelta(minutes=1), T0 + timedelta(days=30))),
    ])
    assert second[0] == "suppressed" and second[1].startswith(f"retraining already in flight (trigger {first[2]}")


@pytest.mark.parametrize(("outcome", "paced"), [("refused", True), ("challenger", True), ("rejected", False),
                                                ("failed", False)])
def test_a_refused_first_training_paces_the_next_first_training(db: str, outcome: str, paced: bool) -> None:
    first, retry = _episode(db, [
        ("decide", (NOW, T0, "first_training")),
        ("finish", (NOW + timedelta(minutes=1), outcome)),
        ("decide", (NOW + timedelta(minutes=5), T0 + timedelta(minutes=20), "first_training")),
    ])
    assert first[0] == "started"
    assert retry[0] == ("suppressed" if paced else "started"), retry
    if paced:
        assert f"cooldown after retraining (trigger {first[2]})" in retry[1]


def test_a_first_training_ends_no_drift_episode(db: str) -> None:
    _, breach = _episode(db, [
        ("decide", (NOW, T0, "first_training")),
        ("finish", (NOW + timedelta(minutes=1), "refused")),
        ("decide", (NOW + timedelta(minutes=5), T0 + timedelta(minutes=20), "drift")),
    ])
    assert breach[0] == "started", breach
    kinds = [r[0] for r in _rows(db, select(RetrainTriggerRow.kind).order_by(RetrainTriggerRow.id))]
    assert kinds == ["first_training", "drift"]


def test_first_trainings_are_paced_in_wall_time_while_the_first_challenger_waits_for_approval(db: str) -> None:
    # A fast stream: the scope's next windows are 15 h and 30 h of wafers later, minutes later on the clock.
    first, next_window, after_the_hour = _episode(db, [
        ("decide", (NOW, T0, "first_training")),
        ("finish", (NOW + timedelta(minutes=2), "challenger")),
        ("decide", (NOW + timedelta(minutes=4), T0 + timedelta(hours=15), "first_training")),
        ("decide", (NOW + timedelta(minutes=63), T0 + timedelta(hours=30), "first_training")),
    ])
    assert next_window[0] == "suppressed", next_window
    assert f"cooldown after retraining (trigger {first[2]})" in next_window[1]
    assert "a first training waits for the decision on the last one" in next_window[1]
    assert after_the_hour[0] == "started", after_the_hour
