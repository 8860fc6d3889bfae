"""``fabloop replay`` and ``fabloop publish-stdf`` through the real CLI into a real broker."""

from __future__ import annotations

import gzip
import struct
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fabloop.adapters.kafka import partition_key, read_topic
from fabloop.core.schemas import SENSOR_TOPIC, TEST_TOPIC, SensorReading, TestResult, parse_event
from tests.helpers.stack import Broker, fabloop

pytestmark = pytest.mark.integration

STDF_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "stdf"


# ---------------------------------------------------------------------- helpers


def read_events(conf: dict[str, str], topic: str) -> list[tuple[int, int, int, SensorReading | TestResult]]:
    """Every event on the topic as (partition, offset, create-time ms, event), sorted by (partition, offset).

    Reads until 2 s of silence rather than to the high watermark: the embedded broker
    (Tansu) reports high watermarks below the last offset + 1 after batched produces.
    The command has flushed before it exits, so everything is already on the broker.
    """
    out = []
    for msg in read_topic(conf, topic, idle_timeout=2):
        event = parse_event(msg.value())
        # A reading keyed by its scope (its tool's readings stay in order), a result by its wafer.
        assert msg.key() == partition_key(event)
        out.append((msg.partition(), msg.offset(), msg.timestamp()[1], event))
    return sorted(out, key=lambda m: (m[0], m[1]))


def assert_time_ordered_per_partition(messages: list[tuple[int, int, int, SensorReading | TestResult]]) -> None:
    by_partition: dict[int, list[datetime]] = {}
    for partition, _offset, _ms, event in messages:
        by_partition.setdefault(partition, []).append(event.ts)
    for partition, times in by_partition.items():
        assert times == sorted(times), f"partition {partition} is not in time order"


# ----------------------------------------------------------------------- replay

HEADER = "time,wafer_id,tool,verdict,rf_power,pressure,operator"
T0 = datetime(2024, 3, 1, 6, 0, tzinfo=UTC)


def small_table() -> tuple[list[str], dict[str, dict[str, object]], dict[int, str]]:
    """Rows (out of time order), the good wafers by id, and the bad rows by file line → column."""
    good = {}
    for i in range(10):  # W00..W09, one hour apart; W07 untested (empty label)
        wafer = f"W{i:02d}"
        good[wafer] = {"ts": T0 + timedelta(hours=i), "tool": f"ETCH-0{1 + i % 2}",
                       "label": "" if i == 7 else ("1" if i in (2, 5) else "0"),
                       "rf_power": 500.0 + i, "pressure": round(2.5 + i / 10, 2)}
    rows = [
        f"{g['ts']:%Y-%m-%d %H:%M:%S},{w},{g['tool']},{g['label']},{g['rf_power']},{g['pressure']},ann"
        for w, g in good.items()
    ]
    rows.reverse()  # the file is newest first: the replay must reorder it
    bad = [
        ("yesterday noon,B01,ETCH-01,0,500,2.5,ann", "time"),
        ("2024-03-01 08:30:00,,ETCH-01,0,500,2.5,ann", "wafer_id"),
        ("2024-03-01 08:40:00,B03,ETCH-01,0,five hundred,2.5,ann", "rf_power"),
        ("2024-03-01 08:50:00,B04,ETCH-02,maybe,500,2.5,ann", "verdict"),
        (",,,,,,", "<row>"),
    ]
    bad_lines: dict[int, str] = {}
    for n, (row, _column) in enumerate(bad):
        at = 2 + 2 * n  # interleave: bad rows sit between good ones
        rows.insert(at, row)
    for line, row in enumerate(rows, start=2):  # the header is line 1
        for bad_row, column in bad:
            if row == bad_row:
                bad_lines[line] = column
    return rows, good, bad_lines


def test_replay_streams_a_table_in_time_order_and_reports_bad_rows(broker: Broker, tmp_path: Path) -> None:
    rows, good, bad_lines = small_table()
    table = tmp_path / "etch_history.csv"
    table.write_text("\n".join([HEADER, *rows]) + "\n")
    speed = 36_000.0  # one simulated hour per 0.1 s of wall time
    delay_min = 30

    t0 = time.monotonic()
    out = fabloop(
        "replay", str(table), "--timestamp-col", "time", "--wafer-col", "wafer_id", "--tool-col", "tool",
        "--label-col", "verdict", "--label-pass", "0", "--label-fail", "1", "--default", "fab=FAB7",
        "--speed", str(speed), "--test-delay-minutes", str(delay_min), "--bootstrap-servers", broker.bootstrap,
    ).stdout
    wall = time.monotonic() - t0

    # Bad rows: every one reported with its file line and column, none silently dropped.
    for line, column in bad_lines.items():
        assert f"line {line}, column '{column}'" in out, out
    assert "unparseable timestamp 'yesterday noon'" in out
    assert "non-numeric sensor value 'five hundred'" in out
    assert "invalid label 'maybe'" in out
    assert f"{len(bad_lines)} of {len(rows)} rows skipped" in out
    tested = [w for w, g in good.items() if g["label"]]
    assert f"published {len(good)} sensor events to {SENSOR_TOPIC} and {len(tested)} test events" in out
    assert f"skipped {len(bad_lines)} bad row(s)" in out
    assert "ignored non-sensor columns: operator" in out

    sensors = read_events(broker.conf, SENSOR_TOPIC)
    tests = read_events(broker.conf, TEST_TOPIC)
    assert sorted(e.wafer for *_, e in sensors) == sorted(good)
    assert sorted(e.wafer for *_, e in tests) == sorted(tested)
    for *_, e in sensors:
        g = good[e.wafer]
        assert isinstance(e, SensorReading)
        assert (e.ts, e.tool, e.fab) == (g["ts"], g["tool"], "FAB7")
        assert e.sensors == {"rf_power": g["rf_power"], "pressure": g["pressure"]}
    for *_, e in tests:
        assert isinstance(e, TestResult)
        assert e.passed is (good[e.wafer]["label"] == "0")  # --label-pass 0 / --label-fail 1
        assert e.ts == good[e.wafer]["ts"] + timedelta(minutes=delay_min)

    # Order: each partition in time order; and across both topics the broker's create
    # times (the moment each event was produced) put the events in simulated-time order.
    assert_time_ordered_per_partition(sensors)
    assert_time_ordered_per_partition(tests)
    produced = sorted(sensors + tests, key=lambda m: m[2])
    assert [m[3].ts for m in produced] == sorted(m[3].ts for m in produced)
    sensor_ms = {e.wafer: ms for _, _, ms, e in sensors}
    assert all(ms > sensor_ms[e.wafer] for _, _, ms, e in tests)  # a wafer's test after its reading

    # Pacing: 9.5 simulated hours (first reading → last test) at 36,000× is 0.95 s of wall time.
    span_s = (max(m[2] for m in produced) - min(m[2] for m in produced)) / 1000
    assert 0.95 * 0.9 <= span_s <= 0.95 + 2.0, span_s
    print(f"small replay: {len(sensors)} + {len(tests)} events, produced over {span_s:.2f} s, command {wall:.1f} s")


def test_replay_missing_column_or_file_is_a_clear_error(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("time,wafer,label,s1\n2024-03-01 10:00:00,W1,pass,1.0\n")
    # No broker and no stack: the table is refused before anything connects.
    proc = fabloop("replay", str(table), "--timestamp-col", "time", "--chamber-col", "chamber",
                   "--bootstrap-servers", "127.0.0.1:1", check=False)
    assert proc.returncode == 2, proc.stdout
    assert f"{table}: column 'chamber': mapped as chamber but not in the table" in proc.stdout
    assert "'time', 'wafer', 'label', 's1'" in proc.stdout  # the columns that are there

    proc = fabloop("replay", str(table), "--sensors", "s1,s9", "--timestamp-col", "time", check=False)
    assert proc.returncode == 2 and "column 's9': mapped as sensor" in proc.stdout

    missing = tmp_path / "nowhere.csv"
    proc = fabloop("replay", str(missing), check=False)
    assert proc.returncode == 2 and f"{missing}: cannot read table" in proc.stdout


def test_replay_dry_run_validates_without_publishing(tmp_path: Path) -> None:
    table = tmp_path / "bins.csv"
    table.write_text("timestamp,wafer,bin,s1\n"
                     "2024-03-01 10:00:00,W1,1,1.0\n2024-03-01 11:00:00,W2,7,2.0\n"
                     "2024-03-01 12:00:00,W3,2,x\n2024-03-01 13:00:00,W4,,3.0\n")
    # An unreachable broker: the dry run must succeed without ever connecting.
    proc = fabloop("replay", str(table), "--label-col", "bin", "--label-pass", "1", "--dry-run",
                   "--bootstrap-servers", "127.0.0.1:1", check=False)
    assert proc.returncode == 0, proc.stdout
    assert "labels in 'bin': pass = 1; fail = every other value (2, 7)" in proc.stdout
    assert "line 4, column 's1': non-numeric sensor value 'x'" in proc.stdout
    assert "would publish 3 sensor and 2 test events" in proc.stdout and "nothing was published" in proc.stdout

    # The same command for real, against that unreachable broker: a clear failure, not a hang.
    proc = fabloop("replay", str(table), "--label-col", "bin", "--label-pass", "1",
                   "--bootstrap-servers", "127.0.0.1:1", check=False, timeout=60)
    assert proc.returncode == 1 and "cannot reach Kafka at 127.0.0.1:1" in proc.stdout


def secom_shaped_csv(path: Path, rows: int = 1567, sensors: int = 590, seed: int = 3) -> pd.DataFrame:
    """SECOM's shape: Time (dd/mm/YYYY HH:MM:SS) over three months, 590 unnamed sensors, ~4.5 %
    missing, Pass/Fail -1/1 with ~6.6 % fails, and no wafer id."""
    rng = np.random.default_rng(seed)
    start = datetime(2008, 7, 19, 11, 55)
    seconds = np.sort(rng.uniform(0, 91 * 86400, rows)).astype(int)
    swap = rng.choice(rows - 1, 40, replace=False)  # a few neighbours logged out of order
    seconds[swap], seconds[swap + 1] = seconds[swap + 1], seconds[swap].copy()
    values = rng.normal(100, 15, (rows, sensors)).round(4)
    values[rng.random(values.shape) < 0.045] = np.nan
    frame = pd.DataFrame(values, columns=[str(i) for i in range(sensors)])
    frame.insert(0, "Time", [(start + timedelta(seconds=int(s))).strftime("%d/%m/%Y %H:%M:%S") for s in seconds])
    frame["Pass/Fail"] = np.where(rng.random(rows) < 0.066, 1, -1)
    frame.to_csv(path, index=False)
    return frame


def test_replay_secom_shaped_table(broker: Broker, tmp_path: Path) -> None:
    table = tmp_path / "secom.csv"
    t0 = time.monotonic()
    frame = secom_shaped_csv(table)
    generated = time.monotonic() - t0

    t0 = time.monotonic()
    out = fabloop("replay", str(table), "--secom", "--timestamp-col", "Time", "--label-col", "Pass/Fail",
                  "--wafer-col", "@line", "--bootstrap-servers", broker.bootstrap).stdout
    replay_s = time.monotonic() - t0
    assert "1567 rows, 590 sensor columns" in out
    assert "no bad rows (1567 rows read)" in out
    assert "labels in 'Pass/Fail': pass = -1; fail = 1" in out
    assert f"published 1567 sensor events to {SENSOR_TOPIC} and 1567 test events" in out

    t0 = time.monotonic()
    sensors = read_events(broker.conf, SENSOR_TOPIC)
    tests = read_events(broker.conf, TEST_TOPIC)
    read_s = time.monotonic() - t0
    assert len(sensors) == len(tests) == 1567
    assert len({e.wafer for *_, e in sensors}) == 1567  # @line: one wafer id per file line
    assert all(len(e.sensors) == 590 for *_, e in sensors)
    missing = sum(v is None for *_, e in sensors for v in e.sensors.values())
    assert missing == int(frame.iloc[:, 1:591].isna().sum().sum())
    fails = int((frame["Pass/Fail"] == 1).sum())
    assert sum(not e.passed for *_, e in tests) == fails
    by_line = {int(e.wafer.rsplit("-L", 1)[1]): e for *_, e in tests}
    assert all(by_line[i + 2].passed is (label == -1) for i, label in enumerate(frame["Pass/Fail"]))
    times = sorted(e.ts for *_, e in sensors)
    assert timedelta(days=80) < times[-1] - times[0] <= timedelta(days=91)
    assert_time_ordered_per_partition(sensors)
    assert_time_ordered_per_partition(tests)
    print(f"SECOM-shaped 1567x590: generate {generated:.1f} s, fabloop replay {replay_s:.1f} s, "
          f"read back {read_s:.1f} s")


# ------------------------------------------------------------------ publish-stdf


def stdf_records(data: bytes) -> tuple[Counter[str], list[int]]:
    """An independent STDF record walk (big-endian, as the FAR of these files says): counts and offsets."""
    names = {(5, 10): "PIR", (5, 20): "PRR", (2, 10): "WIR", (2, 20): "WRR", (15, 10): "PTR"}
    counts: Counter[str] = Counter()
    offsets = []
    at = 0
    while at + 4 <= len(data):
        rec_len, typ, sub = struct.unpack_from(">HBB", data, at)
        offsets.append(at)
        counts[names.get((typ, sub), "other")] += 1
        at += 4 + rec_len
    return counts, offsets


def real_stdf(name: str) -> Path:
    path = STDF_DIR / name
    if not path.exists():
        pytest.skip(f"real STDF files not found at {STDF_DIR} (see ../shared/data/README.md)")
    return path


def test_publish_stdf_real_files_match_their_prr_and_wrr_records(broker: Broker) -> None:
    lot2, lot3 = real_stdf("lot2.stdf.gz"), real_stdf("lot3.stdf.gz")
    records = {p: stdf_records(gzip.decompress(p.read_bytes()))[0] for p in (lot2, lot3)}
    assert [(records[p]["PRR"], records[p]["WRR"]) for p in (lot2, lot3)] == [(1569, 1), (1619, 1)]  # README

    t0 = time.monotonic()
    out = fabloop("publish-stdf", str(lot2), str(lot3), "--bootstrap-servers", broker.bootstrap).stdout
    seconds = time.monotonic() - t0
    for p, _wafer in ((lot2, "GAL-LOT-02"), (lot3, "GAL-LOT-03")):
        r = records[p]
        assert (f"{p}: lot GAL-LOT, program mobile-05@16: {r['WRR']} wafer(s), {r['PRR']} parts, "
                f"{r['PTR']} parametrics") in out
        assert (f"published {r['PRR'] + r['WRR']} events to {TEST_TOPIC} "
                f"({r['WRR']} per wafer, {r['PRR']} per part)") in out
    assert "published 3190 events from 2 of 2 file(s)" in out

    events = [e for *_, e in read_events(broker.conf, TEST_TOPIC)]
    for p, wafer in ((lot2, "GAL-LOT-02"), (lot3, "GAL-LOT-03")):
        mine = [e for e in events if e.wafer == wafer]
        parts = [e for e in mine if e.part_id is not None]
        assert len(parts) == records[p]["PRR"] and len(mine) - len(parts) == records[p]["WRR"]
        assert sum(len(e.parametrics) for e in parts) == records[p]["PTR"]
        assert all(e.hard_bin is not None for e in parts)
        units = Counter(m.units for e in parts for m in e.parametrics)
        assert units["v"] > 0 and units["a"] > 0  # volts and amps carried from the PTRs
        assert all(m.name and m.test_num is not None for e in parts for m in e.parametrics)
    assert len(events) == 3190
    assert len({e.event_id for e in events}) == 3190
    print(f"publish-stdf lot2 + lot3: {len(events)} events in {seconds:.1f} s")


def test_publish_stdf_truncated_file_publishes_nothing_of_it(broker: Broker, tmp_path: Path) -> None:
    lot2, lot3 = real_stdf("lot2.stdf.gz"), real_stdf("lot3.stdf.gz")
    data = gzip.decompress(lot2.read_bytes())
    cut = 3_000_001
    truncated = tmp_path / "lot2_truncated.stdf"
    truncated.write_bytes(data[:cut])
    _, offsets = stdf_records(data)
    cut_record = max(o for o in offsets if o <= cut)  # the record the cut goes through

    # The damaged file first: anything it let through would be on the topic before lot3.
    proc = fabloop("publish-stdf", str(truncated), str(lot3), "--bootstrap-servers", broker.bootstrap, check=False)
    assert proc.returncode == 1, proc.stdout
    assert f"error: {truncated}: byte offset {cut_record}: truncated" in proc.stdout
    assert "nothing from this file was published" in proc.stdout
    assert f"published 1620 events from 1 of 2 file(s); failed: {truncated}" in proc.stdout

    events = [e for *_, e in read_events(broker.conf, TEST_TOPIC)]
    assert len(events) == 1620
    assert {e.wafer for e in events} == {"GAL-LOT-03"}


def test_publish_stdf_dry_run_and_errors_without_a_broker(tmp_path: Path) -> None:
    garbage = tmp_path / "not.stdf"
    garbage.write_bytes(b"hello, this is not STDF")
    proc = fabloop("publish-stdf", str(garbage), str(tmp_path / "missing.stdf"), "--dry-run", check=False)
    assert proc.returncode == 1
    assert f"{garbage}: byte offset 0: not an STDF file" in proc.stdout
    assert f"{tmp_path / 'missing.stdf'}: byte offset 0: cannot read file" in proc.stdout

    proc = fabloop("publish-stdf", str(garbage), "--min-yield-pct", "120", check=False)
    assert proc.returncode == 2 and "min-yield-pct" in proc.stdout + proc.stderr
