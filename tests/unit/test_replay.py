"""Recorded tables → time-ordered events, bad rows reported by file line."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from fabloop.core.replay import BadRow, ReplayColumns, ReplayTableError, paced, read_table, replay_events
from fabloop.core.schemas import SensorReading, TestResult, parse_event

CSV = """\
time,wafer_id,tool,pass_fail,s1,s2,note
2024-03-01 10:00:00,W1,ETCH1,-1,1.5,2.0,a
2024-03-01 09:00:00,W2,ETCH2,1,1.0,,b
garbage,W3,ETCH1,-1,1,2,c

2024-03-01 11:00:00,,ETCH1,-1,1,2,d
2024-03-01 12:00:00,W5,ETCH1,7,1,2,e
2024-03-01 13:00:00,W6,ETCH1,,oops,inf,f
2024-03-01 14:00:00,W7,ETCH1,,3,inf,g
2024-03-31 02:30:00,W8,ETCH1,1,3,4,h
"""
# Berlin local time; 2024-03-31 02:30 does not exist (clocks jump 02:00 → 03:00).
COLS = ReplayColumns.secom(timestamp="time", wafer="wafer_id", tool="tool", label="pass_fail",
                           timestamp_format=None, timezone="Europe/Berlin")


def berlin(text: str) -> datetime:
    return pd.Timestamp(text, tz="Europe/Berlin").tz_convert("UTC").to_pydatetime()


@pytest.fixture
def csv_path(tmp_path: Path) -> Path:
    path = tmp_path / "recorded.csv"
    path.write_text(CSV)
    return path


def test_csv_rows_become_time_ordered_events(csv_path: Path) -> None:
    replay = replay_events(read_table(csv_path, COLS), COLS, test_delay=timedelta(minutes=90))
    events = list(replay)

    assert [(e.kind, e.wafer) for _, e in events] == [
        ("sensor", "W2"), ("sensor", "W1"), ("test", "W2"), ("test", "W1"), ("sensor", "W7")]
    times = [ts for ts, _ in events]
    assert times == sorted(times)
    assert all(ts == e.ts for ts, e in events)
    by_key = {(e.kind, e.wafer): e for _, e in events}
    assert by_key["sensor", "W2"].ts == berlin("2024-03-01 09:00")
    assert by_key["test", "W2"].ts == berlin("2024-03-01 10:30")  # test_delay after its sensor reading
    assert (by_key["test", "W2"].passed, by_key["test", "W1"].passed) == (False, True)  # SECOM: 1 fail, -1 pass
    assert by_key["sensor", "W2"].sensors == {"s1": 1.0, "s2": None}  # empty cell → None
    assert by_key["sensor", "W7"].sensors == {"s1": 3.0, "s2": None}  # inf → None (broken sensor)
    assert ("test", "W7") not in by_key  # no label → no test result
    assert (by_key["sensor", "W2"].tool, by_key["sensor", "W2"].chamber) == ("ETCH2", "REPLAY")
    assert len(replay) == len(events) == 5

    report = replay.report
    assert [(b.line_number, b.column) for b in report.bad_rows] == [
        (4, "time"), (5, "<row>"), (6, "wafer_id"), (7, "pass_fail"), (8, "s1"), (10, "time")]
    reasons = [b.reason for b in report.bad_rows]
    assert "unparseable timestamp 'garbage'" in reasons[0]
    assert reasons[1] == "blank line"
    assert reasons[2] == "missing wafer"
    assert "invalid label '7'" in reasons[3]
    assert "non-numeric sensor value 'oops'" in reasons[4]
    assert "nonexistent local time" in reasons[5] and "Europe/Berlin" in reasons[5]
    assert (report.rows, report.skipped_rows, report.sensor_events, report.test_events) == (9, 6, 3, 2)
    assert report.sensor_columns == ["s1", "s2"] and report.ignored_columns == ["note"]
    assert report.nonfinite_values == 1
    assert report.line_numbering.startswith("CSV file line")
    assert str(report.bad_rows[0]).startswith("line 4, column 'time'")


def test_events_validate_and_round_trip(csv_path: Path) -> None:
    for _, event in replay_events(read_table(csv_path, COLS), COLS):
        assert isinstance(event, SensorReading | TestResult)
        assert parse_event(event.to_json()) == event


def test_zero_delay_puts_the_sensor_reading_first(csv_path: Path) -> None:
    events = [e for _, e in replay_events(read_table(csv_path, COLS), COLS, test_delay=timedelta(0))]
    assert [(e.kind, e.wafer) for e in events][:4] == [
        ("sensor", "W2"), ("test", "W2"), ("sensor", "W1"), ("test", "W1")]
    with pytest.raises(ValueError, match="test_delay"):
        replay_events(read_table(csv_path, COLS), COLS, test_delay=timedelta(seconds=-1))


def test_event_ids_are_stable_for_the_same_content(csv_path: Path, tmp_path: Path) -> None:
    first = [e.event_id for _, e in replay_events(read_table(csv_path, COLS), COLS)]
    replay = replay_events(read_table(csv_path, COLS), COLS)
    assert [e.event_id for _, e in replay] == first == [e.event_id for _, e in replay]
    assert len(set(first)) == len(first)
    changed = tmp_path / "changed.csv"
    changed.write_text(CSV.replace("1.5,2.0", "1.6,2.0"))
    assert not set(first) & {e.event_id for _, e in replay_events(read_table(changed, COLS), COLS)}


def test_parquet_round_trip(csv_path: Path, tmp_path: Path) -> None:
    frame = read_table(csv_path, COLS)
    parquet = tmp_path / "recorded.parquet"
    frame.reset_index(drop=True).to_parquet(parquet)
    from_parquet = replay_events(read_table(parquet, COLS), COLS)
    from_csv = replay_events(frame, COLS)

    strip = lambda r: [(ts, e.model_dump(exclude={"event_id"})) for ts, e in r]  # noqa: E731
    assert strip(from_parquet) == strip(from_csv)
    assert from_parquet.report.line_numbering == "Parquet row index + 1"
    assert [b.line_number for b in from_parquet.report.bad_rows] == [3, 4, 5, 6, 7, 9]  # CSV line - 1


def test_typed_parquet_columns(tmp_path: Path) -> None:
    frame = pd.DataFrame({
        "ts": pd.date_range("2024-01-01", periods=3, freq="h", tz="America/New_York"),
        "wafer": [1.0, 2.0, 3.0],  # float ids as some exports write them
        "ok": [True, False, None],
        "rf_power": [100.0, np.nan, 102.0],
    })
    path = tmp_path / "typed.parquet"
    frame.to_parquet(path)
    cols = ReplayColumns(timestamp="ts", label="ok")
    events = [e for _, e in replay_events(read_table(path, cols), cols, test_delay=timedelta(minutes=5))]
    assert [(e.kind, e.wafer) for e in events] == [
        ("sensor", "1"), ("test", "1"), ("sensor", "2"), ("test", "2"), ("sensor", "3")]
    assert events[0].ts == datetime(2024, 1, 1, 5, tzinfo=UTC)  # aware times keep their offset
    assert [e.passed for e in events if e.kind == "test"] == [True, False]


@pytest.mark.parametrize(
    ("labels", "values", "expected"),
    [
        (None, ["pass", "FAIL", " Pass "], [True, False, True]),
        (None, ["true", "false", "True"], [True, False, True]),
        ({"-1": "pass", "1": "fail"}, ["-1.0", "1", "-1"], [True, False, True]),
        ({"G": True, "B": False}, ["g", "b", "G"], [True, False, True]),
    ],
)
def test_label_encodings(labels: dict | None, values: list[str], expected: list[bool]) -> None:
    frame = pd.DataFrame({"timestamp": ["2024-01-01T00:00:00Z", "2024-01-01T01:00:00Z", "2024-01-01T02:00:00Z"],
                          "wafer": ["a", "b", "c"], "label": values, "x": [1, 2, 3]})
    cols = ReplayColumns() if labels is None else ReplayColumns(labels=labels)
    replay = replay_events(frame, cols)
    assert [e.passed for _, e in replay if e.kind == "test"] == expected
    assert replay.report.bad_rows == [] and replay.report.line_numbering == "frame row position + 1"


def test_bad_label_mapping_is_refused() -> None:
    with pytest.raises(ValidationError, match="labels"):
        ReplayColumns(labels={"1": "maybe"})
    with pytest.raises(ValidationError, match="unknown timezone"):
        ReplayColumns(timezone="Mars/Olympus")


def test_missing_mapped_column_names_file_and_column(csv_path: Path, tmp_path: Path) -> None:
    cols = COLS.model_copy(update={"chamber": "chamber_id"})
    with pytest.raises(ReplayTableError) as err:
        read_table(csv_path, cols)
    assert err.value.column == "chamber_id" and str(csv_path) in str(err.value)
    assert "mapped as chamber" in str(err.value)

    parquet = tmp_path / "t.parquet"
    read_table(csv_path, COLS).to_parquet(parquet)
    with pytest.raises(ReplayTableError, match="'s9'.*mapped as sensor"):
        read_table(parquet, COLS.model_copy(update={"sensors": ["s1", "s9"]}))
    with pytest.raises(ReplayTableError, match="'wafer'"):
        replay_events(pd.DataFrame({"timestamp": [], "label": [], "x": []}), ReplayColumns())


def test_unreadable_tables_name_the_file(tmp_path: Path) -> None:
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("timestamp,wafer,label,x\n2024-01-01,a,pass,1\n2024-01-01,b,pass,1,9,9\n")
    with pytest.raises(ReplayTableError, match="ragged.csv.*line 3"):
        read_table(ragged, ReplayColumns())
    with pytest.raises(ReplayTableError, match="unsupported file type"):
        read_table(tmp_path / "table.xlsx", ReplayColumns())


def test_secom_shaped_frame_converts_quickly() -> None:
    rng = np.random.default_rng(7)
    rows, sensors = 1567, 590
    values = rng.normal(size=(rows, sensors))
    values[rng.random(values.shape) < 0.045] = np.nan  # SECOM is ~4.5 % missing
    frame = pd.DataFrame(values, columns=[f"f{i:03d}" for i in range(sensors)])
    frame.insert(0, "timestamp", pd.date_range("2008-07-19 11:55", periods=rows, freq="37min")
                 .strftime("%d/%m/%Y %H:%M:%S"))
    frame.insert(1, "wafer", [f"SECOM-{i:04d}" for i in range(rows)])
    frame["label"] = np.where(rng.random(rows) < 0.066, 1, -1)

    start = time.perf_counter()
    replay = replay_events(frame, ReplayColumns.secom())
    events = list(replay)
    seconds = time.perf_counter() - start

    assert len(events) == 2 * rows and replay.report.bad_rows == []
    assert len(replay.report.sensor_columns) == sensors
    first = events[0][1]
    assert isinstance(first, SensorReading) and len(first.sensors) == sensors
    assert sum(v is None for v in first.sensors.values()) == int(np.isnan(values[0]).sum())
    fails = sum(1 for _, e in events if e.kind == "test" and not e.passed)
    assert fails == int((frame["label"] == 1).sum())
    print(f"SECOM-shaped {rows}x{sensors}: {seconds:.2f} s for {len(events)} events")
    assert seconds < 15


# ------------------------------------------------------------------------- pacing


class FakeClock:
    """A clock whose sleep always oversleeps, to show the pacing does not drift."""

    def __init__(self, oversleep: float) -> None:
        self.now = 100.0
        self.oversleep = oversleep
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds + self.oversleep


def _timeline(n: int, step_s: float) -> list[tuple[datetime, int]]:
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    return [(t0 + timedelta(seconds=i * step_s), i) for i in range(n)]


def test_paced_keeps_absolute_schedule_without_drift() -> None:
    clock = FakeClock(oversleep=0.3)
    yielded_at = [clock.now for _ in paced(_timeline(5, 10), speed=10, clock=clock, sleep=clock.sleep)]
    # due at 100, 101, 102, 103, 104; each sleep overshoots by 0.3 but the next one shortens
    assert yielded_at == pytest.approx([100, 101.3, 102.3, 103.3, 104.3])
    assert clock.sleeps == pytest.approx([1.0, 0.7, 0.7, 0.7])


def test_paced_real_time() -> None:
    start = time.perf_counter()
    items = [i for _, i in paced(_timeline(11, 1.0), speed=200)]  # 10 s simulated → 50 ms
    elapsed = time.perf_counter() - start
    assert items == list(range(11))
    assert 0.05 <= elapsed < 1.0


@pytest.mark.parametrize("speed", [0, float("inf")])
def test_paced_unpaced_speeds_never_sleep(speed: float) -> None:
    clock = FakeClock(oversleep=0)
    assert [i for _, i in paced(_timeline(4, 3600), speed, clock=clock, sleep=clock.sleep)] == [0, 1, 2, 3]
    assert clock.sleeps == []


def test_paced_refuses_negative_speed() -> None:
    with pytest.raises(ValueError, match="speed"):
        list(paced(_timeline(2, 1), speed=-1))


def test_bad_row_is_a_plain_record() -> None:
    row = BadRow(line_number=3, column="x", reason="non-numeric sensor value 'a'")
    assert str(row) == "line 3, column 'x': non-numeric sensor value 'a'"
