"""The approvals table: every promotion decision, refusal and rollback (the audit trail).

A decision that moves ``champion`` is written twice in the same row: first as
intended (``detail.status = "intended"``, before any alias moves), then completed
(after they did). Rows are never deleted and nothing else in them changes.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from fabloop.adapters.store._engine import sessionmaker
from fabloop.adapters.store._schema import ApprovalRow, utcnow
from fabloop.core.approval import COMPLETED, INTENDED, ApprovalRecord


async def record_decision(engine: AsyncEngine, record: ApprovalRecord) -> ApprovalRecord:
    """Append a decision to the approvals table; returns it with its id and time."""
    async with sessionmaker(engine)() as session, session.begin():
        row = ApprovalRow(**record.model_dump(exclude={"id", "decided_at"}, exclude_none=True))
        if record.decided_at is not None:
            row.decided_at = record.decided_at
        session.add(row)
        await session.flush()
        return ApprovalRecord.model_validate(row)


async def complete_decision(
    engine: AsyncEngine, decision_id: int, previous_champion: str | None, detail: dict[str, Any] | None = None
) -> ApprovalRecord:
    """Mark an intended decision completed: its alias moves are done (``previous_champion`` as they found it)."""
    async with sessionmaker(engine)() as session, session.begin():
        row = await session.get(ApprovalRow, decision_id, with_for_update=True)
        if row is None:
            raise LookupError(f"approvals: no decision #{decision_id}")
        if row.detail.get("status") != INTENDED:
            return ApprovalRecord.model_validate(row)  # completed already (a repeated completion)
        row.previous_champion = previous_champion
        # A new dict, so that the JSON column is written (in-place changes are not tracked).
        row.detail = {**row.detail, **(detail or {}), "status": COMPLETED, "completed_at": utcnow().isoformat()}
        await session.flush()
        return ApprovalRecord.model_validate(row)


async def decisions(
    engine: AsyncEngine, model: str | None = None, flow_run_id: str | None = None
) -> list[ApprovalRecord]:
    """The audit trail of ``model`` (of every model if None; optionally of one promotion run), oldest first."""
    query = select(ApprovalRow)
    if model is not None:
        query = query.where(ApprovalRow.model == model)
    if flow_run_id is not None:
        query = query.where(ApprovalRow.flow_run_id == flow_run_id)
    async with sessionmaker(engine)() as session:
        rows = (await session.scalars(query.order_by(ApprovalRow.id))).all()
        return [ApprovalRecord.model_validate(r) for r in rows]
