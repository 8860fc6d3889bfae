"""The approvals table: every promotion decision, refusal and rollback (the audit trail)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import select

from fabloop.adapters.store.schema import ApprovalRow, create_schema, make_engine, sessionmaker
from fabloop.core.approval import ApprovalRecord

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, also when an event loop already runs in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def arecord_decision(database_url: str, record: ApprovalRecord) -> ApprovalRecord:
    engine = make_engine(database_url)
    try:
        await create_schema(engine)
        async with sessionmaker(engine)() as session, session.begin():
            row = ApprovalRow(**record.model_dump(exclude={"id", "decided_at"}, exclude_none=True))
            if record.decided_at is not None:
                row.decided_at = record.decided_at
            session.add(row)
            await session.flush()
            return ApprovalRecord.model_validate(row)
    finally:
        await engine.dispose()


def record_decision(database_url: str, record: ApprovalRecord) -> ApprovalRecord:
    """Append a decision to the approvals table (created if missing); returns it with id and time."""
    return _run(arecord_decision(database_url, record))


async def adecisions(database_url: str, model: str, flow_run_id: str | None = None) -> list[ApprovalRecord]:
    engine = make_engine(database_url)
    try:
        await create_schema(engine)
        query = select(ApprovalRow).where(ApprovalRow.model == model)
        if flow_run_id is not None:
            query = query.where(ApprovalRow.flow_run_id == flow_run_id)
        async with sessionmaker(engine)() as session:
            rows = (await session.scalars(query.order_by(ApprovalRow.id))).all()
            return [ApprovalRecord.model_validate(r) for r in rows]
    finally:
        await engine.dispose()


def decisions(database_url: str, model: str, flow_run_id: str | None = None) -> list[ApprovalRecord]:
    """The audit trail of ``model`` (optionally of one promotion run), oldest first."""
    return _run(adecisions(database_url, model, flow_run_id))


