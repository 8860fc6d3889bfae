"""Once per episode: decide whether a breach may start a retraining, atomically.

Fifty drift checks can breach at the same moment; exactly one of them may start a
retraining of a model, and the others are recorded as suppressed with the reason.
The decision is one transaction that first takes a lock (SQLite: the write lock
taken by BEGIN IMMEDIATE; PostgreSQL: an advisory lock per model), so concurrent
checks serialise on it.

Before deciding, the model's open triggers are reconciled with Prefect: a trigger
whose run ended Crashed, Failed or Cancelled without closing it, whose process is
gone (no heartbeat), or that never got a run at all, is closed at once with that
outcome, so a dead retraining does not hold back the next breach. A retraining that
never ran (crashed, cancelled, never scheduled, lost) ends no episode: it starts no
cooldown.

A cooldown is measured in wall time and in event time. A trigger's event time is the
end (``ts_end``) of the window it judged. The cooldown holds while both the wall time
since the last retraining ended and the event time since its window are shorter than
the cooldown. Live, the two advance together; in a replay or a catch-up after an
outage, months of wafers arrive in minutes, and event time governs: the windows of a
replayed month are not all suppressed by one wall-clock hour. A trigger without a
window (manual, scheduled) has no event time, and wall time alone decides. In-flight
suppression is wall time only: a running retraining is running. First trainings (no
champion yet) pace each other in wall time only: they wait for an engineer's decision
on the first challenger, not for process time.
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from fabloop.adapters.run_states import RunStatus, flow_run_status, mark_crashed
from fabloop.adapters.store._engine import sessionmaker
from fabloop.adapters.store._schema import RetrainTriggerRow, WindowRow, utcnow

# A started trigger gets its flow run within seconds (``run_deployment``, then
# ``attach_flow_run``); one still without a run after this never will.
NEVER_SCHEDULED_GRACE = timedelta(minutes=3)
# Outcomes of a retraining that never ran to an end of its own: no cooldown follows them.
NO_COOLDOWN = ("crashed", "cancelled", "never_scheduled", "lost")
# Outcomes of a first training that pace the next first training: a challenger, and a
# data-gate refusal (retrying the same refused set every window would only repeat it).
FIRST_TRAINING_COOLDOWN = ("challenger", "refused")
# Prefect state types that end a run, and the trigger outcome each closes it with.
_ENDED = {"CRASHED": "crashed", "FAILED": "failed", "CANCELLED": "cancelled", "COMPLETED": "completed"}

RunStatusLookup = Callable[[str], Awaitable[RunStatus | None]]
CrashMarker = Callable[[str, str], Awaitable[None]]


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
    run_status: RunStatusLookup = flow_run_status,
    crash: CrashMarker = mark_crashed,
) -> TriggerDecision:
    """Record a trigger as ``started`` unless a retraining is in flight or cooling down.

    One retraining per model is in flight at a time, whatever started it; open
    triggers whose run is dead are closed first (:func:`reconcile_triggers`). The
    cooldown follows each retraining that ran, within its family: a scope's first
    training (no champion yet) ends no drift episode, so it does not hold back the
    first breach after it, but it does hold back further first trainings, whether it
    produced a challenger or the data gate refused its set (``FIRST_TRAINING_COOLDOWN``).
    A cooldown holds while both the wall time and the event time since the last
    retraining are shorter than ``cooldown`` (see the module docstring).
    ``in_flight_timeout`` is the last resort for a run nobody can judge.
    """
    now = now or utcnow()
    await reconcile_triggers(engine, model, now, run_status, crash)
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
            # A first training whose challenger lost the gate (``rejected``) or that failed
            # does not hold back the next window's attempt, which has more data. A refused
            # one does: the gate's refusal is a decision (too few labels, too many missing
            # sensors) that the next window's set would mostly repeat.
            (RetrainTriggerRow.kind == "first_training")
            & RetrainTriggerRow.outcome.in_(FIRST_TRAINING_COOLDOWN)
            if kind == "first_training"
            else RetrainTriggerRow.kind != "first_training"
        )
        ran = RetrainTriggerRow.outcome.is_(None) | RetrainTriggerRow.outcome.not_in(NO_COOLDOWN)
        last_episode = (await session.execute(newest.where(family, ran))).scalar_one_or_none()
        suppress: str | None = None
        if last is not None and last.finished_at is None and now - last.at < in_flight_timeout:
            suppress = f"retraining already in flight (trigger {last.id}, started {last.at:%Y-%m-%d %H:%M:%S} UTC)"
        elif (
            last_episode is not None
            and last_episode.finished_at is not None
            and now - last_episode.finished_at < cooldown
        ):
            suppress = (
                await _cooling_down(session, last_episode, window_id, cooldown) if kind != "first_training"
                else _first_training_wait(last_episode, cooldown)
            )
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


async def finish_trigger(engine: AsyncEngine, trigger_id: int, outcome: str, at: datetime | None = None) -> bool:
    """Close a started retraining; its cooldown (if it ran, see ``NO_COOLDOWN``) starts now.

    ``outcome``: ``challenger`` | ``rejected`` | ``refused`` | ``failed``, or what a
    reconcile found: ``crashed`` | ``cancelled`` | ``completed`` | ``never_scheduled`` |
    ``lost``. A trigger is closed once: returns False when it already was.
    """
    async with engine.begin() as conn:
        result = await conn.execute(
            update(RetrainTriggerRow)
            .where(RetrainTriggerRow.id == trigger_id, RetrainTriggerRow.finished_at.is_(None))
            .values(finished_at=at or utcnow(), outcome=outcome)
        )
    return bool(result.rowcount)


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)


async def _event_time(session: AsyncSession, window_id: int | None) -> datetime | None:
    """A trigger's event time: its window's last wafer (None without a window)."""
    if window_id is None:
        return None
    ts_end = (await session.execute(select(WindowRow.ts_end).where(WindowRow.id == window_id))).scalar()
    return _aware(ts_end) if ts_end is not None else None


async def _cooling_down(
    session: AsyncSession, last: RetrainTriggerRow, window_id: int | None, cooldown: timedelta
) -> str | None:
    """The suppression reason while the cooldown after ``last`` holds (its wall time has not passed yet).

    It holds unless the event time since ``last``'s window has reached the cooldown.
    """
    assert last.finished_at is not None
    until = _aware(last.finished_at) + cooldown
    wall = f"cooldown after retraining (trigger {last.id}) until {until:%Y-%m-%d %H:%M:%S} UTC"
    last_event, event = await _event_time(session, last.window_id), await _event_time(session, window_id)
    if last_event is None or event is None:
        return f"{wall} (wall time; no event time to compare: a trigger without a window)"
    if event - last_event >= cooldown:
        return None
    return (f"{wall} in wall time, or until the fab reaches event time {last_event + cooldown:%Y-%m-%d %H:%M:%S} "
            f"UTC, whichever comes first (this window ends at {event:%Y-%m-%d %H:%M:%S} UTC, "
            f"{_minutes(event - last_event)} after the retraining's window)")


def _first_training_wait(last: RetrainTriggerRow, cooldown: timedelta) -> str:
    """First trainings are paced in wall time only.

    Until an engineer approves the first champion, every window of the scope is judged
    "no champion"; what a further first training waits for is that decision, not more
    process time. In event time, a replayed or caught-up stream would start a first
    training per window while the first challenger waits for approval.
    """
    assert last.finished_at is not None
    until = _aware(last.finished_at) + cooldown
    return (f"cooldown after retraining (trigger {last.id}) until {until:%Y-%m-%d %H:%M:%S} UTC "
            "(wall time: a first training waits for the decision on the last one)")


def _minutes(delta: timedelta) -> str:
    minutes = delta.total_seconds() / 60
    return f"{minutes:.0f} min" if abs(minutes) < 120 else f"{minutes / 60:.1f} h"


async def reconcile_triggers(
    engine: AsyncEngine,
    model: str,
    now: datetime | None = None,
    run_status: RunStatusLookup = flow_run_status,
    crash: CrashMarker = mark_crashed,
) -> dict[int, str]:
    """Close the model's open triggers whose retraining is over or dead; returns {trigger id: outcome}.

    Asks Prefect about each run (an unreachable API raises: an open trigger is never
    closed on a guess). A run that is still scheduled, waiting for a slot or running
    with a heartbeat stays in flight.
    """
    now = now or utcnow()
    async with sessionmaker(engine)() as session:
        rows = (await session.execute(
            select(RetrainTriggerRow.id, RetrainTriggerRow.flow_run_id, RetrainTriggerRow.at).where(
                RetrainTriggerRow.model == model, RetrainTriggerRow.action == "started",
                RetrainTriggerRow.finished_at.is_(None),
            )
        )).all()
    closed: dict[int, str] = {}
    for trigger_id, flow_run_id, at in rows:
        outcome: str | None = None
        if flow_run_id is None:
            if now - _aware(at) > NEVER_SCHEDULED_GRACE:
                outcome = "never_scheduled"
        else:
            status = await run_status(flow_run_id)
            if status is None:
                outcome = "lost"  # Prefect has no such run (deleted)
            elif status.state in _ENDED:
                outcome = _ENDED[status.state]
            elif status.gone(now):
                await crash(flow_run_id, f"fabloop: no heartbeat since {status.last_heartbeat:%Y-%m-%d %H:%M:%S} UTC; "
                                         f"the retraining's process is gone (trigger {trigger_id} closed)")
                outcome = "crashed"
        if outcome is not None and await finish_trigger(engine, trigger_id, outcome, at=now):
            closed[trigger_id] = outcome
    return closed
