"""What Prefect knows about a retraining's flow run: its state, and whether its process still lives.

A run whose process was killed (``kill -9``, a lost host, a worker killed with its
children) never reports an end: Prefect shows it ``Running`` for ever. Its
heartbeats tell it apart: a live flow run emits ``prefect.flow-run.heartbeat``
every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (the ``retrain`` deployment
sets 30 in ``prefect.yaml``); a run silent for two of its intervals and a margin is
gone, and is marked ``Crashed`` (which also frees its deployment concurrency slot).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings
from prefect.states import Crashed

__all__ = ["HEARTBEAT", "RunStatus", "flow_run_status", "mark_crashed"]

HEARTBEAT = "prefect.flow-run.heartbeat"
# Missed heartbeats (plus a margin for a busy host) before a running run counts as gone.
_MISSED_BEATS, _MARGIN = 2, timedelta(seconds=15)


@dataclass(frozen=True)
class RunStatus:
    """A flow run's state type (``RUNNING``, ``CRASHED``, …) and when its process last gave a sign of life."""

    flow_run_id: str
    state: str
    state_name: str
    last_heartbeat: datetime | None = None
    heartbeat_interval: timedelta | None = None

    def gone(self, now: datetime) -> bool:
        """Running (or pending) by Prefect's account, but its process has stopped beating."""
        if self.state not in ("RUNNING", "PENDING") or self.last_heartbeat is None or self.heartbeat_interval is None:
            return False
        return now - self.last_heartbeat > _MISSED_BEATS * self.heartbeat_interval + _MARGIN


async def flow_run_status(flow_run_id: str) -> RunStatus | None:
    """The run's state and heartbeats; None when Prefect has no such run (it was never created, or deleted).

    An unreachable Prefect API raises: "cannot ask" is not "not there".
    """
    async with get_client() as client:
        try:
            run = await client.read_flow_run(UUID(flow_run_id))
        except ObjectNotFound:
            return None
        state = run.state.type.value if run.state else "SCHEDULED"
        name = (run.state.name if run.state else None) or state.title()
        if state not in ("RUNNING", "PENDING"):
            return RunStatus(flow_run_id, state, name)
        now = datetime.now(UTC)
        flt = EventFilter(
            occurred=EventOccurredFilter(since=run.start_time or now - timedelta(days=1),
                                         until=now + timedelta(minutes=1)),
            event=EventNameFilter(name=[HEARTBEAT]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
        )
        beats = sorted((e.occurred for e in (await client.read_events(filter=flt, limit=2)).events), reverse=True)
    if not beats:
        # No heartbeat yet (just started) or heartbeats switched off: no evidence it is gone.
        return RunStatus(flow_run_id, state, name)
    default = timedelta(seconds=get_current_settings().flows.heartbeat_frequency or 180)
    interval = beats[0] - beats[1] if len(beats) > 1 else default
    return RunStatus(flow_run_id, state, name, last_heartbeat=beats[0], heartbeat_interval=max(interval, timedelta(0)))


async def mark_crashed(flow_run_id: str, message: str) -> None:
    """Put a run whose process is gone into ``Crashed`` (its concurrency slot is released with it)."""
    async with get_client() as client:
        await client.set_flow_run_state(UUID(flow_run_id), Crashed(message=message), force=True)
