"""Drift checks: one verdict per closed window, with each sensor's statistic.

Window events arrive at least once, so a window may be handed to several checks. A
check claims its window by inserting the window's ``drift_checks`` row first, with
status ``claimed`` (``drift_checks.window_id`` is unique): the insert that wins is
the window's one check, and every other check finds the claim and stops. The
winner records its verdict into that same row (``record_check``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from fabloop.adapters.store._engine import sessionmaker
from fabloop.adapters.store._schema import DriftCheckRow, FeatureDriftRow, WindowRow, utcnow

if TYPE_CHECKING:  # the drift module brings pandas: a store opened by ingest does not need it
    from fabloop.core.drift import FeatureDrift

CLAIMED = "claimed"  # the status of a check that holds its window and has no verdict yet


class WindowNotClosed(ValueError):
    """A check was asked for a window that is still filling (or unknown): only a closed window is judged."""


class ClaimLost(RuntimeError):
    """The check's claim on its window is no longer its own (another check took it over)."""


@dataclass(frozen=True)
class Claim:
    """The window's check row: ours to judge (``duplicate`` False), or another check's."""

    check_id: int
    window_id: int
    model: str
    duplicate: bool
    status: str
    flow_run_id: str | None
    claimed_at: datetime | None = None


def _insert(engine: AsyncEngine) -> Any:
    return postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert


async def claim_window(engine: AsyncEngine, window_id: int, flow_run_id: str | None) -> Claim:
    """Claim a closed window for one check, insert first; the window's existing check if it has one.

    A claim left by the same flow run (a retried run) is handed back to it, not
    reported as a duplicate. Raises ``WindowNotClosed`` for an open or unknown window.
    """
    now = utcnow()
    async with sessionmaker(engine)() as session, session.begin():
        window = (await session.execute(
            select(WindowRow.model, WindowRow.status).where(WindowRow.id == window_id))).first()
        if window is None:
            raise WindowNotClosed(f"window {window_id} is not in the event store: there is nothing to check")
        if window.status != "closed":
            raise WindowNotClosed(
                f"window {window_id} of {window.model} is {window.status!r}, not closed: "
                "a window is judged once it is closed")
        claimed = await session.execute(
            _insert(engine)(DriftCheckRow)
            .values(window_id=window_id, model=window.model, checked_at=now, flow_run_id=flow_run_id,
                    status=CLAIMED, drifted=False, performance_breach=False, reason="being checked", detail={})
            .on_conflict_do_nothing(index_elements=[DriftCheckRow.window_id])
            .returning(DriftCheckRow.id)
        )
        check_id = claimed.scalar_one_or_none()
        if check_id is not None:
            return Claim(check_id, window_id, window.model, False, CLAIMED, flow_run_id, now)
        held = (await session.execute(
            select(DriftCheckRow.id, DriftCheckRow.status, DriftCheckRow.flow_run_id, DriftCheckRow.checked_at)
            .where(DriftCheckRow.window_id == window_id))).one()
    ours = held.status == CLAIMED and flow_run_id is not None and held.flow_run_id == flow_run_id
    return Claim(held.id, window_id, window.model, not ours, held.status, held.flow_run_id, held.checked_at)


async def take_over_claim(engine: AsyncEngine, claim: Claim, flow_run_id: str | None) -> Claim | None:
    """Take over a claim whose check ended without a verdict; None if it is no longer that claim."""
    async with engine.begin() as conn:
        result = await conn.execute(
            update(DriftCheckRow)
            .where(DriftCheckRow.id == claim.check_id, DriftCheckRow.status == CLAIMED,
                   DriftCheckRow.flow_run_id.is_(None) if claim.flow_run_id is None
                   else DriftCheckRow.flow_run_id == claim.flow_run_id)
            .values(flow_run_id=flow_run_id, checked_at=utcnow())
        )
    if result.rowcount != 1:
        return None
    return Claim(claim.check_id, claim.window_id, claim.model, False, CLAIMED, flow_run_id, utcnow())


async def already_checked(engine: AsyncEngine, window_id: int) -> int | None:
    """The id of the window's drift check (or claim), if it has one."""
    async with engine.connect() as conn:
        row = (await conn.execute(select(DriftCheckRow.id).where(DriftCheckRow.window_id == window_id))).first()
    return row[0] if row else None


async def record_check(engine: AsyncEngine, check: DriftCheckRow, features: Iterable[FeatureDrift] = ()) -> int:
    """Record a claimed window's verdict and per-sensor statistics in one transaction; returns the check id.

    ``check.id`` is the claim's id; the claim must still be held by ``check.flow_run_id``
    (``ClaimLost`` otherwise: the verdict is then another check's to record).
    """
    verdict = {c.key: getattr(check, c.key) for c in DriftCheckRow.__table__.columns
               if c.key not in ("id", "window_id", "model", "flow_run_id")}
    verdict["checked_at"] = verdict["checked_at"] or utcnow()
    verdict["detail"] = verdict["detail"] or {}
    holder = (DriftCheckRow.flow_run_id.is_(None) if check.flow_run_id is None
              else DriftCheckRow.flow_run_id == check.flow_run_id)
    async with sessionmaker(engine)() as session, session.begin():
        result = await session.execute(
            update(DriftCheckRow)
            .where(DriftCheckRow.id == check.id, DriftCheckRow.window_id == check.window_id,
                   DriftCheckRow.status == CLAIMED, holder)
            .values(**verdict)
        )
        if result.rowcount != 1:
            raise ClaimLost(f"drift check {check.id} of window {check.window_id} is not claimed by flow run "
                            f"{check.flow_run_id}: its verdict is not recorded")
        session.add_all(
            FeatureDriftRow(check_id=check.id, feature=f.feature, stattest=f.stattest or "", score=f.score,
                            threshold=f.threshold, drifted=f.drifted, status=f.status)
            for f in features
        )
    return check.id


async def set_report_url(engine: AsyncEngine, check_id: int, report_url: str) -> bool:
    """Link a recorded check to its Evidently report; False if the check has no verdict recorded.

    The report is rendered after the verdict was acted on (a breach's retraining does not
    wait for it), so the link is added to the check's row once the report is kept.
    """
    async with engine.begin() as conn:
        result = await conn.execute(
            update(DriftCheckRow)
            .where(DriftCheckRow.id == check_id, DriftCheckRow.status != CLAIMED)
            .values(report_url=report_url)
        )
    return result.rowcount == 1
