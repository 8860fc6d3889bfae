"""Once per episode: decide whether a breach may start a retraining, atomically.

Fifty drift checks can breach at the same moment; exactly one of them may start a
retraining of a model, and the others are recorded as suppressed with the reason.
The decision is one transaction that first takes a lock (SQLite: the write lock
taken by BEGIN IMMEDIATE; PostgreSQL: an advisory lock per model), so concurrent
checks serialise on it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from fabloop.adapters.store._engine import sessionmaker
from fabloop.adapters.store._schema import RetrainTriggerRow, utcnow


@dataclass(frozen=True)
class TriggerDecision:
    action: str  # "started" | "suppressed"
    reason: str
    trigger_id: int

    @property
    def started(self) -> bool:
        return self.action == "started"


async def decide_retrain(
    engine: AsyncEngine,
    model: str,
    reason: str,
    cooldown: timedelta,
    window_id: int | None = None,
    check_id: int | None = None,
    in_flight_timeout: timedelta = timedelta(hours=6),
    now: datetime | None = None,
    kind: str = "drift",
) -> TriggerDecision:
    """Record a trigger as ``started`` unless a retraining is in flight or cooling down.

    One retraining per model is in flight at a time, whatever started it. The
    cooldown follows each retraining, within its family: a scope's first training
    (no champion yet) ends no drift episode, so it does not hold back the first
    breach after it, but it does hold back further first trainings.
    """
    now = now or utcnow()
    async with sessionmaker(engine)() as session, session.begin():
        if session.bind.dialect.name == "postgresql":
            await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": zlib.crc32(model.encode())})
        started = select(RetrainTriggerRow).where(
            RetrainTriggerRow.model == model, RetrainTriggerRow.action == "started"
        )
        newest = started.order_by(RetrainTriggerRow.at.desc()).limit(1)
        last = (await session.execute(newest)).scalar_one_or_none()
        # Cooldowns run per family: first trainings pace first trainings, and breach
        # retrainings pace breach retrainings.
        family = (
            # A first training that produced no challenger (too few labels yet) must
            # not hold back the next window's attempt, which has more data.
            (RetrainTriggerRow.kind == "first_training") & (RetrainTriggerRow.outcome == "challenger")
            if kind == "first_training"
            else RetrainTriggerRow.kind != "first_training"
        )
        last_episode = (await session.execute(newest.where(family))).scalar_one_or_none()
        suppress: str | None = None
        if last is not None and last.finished_at is None and now - last.at < in_flight_timeout:
            suppress = f"retraining already in flight (trigger {last.id}, started {last.at:%Y-%m-%d %H:%M:%S} UTC)"
        elif (
            last_episode is not None
            and last_episode.finished_at is not None
            and now - last_episode.finished_at < cooldown
        ):
            until = last_episode.finished_at + cooldown
            suppress = f"cooldown after retraining (trigger {last_episode.id}) until {until:%Y-%m-%d %H:%M:%S} UTC"
        row = RetrainTriggerRow(
            model=model, window_id=window_id, check_id=check_id, at=now, kind=kind,
            action="suppressed" if suppress else "started",
            reason=f"{suppress} — breach: {reason}" if suppress else reason,
        )
        session.add(row)
        await session.flush()
        return TriggerDecision(row.action, row.reason, row.id)


async def attach_flow_run(engine: AsyncEngine, trigger_id: int, flow_run_id: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            update(RetrainTriggerRow).where(RetrainTriggerRow.id == trigger_id).values(flow_run_id=flow_run_id)
        )


async def finish_trigger(engine: AsyncEngine, trigger_id: int, outcome: str) -> None:
    """Close a started retraining; its cooldown starts now.

    ``outcome``: ``challenger`` | ``rejected`` | ``refused`` | ``failed``.
    """
    async with engine.begin() as conn:
        await conn.execute(
            update(RetrainTriggerRow)
            .where(RetrainTriggerRow.id == trigger_id)
            .values(finished_at=utcnow(), outcome=outcome)
        )
