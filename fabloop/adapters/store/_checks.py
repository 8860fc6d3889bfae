"""Drift checks: one verdict per closed window, with each sensor's statistic."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from fabloop.adapters.store._engine import sessionmaker
from fabloop.adapters.store._schema import DriftCheckRow, FeatureDriftRow

if TYPE_CHECKING:  # the drift module brings pandas: a store opened by ingest does not need it
    from fabloop.core.drift import FeatureDrift


async def already_checked(engine: AsyncEngine, window_id: int) -> int | None:
    """The id of the window's drift check, if it has one: window events arrive at least once."""
    async with engine.connect() as conn:
        row = (await conn.execute(select(DriftCheckRow.id).where(DriftCheckRow.window_id == window_id))).first()
    return row[0] if row else None


async def record_check(engine: AsyncEngine, check: DriftCheckRow, features: Iterable[FeatureDrift] = ()) -> int:
    """Store a drift check and its per-sensor statistics in one transaction; returns the check id."""
    async with sessionmaker(engine)() as session, session.begin():
        session.add(check)
        await session.flush()
        session.add_all(
            FeatureDriftRow(check_id=check.id, feature=f.feature, stattest=f.stattest or "", score=f.score,
                            threshold=f.threshold, drifted=f.drifted, status=f.status)
            for f in features
        )
        return check.id
