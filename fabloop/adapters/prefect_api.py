"""The Prefect API as fabloop uses it: promotion runs, their tags, resuming them.

A pending promotion *is* a suspended ``promote`` flow run (state Paused, named
Suspended: no process), tagged ``fabloop.promotion``, ``model:<name>`` and
``decide-by:<deadline>``: the Prefect API is the single source of what waits for a
decision, and resuming that run with an :class:`ApprovalInput` is the decision,
whether it comes from the Prefect UI's Resume form or from ``fabloop approve``. The
server keeps each answer as the run's input under the suspension's key; a worker
then runs the flow again from the top, and the flow reads its answers back
(:func:`decision_facts`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple
from uuid import UUID

import psutil
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.client.schemas.sorting import FlowRunSort
from prefect.events import emit_event
from prefect.events.worker import EventsWorker
from prefect.input import RunInput
from prefect.input.run_input import Keyset, keyset_from_paused_state
from prefect.states import Crashed, Suspended
from pydantic import ConfigDict, Field

from fabloop.core.approval import TIMED_OUT_REASON, PendingPromotion, decide_by, superseded_reason
from fabloop.core.names import (
    PROMOTION_TAG,
    PROMOTION_TIMEOUT_DEPLOYMENT,
    SYSTEM_APPROVER,
    model_tag,
)

# --- the form ---------------------------------------------------------------------------

# Enforced by the Prefect server when the run is resumed (the UI shows the error and
# the run stays suspended): a rejection needs a reason.
_REJECT_NEEDS_COMMENT: dict[str, Any] = {
    "if": {"properties": {"decision": {"const": "reject"}}, "required": ["decision"]},
    "then": {"properties": {"comment": {"type": "string", "minLength": 1}}, "required": ["comment"]},
}


class ApprovalInput(RunInput):
    """The Resume form of a suspended promotion (also what ``fabloop approve/reject`` send)."""

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
    tags = list(run.tags or [])
    return PendingPromotion(
        flow_run_id=str(run.id), flow_run_name=run.name, model=str(params.get("model", "")),
        version=str(params.get("challenger_version", "")), state=state.type.value if state else "UNKNOWN",
        started=run.start_time, paused_since=state.timestamp if state and state.is_paused() else None,
        times_out=decide_by(tags), tags=tags,
    )


# A promotion that is waiting, or on its way to acting on an answer (a resumed run is
# Scheduled until a worker picks it up, then Pending and Running).
OPEN_STATES = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED")


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
    """Promotions waiting for a human: suspended and not superseded."""
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


# --- the answers a suspended promotion was resumed with --------------------------------------


def decision_keyset(key: str) -> Keyset:
    """Where the server keeps the form (schema, description) and the answer of suspension ``key``."""
    return keyset_from_paused_state(Suspended(pause_key=key))


class Answered(NamedTuple):
    """One answer to a suspension: what was submitted, and when the server took it."""

    key: str
    answer: ApprovalInput
    at: datetime


class DecisionFacts(NamedTuple):
    """What the server holds about a promotion's suspensions, read on each execution of the run."""

    used_keys: frozenset[str]  # every suspension key the run has entered (answered or not)
    answers: dict[str, Answered]


def decision_facts(flow_run_id: str | UUID) -> DecisionFacts:
    """The run's suspension keys and the answers it was resumed with (the server's record, not memory)."""
    run_id = UUID(str(flow_run_id))
    with get_client(sync_client=True) as client:
        used = client.read_flow_run(run_id).empirical_policy.pause_keys or set()
        stored = {i.key: i for i in client.filter_flow_run_input(run_id, key_prefix="", limit=10_000,
                                                                  exclude_keys=set())}
    answers: dict[str, Answered] = {}
    for key in used:
        item = stored.get(decision_keyset(key)["response"])
        if item is not None:
            answer = ApprovalInput.model_validate(json.loads(item.value))
            answers[key] = Answered(key=key, answer=answer, at=item.created or datetime.now(UTC))
    return DecisionFacts(used_keys=frozenset(used), answers=answers)


class ResumeRefused(RuntimeError):
    """The Prefect server did not accept the decision (e.g. reject without a comment)."""


# A decision sent this close to the deadline is refused here rather than sent: an
# answer the server takes after the deadline is recorded as ignored and the promotion
# ends timed out, so a decision must arrive in time.
LAST_MOMENT = timedelta(seconds=1)


def resume_promotion(
    flow_run_id: str | UUID, decision: Literal["approve", "reject"], approver: str, comment: str = ""
) -> str:
    """Resume a suspended promotion with the form's input; returns the id of the state it left.

    This is the same call the Prefect UI's Resume button makes, and the server
    validates the input against the same schema.
    """
    run_input = ApprovalInput.model_construct(decision=decision, approver=approver, comment=comment)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(str(flow_run_id)))
        if run.state is None or not run.state.is_paused():
            state = run.state.type.value if run.state else "no state"
            raise ResumeRefused(f"flow run {flow_run_id} is not waiting for a decision (state {state})")
        ends = decide_by(run.tags or [])
        if approver != SYSTEM_APPROVER and ends is not None and datetime.now(UTC) + LAST_MOMENT > ends:
            raise ResumeRefused(f"flow run {flow_run_id} stopped waiting for a decision at {ends:%H:%M:%S} UTC: "
                                "too late (it ends timed out)")
        result = client.resume_flow_run(run.id, run_input=run_input.model_dump())
    if result.status != SetStateStatus.ACCEPT:
        reason = getattr(result.details, "reason", None) or result.status.value
        raise ResumeRefused(f"the Prefect server refused the decision: {reason}")
    return str(run.state.id)


def wait_for_outcome(
    flow_run_id: str | UUID, left_state_id: str, timeout: float = 180.0,
    on_state: Callable[[Any], None] | None = None,
) -> Any | None:
    """After a resume, the run's next settled state: final, or suspended again (decision refused).

    A resumed promotion has no process: it is Scheduled until a worker picks it up and
    starts the flow again, which then acts on the answer. ``on_state`` is called with
    each new state on the way (e.g. to say that the run waits for a worker). Returns
    None if nothing settled within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    seen: str | None = left_state_id
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            state = client.read_flow_run(UUID(str(flow_run_id))).state
            if state is not None and (state.is_final() or (state.is_paused() and str(state.id) != left_state_id)):
                return state
            if state is not None and on_state is not None and str(state.id) != seen:
                seen = str(state.id)
                on_state(state)
            time.sleep(0.5)
    return None


# --- what a promotion run does to its own and to older runs ---------------------------------


def wake_superseded(flow_run_id: str | UUID, version: str, wait: float = 30.0) -> bool:
    """Resume a superseded run once it is suspended (it may still be preparing its form).

    The run is resumed as a rejection by the system approver; it ends itself because
    of its ``superseded-by:`` tag, never because of that input. Returns False when it
    did not suspend within ``wait`` seconds (it ends when it next checks its tags).
    """
    return _wake(flow_run_id, superseded_reason(version), wait)


def _wake(flow_run_id: str | UUID, reason: str, wait: float) -> bool:
    """Resume the run with a system answer once it is suspended; True when it was, or it ended."""
    deadline = time.monotonic() + wait
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(UUID(str(flow_run_id))).state
            if state is None or state.is_final():
                return True
            if state.is_paused():
                try:
                    resume_promotion(flow_run_id, "reject", SYSTEM_APPROVER, reason)
                    return True
                except ResumeRefused:
                    pass  # resumed by someone else meanwhile: it will act on that answer first
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)


def schedule_timeout(flow_run_id: str, deadline: datetime, tags: Sequence[str] = ()) -> str:
    """One run of the ``promotion-timeout`` deployment at ``deadline``; returns its id.

    It occupies nothing until then. Its idempotency key is the promotion's id, so
    asking again (a re-executed promotion) returns the same run, never a second one.
    """
    from prefect.deployments import run_deployment

    run = run_deployment(
        PROMOTION_TIMEOUT_DEPLOYMENT, parameters={"flow_run_id": flow_run_id}, scheduled_time=deadline,
        timeout=0, as_subflow=False, idempotency_key=f"promotion-timeout-{flow_run_id}", tags=list(tags),
    )
    assert isinstance(run, FlowRun)  # run_deployment is typed maybe-a-coroutine; sync callers get the run
    return str(run.id)


def end_expired(flow_run_id: str | UUID, wait: float = 120.0) -> str:
    """At its deadline, wake a promotion that is still suspended; it then records its timeout.

    A promotion acting on an answer (resumed, not suspended) is waited for: it either
    ends, or checks its deadline before it suspends again and ends timed out by
    itself. Returns what was found.
    """
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(str(flow_run_id)))
    ends = decide_by(run.tags or [])
    if ends is None:
        raise ValueError(f"flow run {flow_run_id} is not a promotion with a deadline (no decide-by tag)")
    early = (ends - datetime.now(UTC)).total_seconds()
    if early > 0:  # started early (clocks, a manual run): wait for the deadline itself
        time.sleep(early)
    if _wake(flow_run_id, TIMED_OUT_REASON, wait):
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(str(flow_run_id))).state
        return f"promotion {flow_run_id}: {state.name if state else 'no state'}"
    return f"promotion {flow_run_id} did not suspend within {wait:.0f}s; it checks its deadline before it does"


# --- events from short-lived processes -------------------------------------------------------


def emit_and_flush(event: str, resource: dict[str, str], payload: dict[str, Any], timeout: float = 10.0) -> None:
    """Emit a Prefect event and wait until it is sent: a command line exits right after.

    ``emit_event`` hands the event to a background worker; draining it is what makes
    sure the event left this process before the command ends.
    """
    emit_event(event=event, resource=resource, payload=payload)
    EventsWorker.drain_all(timeout=timeout)


# --- a run whose process is gone -----------------------------------------------------------------


def local_run_process_alive(flow_run_id: str | UUID) -> bool | None:
    """Whether the process running ``flow_run_id`` on *this* host is alive.

    A Running flow run is a live process of a worker (its ``infrastructure_pid``);
    when the worker is killed it goes too, but the run stays Running. (A suspended
    promotion has no process by design: this says nothing about it.) None when the run
    names no process or it cannot be inspected; only meaningful when the run's worker
    runs on this host (the embedded stack's does).
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
    """Record that the run's process is gone; a deployment's trigger on Crashed starts it again."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(UUID(str(flow_run_id)), Crashed(message=message), force=True)
