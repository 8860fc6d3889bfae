"""A replayed history through the real broker and the real ingestor is cut into windows in event time.

Issue 13: a replayed history's consecutive windows of one model overlapped in time
(07-19 → 08-16, then 08-07 → 08-22): readings keyed by wafer spread over every
partition, ingest consumed the partitions interleaved, and windows were cut in
arrival order. The same SECOM-shaped history goes in twice, as two tools: once with
the real ``fabloop replay`` (readings keyed by their scope), once keyed by wafer as
before. Neither tool's windows overlap; the scope-keyed one has every reading in a
window, and the wafer-keyed one loses nothing either (its late readings are stored,
outside every window, and counted).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from fabloop.adapters.ingestor import Ingestor, IngestSettings
from fabloop.adapters.kafka import make_producer, topic_for
from fabloop.adapters.store import SensorReadingRow, TestResultRow, WindowRow, WindowWaferRow, make_engine
from fabloop.core.schemas import SensorReading, TestResult
from fabloop.core.scopes import ModelCatalogValue, ModelSpec
from tests.helpers.ingest import query
from tests.helpers.secom_table import LABEL_COL, TIME_COL, SecomShape, secom_table
from tests.helpers.stack import Broker, fabloop

pytestmark = pytest.mark.integration

ROWS, WINDOW = 400, 40
SHAPE = SecomShape(rows=ROWS, sensors=10, constant_sensors=1, sparse_sensors=1, informative=(2, 4, 6),
                   shift_from=ROWS)


def _by_wafer(frame: Any, tool: str) -> list[SensorReading | TestResult]:
    """The table's events as the replay builds them, for publishing keyed by wafer (the old way)."""
    events: list[SensorReading | TestResult] = []
    sensors = [c for c in frame.columns if c not in (TIME_COL, LABEL_COL)]
    for i, row in enumerate(frame.itertuples(index=False)):
        ts = datetime.strptime(getattr(row, TIME_COL), "%d/%m/%Y %H:%M:%S").replace(tzinfo=UTC)
        values = {k: (None if v != v else v) for k, v in zip(sensors, row[1:-1], strict=True)}  # NaN: missing
        events.append(SensorReading(ts=ts, fab="FAB", tool=tool, chamber="C", recipe="R", step="S", lot="L",
                                    wafer=f"{tool}-{i}", sensors=values))
        events.append(TestResult(ts=ts, lot="L", wafer=f"{tool}-{i}", program="P", passed=row[-1] == -1))
    return events


def _publish_keyed_by_wafer(broker: Broker, events: list[SensorReading | TestResult]) -> None:
    producer = make_producer(broker.conf)
    for ev in events:
        producer.produce(topic_for(ev), ev.to_json(), key=ev.wafer.encode())
    assert producer.flush(60) == 0


def _ingest(broker: Broker, db: str, expected: int) -> int:
    """The ingestor in small batches until every event is consumed; returns its count of late readings."""
    catalog = ModelCatalogValue(models=[ModelSpec(window_wafers=WINDOW, window_minutes=1e6)])
    stop = threading.Event()

    async def run() -> int:
        engine = make_engine(db, pooled=True)
        ingestor = Ingestor(broker.conf, engine, catalog, group=f"et-{uuid.uuid4().hex[:6]}",
                            settings=IngestSettings(batch_size=40))

        def on_batch(_stats: Any) -> None:
            if ingestor.totals.consumed >= expected:
                stop.set()

        ingestor.on_batch = on_batch
        try:
            totals = await ingestor.run(stop, max_idle_s=15)
        finally:
            await engine.dispose()
        assert totals.consumed == expected, totals.line()
        return totals.late

    return asyncio.run(run())


def _windows(db: str, model: str) -> list[Any]:
    """The model's windows in event order, asserting that none overlaps the next."""
    rows = sorted(query(db, select(WindowRow.ts_start, WindowRow.ts_end, WindowRow.status, WindowRow.wafer_count)
                        .where(WindowRow.model == model)))
    for before, after in zip(rows, rows[1:], strict=False):
        assert before.ts_end <= after.ts_start, f"{model}: windows overlap in event time: {before} then {after}"
    return rows


def test_windows_of_a_replayed_history_do_not_overlap_in_time_within_a_scope(broker: Broker, tmp_path: Path) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    keyed, by_wafer = f"K{uuid.uuid4().hex[:5].upper()}", f"W{uuid.uuid4().hex[:5].upper()}"
    table = tmp_path / "history.csv"
    secom_table(SHAPE).to_csv(table, index=False)
    out = fabloop("replay", str(table), "--secom", "--timestamp-col", TIME_COL, "--label-col", LABEL_COL,
                  "--wafer-col", "@line", "--default", f"tool={keyed}", "--bootstrap-servers", broker.bootstrap,
                  env={"FABLOOP_HOME": str(tmp_path / "home")}).stdout
    assert f"published {ROWS} sensor events" in out, out
    _publish_keyed_by_wafer(broker, _by_wafer(secom_table(replace(SHAPE, seed=8)), by_wafer))

    late = _ingest(broker, db, expected=4 * ROWS)
    count = func.count()
    assert query(db, select(count).select_from(SensorReadingRow))[0][0] == 2 * ROWS
    assert query(db, select(count).select_from(TestResultRow))[0][0] == 2 * ROWS
    partitions = dict(query(db, select(SensorReadingRow.tool, func.count(SensorReadingRow.partition.distinct()))
                            .group_by(SensorReadingRow.tool)))
    assert partitions == {keyed: 1, by_wafer: 3}, "a scope's readings share one partition; wafers spread over all"

    def members(tool: str) -> int:
        return query(db, select(count).select_from(WindowWaferRow).join(
            SensorReadingRow, SensorReadingRow.event_id == WindowWaferRow.event_id).where(
            SensorReadingRow.tool == tool))[0][0]

    # Keyed by scope: every reading in order, in exactly one window; full windows of
    # consecutive wafers, none late.
    windows = _windows(db, f"yield-{keyed}")
    assert [w.wafer_count for w in windows] == [WINDOW] * (ROWS // WINDOW)
    assert members(keyed) == ROWS
    # Keyed by wafer: consumed interleaved, yet no window reaches back over a closed
    # one; what came too late for its window is stored in none, and counted.
    _windows(db, f"yield-{by_wafer}")
    assert members(by_wafer) + late == ROWS
    print(f"\nwafer-keyed replay: {late} of {ROWS} readings late (stored, in no window)")
