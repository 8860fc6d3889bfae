"""The Prefect API as fabloop uses it: promotion runs, their tags, resuming them.

A pending promotion *is* a paused ``promote`` flow run, tagged ``fabloop.promotion``
and ``model:<name>``: the Prefect API is the single source of what waits for a
decision, and resuming that run with an :class:`ApprovalInput` is the decision,
whether it comes from the Prefect UI's Resume form or from ``fabloop approve``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from uuid import UUID

import psutil
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.client.schemas.sorting import FlowRunSort
from prefect.events import emit_event
from prefect.events.worker import EventsWorker
from prefect.input import RunInput
from prefect.states import Crashed, Running
from pydantic import ConfigDict, Field

from fabloop.core.approval import TIMED_OUT_REASON, PendingPromotion, superseded_reason
from fabloop.core.names import PROMOTION_TAG, SYSTEM_APPROVER, model_tag

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
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(str(flow_run_id)))
        merged = list(dict.fromkeys([*(run.tags or []), *tags]))
        if merged != list(run.tags or []):
            client.update_flow_run(run.id, tags=merged)
        return merged


def flow_run_tags(flow_run_id: str | UUID) -> list[str]:
    """The run's tags as they are now (a superseding run adds ``superseded-by:N``)."""
    with get_client(sync_client=True) as client:
        return list(client.read_flow_run(UUID(str(flow_run_id))).tags or [])


class ResumeRefused(RuntimeError):
    """The Prefect server did not accept the decision (e.g. reject without a comment)."""


# A decision sent this close to the pause's end is refused here rather than sent: the
# server turns a resume that arrives after the deadline into a Failed run (which the
# promotion then takes back to record its timeout), so a decision must arrive in time.
LAST_MOMENT = timedelta(seconds=1)


def resume_promotion(
    flow_run_id: str | UUID, decision: Literal["approve", "reject"], approver: str, comment: str = ""
) -> str:
    """Resume a paused promotion with the form's input; returns the id of the state it left.

    This is the same call the Prefect UI's Resume button makes, and the server
    validates the input against the same schema.
    """
    run_input = ApprovalInput.model_construct(decision=decision, approver=approver, comment=comment)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(str(flow_run_id)))
        if run.state is None or not run.state.is_paused():
            state = run.state.type.value if run.state else "no state"
            raise ResumeRefused(f"flow run {flow_run_id} is not waiting for a decision (state {state})")
        ends = run.state.state_details.pause_timeout
        if ends is not None and datetime.now(UTC) + LAST_MOMENT > ends:
            raise ResumeRefused(f"flow run {flow_run_id} stops waiting for a decision at {ends:%H:%M:%S} UTC: too late")
        result = client.resume_flow_run(run.id, run_input=run_input.model_dump())
    if result.status != SetStateStatus.ACCEPT:
        reason = getattr(result.details, "reason", None) or result.status.value
        raise ResumeRefused(f"the Prefect server refused the decision: {reason}")
    return str(run.state.id)


def wait_for_outcome(flow_run_id: str | UUID, left_state_id: str, timeout: float = 60.0) -> Any | None:
    """After a resume, the run's next settled state: final, or paused again (decision refused).

    Returns None if neither happened within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            state = client.read_flow_run(UUID(str(flow_run_id))).state
            if state is not None and (state.is_final() or (state.is_paused() and str(state.id) != left_state_id)):
                return state
            time.sleep(0.5)
    return None


# --- what a promotion run does to its own and to older runs ---------------------------------


def wake_superseded(flow_run_id: str | UUID, version: str, wait: float = 30.0) -> bool:
    """Resume a superseded run once it is paused (it may still be preparing its form).

    The run is resumed as a rejection by the system approver; it ends itself because
    of its ``superseded-by:`` tag, never because of that input. Returns False when it
    did not pause within ``wait`` seconds (it ends when it next checks its tags).
    """
    deadline = time.monotonic() + wait
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(UUID(str(flow_run_id))).state
            if state is None or state.is_final():
                return True
            if state.is_paused():
                try:
                    resume_promotion(flow_run_id, "reject", SYSTEM_APPROVER, superseded_reason(version))
                    return True
                except ResumeRefused:
                    pass  # resumed by someone else meanwhile: it will see its tag when it wakes
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)


def reclaim_expired_pause(flow_run_id: str | UUID) -> None:
    """Take the run back from its expired pause so that it can record the timeout and complete.

    The server refuses every transition out of an expired pause (it turns them into
    Failed), which would make an ordinary outcome look like a crash to the parent
    retraining run; the forced Running state is what a resume would have set.
    """
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(UUID(str(flow_run_id)), Running(message=TIMED_OUT_REASON), force=True)


# --- events from short-lived processes -------------------------------------------------------


def emit_and_flush(event: str, resource: dict[str, str], payload: dict[str, Any], timeout: float = 10.0) -> None:
    """Emit a Prefect event and wait until it is sent: a command line exits right after.

    ``emit_event`` hands the event to a background worker; draining it is what makes
    sure the event left this process before the command ends.
    """
    emit_event(event=event, resource=resource, payload=payload)
    EventsWorker.drain_all(timeout=timeout)


# --- a promotion whose process is gone ----------------------------------------------------------


def local_run_process_alive(flow_run_id: str | UUID) -> bool | None:
    """Whether the process running ``flow_run_id`` on *this* host is alive.

    A paused promotion is a live process of a worker (its ``infrastructure_pid``);
    when the worker is stopped it goes too, but the run stays Paused: resuming it would
    wake nothing. None when the run names no process or it cannot be inspected; only
    meaningful when the run's worker runs on this host (the embedded stack's does).
    """
    with get_client(sync_client=True) as client:
        pid = client.read_flow_run(UUID(str(flow_run_id))).infrastructure_pid
    if not pid or not pid.isdigit():
        return None
    try:
        env = psutil.Process(int(pid)).environ()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return None
    return env.get("PREFECT__FLOW_RUN_ID") == str(flow_run_id)


def mark_crashed(flow_run_id: str | UUID, message: str) -> None:
    """Record that the run's process is gone; the promote deployment's trigger starts the promotion again."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(UUID(str(flow_run_id)), Crashed(message=message), force=True)
