"""What the loop did, in counts: the main job's closing summary."""

from __future__ import annotations

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from fabloop.adapters.store._checks import CLAIMED
from fabloop.adapters.store._schema import DriftCheckRow, RetrainTriggerRow


class LoopSummary(BaseModel):
    checks: int
    breaches: int
    suppressed: int
    # Why the model's newest breach retraining (not a first training) was started.
    breach_reason: str | None


async def loop_summary(engine: AsyncEngine, model: str) -> LoopSummary:
    """Drift checks and breaches (all models), suppressed triggers, and ``model``'s last breach reason."""
    async with engine.connect() as conn:
        # A claimed row is a check still running: it has no verdict yet.
        judged = DriftCheckRow.status != CLAIMED
        checks = (await conn.execute(select(func.count()).select_from(DriftCheckRow).where(judged))).scalar_one()
        breaches = (await conn.execute(select(func.count()).select_from(DriftCheckRow).where(
            (DriftCheckRow.drifted.is_(True)) | (DriftCheckRow.performance_breach.is_(True))))).scalar_one()
        suppressed = (await conn.execute(select(func.count()).select_from(RetrainTriggerRow).where(
            RetrainTriggerRow.action == "suppressed"))).scalar_one()
        reason = (await conn.execute(select(RetrainTriggerRow.reason).where(
            RetrainTriggerRow.model == model, RetrainTriggerRow.action == "started",
            RetrainTriggerRow.kind != "first_training").order_by(RetrainTriggerRow.id.desc()).limit(1))).scalar()
    return LoopSummary(checks=checks, breaches=breaches, suppressed=suppressed, breach_reason=reason)
