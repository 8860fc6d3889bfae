"""The approvals table: every promotion decision, refusal and rollback (the audit trail)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from fabloop.adapters.store._engine import sessionmaker
from fabloop.adapters.store._schema import ApprovalRow
from fabloop.core.approval import ApprovalRecord


async def record_decision(engine: AsyncEngine, record: ApprovalRecord) -> ApprovalRecord:
    """Append a decision to the approvals table; returns it with its id and time."""
    async with sessionmaker(engine)() as session, session.begin():
        row = ApprovalRow(**record.model_dump(exclude={"id", "decided_at"}, exclude_none=True))
        if record.decided_at is not None:
            row.decided_at = record.decided_at
        session.add(row)
        await session.flush()
        return ApprovalRecord.model_validate(row)


async def decisions(engine: AsyncEngine, model: str, flow_run_id: str | None = None) -> list[ApprovalRecord]:
    """The audit trail of ``model`` (optionally of one promotion run), oldest first."""
    query = select(ApprovalRow).where(ApprovalRow.model == model)
    if flow_run_id is not None:
        query = query.where(ApprovalRow.flow_run_id == flow_run_id)
    async with sessionmaker(engine)() as session:
        rows = (await session.scalars(query.order_by(ApprovalRow.id))).all()
        return [ApprovalRecord.model_validate(r) for r in rows]
