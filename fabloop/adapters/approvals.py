"""Human decisions on challenger models: the form, the audit trail, the waiting runs.

A pending promotion *is* a paused ``promote`` flow run, tagged ``fabloop.promotion``
and ``model:<name>``: the Prefect API is the single source of what waits for a
decision, and resuming that run with an :class:`ApprovalInput` is the decision,
whether it comes from the Prefect UI's Resume form or from ``fabloop approve``.
Every outcome (including refusals) is a row of the ``approvals`` table.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from fabloop.adapters.store.schema import ApprovalRow, create_schema, make_engine, sessionmaker
from prefect.input import RunInput

PROMOTION_TAG = "fabloop.promotion"
SUPERSEDED_TAG_PREFIX = "superseded-by:"
# The name a superseding run resumes an older one with; the older run trusts only
# its own ``superseded-by:`` tag, never this input, to end itself.
SYSTEM_APPROVER = "fabloop"

Decision = Literal["approved", "rejected", "refused", "timed_out", "superseded", "rolled_back"]

T = TypeVar("T")


def model_tag(model: str) -> str:
    return f"model:{model}"


def model_resource(model: str, version: str | None = None) -> dict[str, str]:
    """The Prefect event resource of a model (``fabloop.model.<name>``)."""
    resource = {"prefect.resource.id": f"fabloop.model.{model}", "prefect.resource.name": model}
    if version is not None:
        resource["fabloop.model.version"] = str(version)
    return resource


# --- the form ---------------------------------------------------------------------------

# Enforced by the Prefect server when the run is resumed (the UI shows the error and
# the run stays paused): a rejection needs a reason.
_REJECT_NEEDS_COMMENT: dict[str, Any] = {
    "if": {"properties": {"decision": {"const": "reject"}}, "required": ["decision"]},
    "then": {"properties": {"comment": {"type": "string", "minLength": 1}}, "required": ["comment"]},
}


class ApprovalInput(RunInput):
    """The Resume form of a paused promotion (also what ``fabloop approve/reject`` send)."""

    model_config = ConfigDict(json_schema_extra=_REJECT_NEEDS_COMMENT)

    decision: Literal["approve", "reject"] = Field(
        title="Decision", description="approve: the challenger becomes champion. reject: the champion stays."
    )
    approver: str = Field(
        title="Approver", min_length=1, max_length=255,
        description="Your name as on the approver allowlist (self-declared: Prefect OSS has no login).",
    )
    comment: str = Field(default="", title="Comment", description="Why. Required to reject.")


def refusal_reason(answer: ApprovalInput, allowed: bool, policy_name: str) -> str | None:
    """Why a submitted decision cannot be acted on, or None when it can."""
    if not allowed:
        return f"{answer.approver.strip()!r} is not on the approver allowlist of policy {policy_name!r}"
    if answer.decision == "reject" and not answer.comment.strip():
        return "a comment is required to reject"
    return None


# --- the decision page --------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def metrics_table(metrics: Mapping[str, Mapping[str, float]], champion: str | None, challenger: str) -> str:
    """Champion vs challenger on the same holdout, one row per metric, with the change."""
    champ = metrics.get("champion") or {}
    chall = metrics.get("challenger") or {}
    names = list(dict.fromkeys([*chall, *champ]))
    if not names:
        return "_No holdout metrics were given._\n"
    head = f"champion v{champion}" if champion else "champion (none)"
    lines = [f"| metric | {head} | challenger v{challenger} | change |", "|---|---:|---:|---:|"]
    for name in names:
        a, b = champ.get(name), chall.get(name)
        change = "—" if a is None or b is None else f"{b - a:+.4f}"
        lines.append(f"| {name} | {_fmt(a)} | {_fmt(b)} | {change} |")
    return "\n".join(lines) + "\n"


def decision_markdown(
    *,
    model: str,
    challenger: str,
    champion: str | None,
    reasons: Sequence[str],
    metrics: Mapping[str, Mapping[str, float]],
    links: Mapping[str, str],
    trigger: Mapping[str, Any],
    policy_name: str,
    deadline: datetime,
) -> str:
    """Everything an engineer needs to decide, as Markdown (artifact and form description)."""
    champion_text = f"[version {champion}]({links['champion_version']})" if champion else "none yet"
    out = [
        f"## Promote `{model}` version {challenger} to champion?\n",
        f"**Challenger:** [version {challenger}]({links['challenger_version']})"
        + (f" ([training run]({links['challenger_run']}))" if links.get("challenger_run") else "")
        + f" · **Champion:** {champion_text}"
        + (f" ([training run]({links['champion_run']}))" if champion and links.get("champion_run") else ""),
        "" if champion else "\nThis model has no champion yet: if approved, this version becomes the first.",
        "\n### Why a new model\n",
        *([f"- {r}" for r in reasons] or ["- (no reason given)"]),
        "\n### Holdout metrics (same holdout for both)\n",
        metrics_table(metrics, champion, challenger),
    ]
    shown = {"challenger_version", "champion_version", "challenger_run", "champion_run"}
    evidence = [f"- [{k.replace('_', ' ')}]({v})" for k, v in links.items() if k not in shown and v]
    evidence += [f"- {k.replace('_', ' ')}: `{v}`" for k, v in trigger.items()]
    if evidence:
        out += ["### Evidence\n", *evidence, ""]
    out += [
        "### Decide\n",
        "Choose **approve** or **reject** and give your name as it appears on the approver allowlist "
        f"(block `{policy_name}`); a comment is required to reject. Names are self-declared: every "
        "decision is recorded with it. Without a decision by "
        f"{deadline.astimezone(UTC):%Y-%m-%d %H:%M} UTC the challenger is rejected (approval timed out).",
    ]
    return "\n".join(out) + "\n"


# --- the audit trail ----------------------------------------------------------------------


class ApprovalRecord(BaseModel):
    """One row of the approvals table."""

    model_config = ConfigDict(from_attributes=True)

    id: int | None = None
    model: str
    version: str
    decision: Decision
    approver: str | None = None
    comment: str | None = None
    flow_run_id: str | None = None
    previous_champion: str | None = None
    decided_at: datetime | None = None
    detail: dict[str, Any] = Field(default_factory=dict)


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


# --- the waiting runs (Prefect API) -------------------------------------------------------


class PendingPromotion(BaseModel):
    """A paused ``promote`` run waiting for a decision."""

    flow_run_id: str
    flow_run_name: str
    model: str
    version: str
    state: str
    started: datetime | None
    paused_since: datetime | None
    times_out: datetime | None
    tags: list[str]

    def age_seconds(self, now: datetime | None = None) -> float | None:
        since = self.started or self.paused_since
        return None if since is None else ((now or datetime.now(UTC)) - since).total_seconds()

    @property
    def superseded_by(self) -> str | None:
        return superseded_by(self.tags)


def superseded_by(tags: Sequence[str]) -> str | None:
    """The version named by a ``superseded-by:N`` tag, if any."""
    return next((t.removeprefix(SUPERSEDED_TAG_PREFIX) for t in tags if t.startswith(SUPERSEDED_TAG_PREFIX)), None)


def _promotion(run: Any) -> PendingPromotion:
    params = run.parameters or {}
    state = run.state
    return PendingPromotion(
        flow_run_id=str(run.id), flow_run_name=run.name, model=str(params.get("model", "")),
        version=str(params.get("challenger_version", "")), state=state.type.value if state else "UNKNOWN",
        started=run.start_time, paused_since=state.timestamp if state and state.is_paused() else None,
        times_out=state.state_details.pause_timeout if state and state.is_paused() else None,
        tags=list(run.tags or []),
    )


def promotion_runs(model: str | None = None, states: Sequence[str] = ("PAUSED",)) -> list[PendingPromotion]:
    """``promote`` runs (of ``model``, or of every model) in the given state types, newest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    tags = [PROMOTION_TAG] + ([model_tag(model)] if model else [])
    flt = FlowRunFilter(
        tags=FlowRunFilterTags(all_=tags),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(s) for s in states])),
    )
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=flt, sort=FlowRunSort.START_TIME_DESC, limit=200)
    return [_promotion(r) for r in runs]


def pending_promotions(model: str | None = None) -> list[PendingPromotion]:
    """Promotions waiting for a human: paused and not superseded."""
    return [p for p in promotion_runs(model) if p.superseded_by is None]


def add_flow_run_tags(flow_run_id: str | UUID, tags: Sequence[str]) -> list[str]:
    """Add tags to a flow run (keeping its others); returns the new tag list."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(str(flow_run_id)))
        merged = list(dict.fromkeys([*(run.tags or []), *tags]))
        if merged != list(run.tags or []):
            client.update_flow_run(run.id, tags=merged)
        return merged


def flow_run_tags(flow_run_id: str | UUID) -> list[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return list(client.read_flow_run(UUID(str(flow_run_id))).tags or [])


class ResumeRefused(RuntimeError):
    """The Prefect server did not accept the decision (e.g. reject without a comment)."""


def resume_promotion(flow_run_id: str | UUID, decision: Literal["approve", "reject"], approver: str, comment: str = "") -> str:
    """Resume a paused promotion with the form's input; returns the id of the state it left.

    This is the same call the Prefect UI's Resume button makes, and the server
    validates the input against the same schema.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.responses import SetStateStatus

    run_input = ApprovalInput.model_construct(decision=decision, approver=approver, comment=comment)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(str(flow_run_id)))
        if run.state is None or not run.state.is_paused():
            state = run.state.type.value if run.state else "no state"
            raise ResumeRefused(f"flow run {flow_run_id} is not waiting for a decision (state {state})")
        result = client.resume_flow_run(run.id, run_input=run_input.model_dump())
    if result.status != SetStateStatus.ACCEPT:
        reason = getattr(result.details, "reason", None) or result.status.value
        raise ResumeRefused(f"the Prefect server refused the decision: {reason}")
    return str(run.state.id)


def wait_for_outcome(flow_run_id: str | UUID, left_state_id: str, timeout: float = 60.0) -> Any | None:
    """After a resume, the run's next settled state: final, or paused again (decision refused).

    Returns None if neither happened within ``timeout`` seconds.
    """
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            state = client.read_flow_run(UUID(str(flow_run_id))).state
            if state is not None and (state.is_final() or (state.is_paused() and str(state.id) != left_state_id)):
                return state
            time.sleep(0.5)
    return None
