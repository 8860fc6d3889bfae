"""Reading the event store back as frames: a window's wafers, a scope's training set.

Labels meet features here, at read time: a wafer's sensor reading is joined with
its wafer-level sort result by wafer id, whichever arrived first; a wafer without
a result yet is simply unlabeled (``failed`` is NaN). Label convention: 1 = fail.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Select, and_, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from fabloop.adapters.store._schema import SensorReadingRow, TestResultRow, WindowRow, WindowWaferRow
from fabloop.core.scopes import ModelSpec

if TYPE_CHECKING:  # pandas is imported where a frame is built: ingest opens the store without it
    import pandas as pd

META = ["event_id", "ts", "wafer", "lot", "tool", "chamber", "recipe"]
LABEL = "failed"


def _latest_wafer_results() -> Any:
    """The newest wafer-level sort result per wafer (a retest replaces the first test)."""
    ranked = select(
        TestResultRow.wafer,
        TestResultRow.passed,
        TestResultRow.ts.label("tested_at"),
        func.row_number().over(partition_by=TestResultRow.wafer, order_by=TestResultRow.ts.desc()).label("rn"),
    ).where(TestResultRow.part_id.is_(None)).subquery()
    return select(ranked.c.wafer, ranked.c.passed, ranked.c.tested_at).where(ranked.c.rn == 1).subquery()


def _labelled_select(*where: Any) -> Select[Any]:
    results = _latest_wafer_results()
    return (
        select(
            SensorReadingRow.event_id, SensorReadingRow.ts, SensorReadingRow.wafer, SensorReadingRow.lot,
            SensorReadingRow.tool, SensorReadingRow.chamber, SensorReadingRow.recipe, SensorReadingRow.payload,
            results.c.passed, results.c.tested_at,
        )
        .outerjoin(results, results.c.wafer == SensorReadingRow.wafer)
        .where(*where)
        .order_by(SensorReadingRow.ts, SensorReadingRow.event_id)
    )


def _frame(rows: list[Any]) -> pd.DataFrame:
    import orjson
    import pandas as pd

    if not rows:
        return pd.DataFrame(columns=[*META, LABEL, "tested_at"])
    meta = pd.DataFrame([r[:7] for r in rows], columns=META)
    sensors = pd.DataFrame.from_records([orjson.loads(r[7])["sensors"] for r in rows]).astype("float64")
    labels = pd.Series([None if r[8] is None else (0.0 if r[8] else 1.0) for r in rows], dtype="float64", name=LABEL)
    tested = pd.Series([r[9] for r in rows], name="tested_at")
    return pd.concat([meta, sensors, labels, tested], axis=1)


def sensor_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c not in (*META, LABEL, "tested_at")]


def scope_where(spec: ModelSpec, scope: dict[str, str]) -> list[Any]:
    where = [getattr(SensorReadingRow, field) == value for field, value in scope.items()]
    if spec.step is not None:
        where.append(SensorReadingRow.step == spec.step)
    return where


async def window_frame(engine: AsyncEngine, window_id: int) -> pd.DataFrame:
    """A window's wafers with their sensors and whatever labels have arrived."""
    members = select(WindowWaferRow.event_id).where(WindowWaferRow.window_id == window_id)
    async with engine.connect() as conn:
        rows = (await conn.execute(_labelled_select(SensorReadingRow.event_id.in_(members)))).all()
    return _frame(list(rows))


async def load_window(engine: AsyncEngine, window_id: int) -> WindowRow:
    async with engine.connect() as conn:
        row = (await conn.execute(select(WindowRow).where(WindowRow.id == window_id))).first()
    if row is None:
        raise LookupError(f"window {window_id} not found in the event store")
    return WindowRow(**{c.key: getattr(row, c.key) for c in WindowRow.__table__.columns})


async def training_frame(
    engine: AsyncEngine, spec: ModelSpec, scope: dict[str, str], until: datetime | None = None
) -> pd.DataFrame:
    """Every labelled wafer of a scope up to ``until``, ordered by process time."""
    where = [*scope_where(spec, scope)]
    if until is not None:
        where.append(SensorReadingRow.ts <= until)
    async with engine.connect() as conn:
        rows = (await conn.execute(_labelled_select(and_(*where)))).all()
    frame = _frame(list(rows))
    return frame[frame[LABEL].notna()].reset_index(drop=True)


async def window_offsets(engine: AsyncEngine, window_ids: list[int]) -> dict[str, Any]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(WindowRow.id, WindowRow.offsets).where(WindowRow.id.in_(window_ids)))).all()
    return {str(i): offsets for i, offsets in rows}


async def latest_scope(engine: AsyncEngine, model: str) -> dict[str, str] | None:
    """The scope of the model's newest window (None: nothing ingested for it yet)."""
    newest = select(WindowRow.scope).where(WindowRow.model == model).order_by(WindowRow.id.desc()).limit(1)
    async with engine.connect() as conn:
        row = (await conn.execute(newest)).first()
    return None if row is None else dict(row[0])
