"""The Prefect server down for a minute while ingest closes windows: every window is still judged, once.

The real ``Ingestor`` runs beside the test with the ingest flow's announcer
(``flows.ingest.announce_window``), storing a small simulated tool into the
session stack's event store. The Prefect server is stopped before the wafers
arrive and kept down for a minute, so every window closes while no event can be
accepted: ingest goes on storing, and leaves those windows unannounced. Once the
server is back, the ingestor's sweep announces them, ``prefect.yaml``'s trigger
runs the ``drift-check`` deployment on the worker, and each window gets exactly
one check. A second check of a judged window finds the claim; an open window is
refused. Outcomes are read from the event store and the Prefect REST API.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select

from fabloop.adapters.ingestor import Ingestor, IngestSettings
from fabloop.adapters.store import DriftCheckRow, WindowNotClosed, WindowRow, make_engine
from fabloop.core.scopes import ModelCatalogValue, ModelSpec
from fabloop.core.simulate import SimulationConfig, ToolSpec, simulate
from tests.helpers import drift as ds
from tests.helpers import faults
from tests.helpers import prefect_api as pa
from tests.helpers.ingest import query
from tests.helpers.stack import Broker, RunningStack
from tests.helpers.waiting import wait_for as _wait

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WINDOW_WAFERS, WAFERS = 10, 35  # three closed windows and one left open
OUTAGE_S = 60


@pytest.fixture
def deployed(stack: RunningStack, deployments: None) -> Iterator[datetime]:
    """The session's deployments with the window trigger on; afterwards it is off and this test's checks stopped."""
    since = datetime.now(UTC)
    with ds.window_trigger(stack):
        yield since
    for run in pa.runs_of_flow(stack, "drift-check", since):
        if run["state_type"] not in pa.FINAL:
            pa.api(stack, "POST", f"/flow_runs/{run['id']}/set_state",
                   {"state": {"type": "CANCELLED", "name": "Cancelled", "message": "test teardown"}, "force": True})


class IngestThread:
    """The real ingestor with the ingest flow's announcer, beside the test, in its Prefect context."""

    def __init__(self, stack: RunningStack, broker: Broker, catalog: ModelCatalogValue, group: str) -> None:
        from fabloop.flows.ingest import announce_window

        self.stop = threading.Event()
        self.error: BaseException | None = None
        settings = IngestSettings(
            batch_size=200, consumer_name="prefect-outage", window_check_interval_s=1,
            announce_retry_initial_s=1, announce_retry_max_s=4,
            # Only this test's windows are young enough to be swept (the store is the session's).
            recheck_after_s=120, recheck_horizon_s=600,
        )

        async def run() -> None:
            engine = make_engine(stack.ep.database_url, pooled=True)
            try:
                await Ingestor(broker.conf, engine, catalog, group=group, settings=settings,
                               announce=announce_window).run(self.stop)
            finally:
                await engine.dispose()

        ctx = contextvars.copy_context()  # the stack's Prefect API URL

        def target() -> None:
            try:
                ctx.run(asyncio.run, run())
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive() and self.error is None, self.error


def _windows(db: str, model: str) -> list[Any]:
    return query(db, select(WindowRow.id, WindowRow.status, WindowRow.announced, WindowRow.announced_at)
                 .where(WindowRow.model == model).order_by(WindowRow.id))


def test_prefect_down_for_a_minute_while_windows_close_then_every_window_is_checked_once(
    stack: RunningStack, broker: Broker, deployed: datetime
) -> None:
    from fabloop.flows.drift_check import drift_check

    db = stack.ep.database_url
    prefix = f"P{uuid.uuid4().hex[:6]}"
    model = f"{prefix.lower()}-{prefix}"
    catalog = ModelCatalogValue(models=[ModelSpec(name=prefix.lower(), window_wafers=WINDOW_WAFERS,
                                                  window_minutes=1e6)])
    events = list(simulate(SimulationConfig(seed=12, wafers=WAFERS, n_sensors=8, tools=[ToolSpec(name=prefix)],
                                            lot_prefix=prefix, pm_every_wafers=None)))
    ingest = IngestThread(stack, broker, catalog, f"prefect-outage-{prefix}")
    try:
        with faults.outage(stack, "prefect"):
            down_since = time.monotonic()
            ds.publish(broker.bootstrap, events)
            windows = _wait("the windows closed while Prefect is down",
                            lambda: (w := _windows(db, model)) and sum(r.status == "closed" for r in w) == 3 and w,
                            timeout=OUTAGE_S)
            # Stored and closed, but not announced: no event could be accepted.
            assert [(r.status, r.announced) for r in windows] == [("closed", False)] * 3 + [("open", False)]
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_since)))
            assert ingest.thread.is_alive(), ingest.error
            assert not any(r.announced for r in _windows(db, model)), "announced while the Prefect API was down"

        closed = [r.id for r in windows if r.status == "closed"]
        (open_window,) = [r.id for r in windows if r.status == "open"]

        def judged() -> list[DriftCheckRow] | None:
            rows = ds.checks(db, closed)
            runs = {r["id"]: r for r in pa.runs_of_flow(stack, "drift-check", deployed)}
            done = [r for r in rows if r.status != "claimed" and runs.get(r.flow_run_id, {}).get("state_type")
                    in pa.FINAL]
            return rows if len(done) == len(closed) else None

        rows = _wait("a drift check of every window closed during the outage", judged, timeout=300, interval=3)
    finally:
        ingest.close()

    # Each window: announced once the API was back, and judged by exactly one check.
    assert all(r.announced and r.announced_at for r in _windows(db, model) if r.id in closed)
    assert Counter(r.window_id for r in rows) == dict.fromkeys(closed, 1)
    assert all(r.status == "window_too_small" and r.model == model for r in rows), [r.reason for r in rows]
    runs = [r for r in pa.runs_of_flow(stack, "drift-check", deployed)
            if int(r["parameters"].get("window_id", -1)) in closed]
    drift_check_deployment = pa.deployment_id(stack, "drift-check", "drift-check")
    for r in rows:
        run = pa.flow_run(stack, r.flow_run_id)
        assert run["deployment_id"] == drift_check_deployment and run["parameters"]["window_id"] == r.window_id
    # More runs than windows only if the sweep announced a window again: those find the claim, and none fails.
    failed = [(r["name"], r["state_name"]) for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
    assert not failed, failed

    # A second check of a judged window finds its check and changes nothing.
    again = drift_check(window_id=closed[0], retrain="off")
    first = next(r for r in rows if r.window_id == closed[0])
    assert again == {"window_id": closed[0], "check_id": first.id, "duplicate": True}
    assert [(r.id, r.flow_run_id, r.status) for r in ds.checks(db, closed)] == [
        (r.id, r.flow_run_id, r.status) for r in rows]

    # A window still filling is refused, by name and status, and gets no check.
    state = drift_check(window_id=open_window, retrain="off", return_state=True)
    assert state.is_failed()
    with pytest.raises(WindowNotClosed, match=rf"window {open_window} of {model} is 'open', not closed"):
        state.result()
    assert ds.checks(db, [open_window]) == []
    assert query(db, select(DriftCheckRow.id).where(DriftCheckRow.window_id == open_window)) == []
