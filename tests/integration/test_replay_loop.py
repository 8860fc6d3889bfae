"""``fabloop replay`` of a SECOM-shaped history drives the real loop to a drift-triggered retraining.

Issue 7's acceptance: a 1,567-row × 590-sensor table with time stamps over three
months, replayed with the real ``fabloop replay`` into a broker and stored by the
real ``fabloop ingest`` in the session stack's event store, leads to at least one
drift-triggered retraining. Nothing in between is called by the test: each closed
window is announced as ``fabloop.window.closed``, the trigger that ``fabloop deploy``
applies runs the ``drift-check`` deployment on the stack's worker, and a breach
starts the ``retrain`` deployment as its child run.

The history is replayed as a fab would bring it in, in two exports. The first (800
wafers, no drift) gives the model its first windows; the first of them asks for a
first training (no champion yet), and the test approves that challenger as the
initial champion under the main job's bootstrap approver, through the same resume
call as the UI. The second export (767 wafers) holds the drift, a strong mean shift
on most sensors; its windows are judged against the champion's training set.
Outcomes are read from the event store, the Prefect REST API and the MLflow
registry.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import select

from fabloop.adapters.store import SensorReadingRow, WindowWaferRow
from fabloop.core.schemas import SENSOR_TOPIC
from fabloop.mainjob import BOOTSTRAP_APPROVER
from tests.helpers import drift as ds
from tests.helpers import prefect_api as pa
from tests.helpers.secom_table import LABEL_COL, TIME_COL, SecomShape, secom_table, write_parts
from tests.helpers.stack import Broker, RunningStack, fabloop

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPLIT_AT = 800  # the first export: four full windows of 200 wafers, all before the drift
# The drift starts with the second export, so every window it closes holds only drifted
# wafers, whatever order ingest consumes the partitions in: each of those windows must
# breach on data drift, and none can breach by chance alone.
SHAPE = SecomShape(shift_from=SPLIT_AT)
WINDOW_WAFERS = 200  # the default model catalog's window size (the test keeps the default)
T = TypeVar("T")


@dataclass
class Loop:
    """The deployed loop on the session stack, and what this test started on it."""

    stack: RunningStack
    since: datetime
    models: list[str] = field(default_factory=list)
    window_ids: list[int] = field(default_factory=list)


def _runs(loop: Loop, flow_name: str) -> list[dict[str, Any]]:
    """Runs of ``flow_name`` expected to start since the test began (filtered by the server)."""
    body = {"flows": {"name": {"any_": [flow_name]}},
            "flow_runs": {"expected_start_time": {"after_": loop.since.isoformat()}},
            "sort": "EXPECTED_START_TIME_ASC", "limit": 200}
    return pa.api(loop.stack, "POST", "/flow_runs/filter", body)


def _mine(loop: Loop, run: dict[str, Any]) -> bool:
    params = run["parameters"]
    return params.get("model") in loop.models or int(params.get("window_id", -1)) in loop.window_ids


def _cancel_and_settle(loop: Loop, timeout: float = 180) -> None:
    """Stop what this test left running (a retraining, a paused promotion, pending checks).

    A run that has started is set CANCELLING and its process stops it; one that never
    started (scheduled, or awaiting a concurrency slot) is set CANCELLED: no worker
    looks at a CANCELLING run that it has not picked up, so it would stay there.
    """
    pending = []
    for name in ("drift-check", "retrain", "promote"):
        for run in _runs(loop, name):
            if not _mine(loop, run) or run["state_type"] in pa.FINAL:
                continue
            to = ("CANCELLING", "Cancelling") if run["start_time"] else ("CANCELLED", "Cancelled")
            pa.api(loop.stack, "POST", f"/flow_runs/{run['id']}/set_state",
                   {"state": {"type": to[0], "name": to[1], "message": "test teardown"}, "force": True})
            pending.append(run["id"])
    for run_id in pending:  # ended, and the retrain deployment's concurrency slot is free again
        pa.wait_final(loop.stack, run_id, timeout)


@pytest.fixture
def loop(stack: RunningStack, deployments: None) -> Iterator[Loop]:
    """The session's deployments, the window trigger on, the bootstrap approver on the allowlist; undone afterwards."""
    from fabloop.blocks import DEFAULT, ApprovalPolicy

    since = datetime.now(UTC)
    ds.set_automation(stack, ds.WINDOW_TRIGGER, enabled=True)
    policy = ApprovalPolicy.load(DEFAULT)
    approvers_before = list(policy.approvers)
    if not policy.allows(BOOTSTRAP_APPROVER):  # as the main job does, and says so
        policy.approvers = [*policy.approvers, BOOTSTRAP_APPROVER]
        policy.save(DEFAULT, overwrite=True)
    state = Loop(stack=stack, since=since)
    try:
        yield state
    finally:
        try:
            _cancel_and_settle(state)
        finally:
            # Window events of other modules' private stores must not start checks here.
            ds.set_automation(stack, ds.WINDOW_TRIGGER, enabled=False)
            ds.set_model_overrides({m: None for m in state.models})
            policy = ApprovalPolicy.load(DEFAULT)
            policy.approvers = approvers_before
            policy.save(DEFAULT, overwrite=True)


# --------------------------------------------------------------------------- helpers


def _replay(stack: RunningStack, broker: Broker, table: Path, tool: str) -> str:
    """The real command, with the options the README gives for SECOM (no wafer ids: @line)."""
    return fabloop(
        "replay", str(table), "--secom", "--timestamp-col", TIME_COL, "--label-col", LABEL_COL,
        "--wafer-col", "@line", "--default", f"tool={tool}", "--bootstrap-servers", broker.bootstrap,
        env=stack.env,
    ).stdout


def _ingest(stack: RunningStack, broker: Broker) -> str:
    """The real ``fabloop ingest`` into the stack's event store (its ``default`` database block)."""
    return fabloop("ingest", "--bootstrap-servers", broker.bootstrap, "--max-idle", "3", env=stack.env,
                   timeout=300).stdout


def _wait(what: str, check: Callable[[], T | None], timeout: float, interval: float = 3.0,
          fail_fast: Callable[[], None] | None = None) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if fail_fast is not None:
            fail_fast()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _no_broken_runs(loop: Loop) -> Callable[[], None]:
    """Fail at once, with the server's message, if a run of this loop failed or crashed."""

    def check() -> None:
        broken = []
        for name in ("drift-check", "retrain", "promote"):
            for run in _runs(loop, name):
                if _mine(loop, run) and run["state_type"] in ("FAILED", "CRASHED"):
                    broken.append((name, run["name"], run["state"]["message"]))
        assert not broken, f"runs of the loop failed: {broken}"

    return check


def _closed_windows(stack: RunningStack, model: str) -> list[Any]:
    return ds.closed_windows(stack.ep.database_url, [model])


def _share_from(stack: RunningStack, window_id: int, table: Path) -> float:
    """Share of a window's wafers that come from ``table`` (``@line`` ids start with its name)."""
    wafers = [w for (w,) in ds.query(stack.ep.database_url, select(SensorReadingRow.wafer).join(
        WindowWaferRow, WindowWaferRow.event_id == SensorReadingRow.event_id
    ).where(WindowWaferRow.window_id == window_id))]
    stem = table.name.split(".")[0]
    return sum(w.startswith(f"{stem}-") for w in wafers) / len(wafers)


def _checks_done(loop: Loop, window_ids: list[int]) -> list[ds.DriftCheckRow] | None:
    """The checks of these windows once each is stored by a finished ``drift-check`` run."""
    rows = ds.checks(loop.stack.ep.database_url, window_ids)
    runs = {r["id"]: r for r in _runs(loop, "drift-check")}
    done = {r.window_id for r in rows if r.flow_run_id in runs and runs[r.flow_run_id]["state_type"] in pa.FINAL}
    return rows if done >= set(window_ids) else None


def _timeline(loop: Loop, t0: datetime) -> str:
    """When each run of the loop started and ended, in seconds since ``t0`` (for the log)."""
    lines = []
    for name in ("drift-check", "retrain", "promote"):
        for run in _runs(loop, name):
            if not _mine(loop, run):
                continue
            start, end = (run.get(k) for k in ("start_time", "end_time"))
            at = [f"{(datetime.fromisoformat(v) - t0).total_seconds():.0f}s" if v else "-" for v in (start, end)]
            what = run["parameters"].get("window_id", run["parameters"].get("model"))
            lines.append(f"{name}({what}) {run['state_name']} {at[0]}→{at[1]}")
    return "; ".join(lines)


# --------------------------------------------------------------------------- the test


HISTORY_COOLDOWN_MINUTES = 120 * 24 * 60


def test_replay_of_a_secom_shaped_history_leads_through_the_loop_to_a_drift_triggered_retraining(
    stack: RunningStack, broker: Broker, loop: Loop, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from fabloop.adapters import prefect_api as approvals

    t_start, t0 = time.monotonic(), datetime.now(UTC)
    marks: list[tuple[str, float]] = []

    def mark(what: str) -> None:
        marks.append((what, time.monotonic() - t_start))

    db = stack.ep.database_url
    tool = f"SECOM{uuid.uuid4().hex[:6].upper()}"
    model = f"yield-{tool}"
    loop.models.append(model)
    # Cooldowns count event time too: the replayed drift windows are ~11 days of wafers
    # apart, so a check that ran after the drift retraining ended would rightly start
    # another. A cooldown longer than the history keeps the drifted export one episode.
    ds.set_model_overrides({model: {"cooldown_minutes": HISTORY_COOLDOWN_MINUTES}})
    frame = secom_table(SHAPE)
    assert frame.shape == (1567, 592)  # Time, 590 sensors, Pass/Fail
    first_day = datetime.strptime(frame[TIME_COL].iloc[0], "%d/%m/%Y %H:%M:%S")
    last_day = datetime.strptime(frame[TIME_COL].iloc[-1], "%d/%m/%Y %H:%M:%S")
    assert 85 <= (last_day - first_day).days <= 91  # three months
    part1, part2 = write_parts(frame, tmp_path, SPLIT_AT, tool.lower())
    fail = _no_broken_runs(loop)

    # ---- the first export: no drift; the model's first windows and its first training.
    out = _replay(stack, broker, part1, tool)
    assert f"{SPLIT_AT} rows, 590 sensor columns" in out and "no bad rows" in out, out
    assert f"published {SPLIT_AT} sensor events to {SENSOR_TOPIC} and {SPLIT_AT} test events" in out, out
    _ingest(stack, broker)
    mark("part 1 replayed and ingested")
    windows = _closed_windows(stack, model)
    assert [w.wafer_count for w in windows] == [WINDOW_WAFERS] * (SPLIT_AT // WINDOW_WAFERS)
    assert all(w.announced for w in windows), "each closed window is announced to Prefect"
    loop.window_ids.extend(w.id for w in windows)

    # The second export goes to Kafka now; it is ingested only once there is a champion.
    out = _replay(stack, broker, part2, tool)
    rest = len(frame) - SPLIT_AT
    assert f"published {rest} sensor events to {SENSOR_TOPIC} and {rest} test events" in out, out
    mark("part 2 replayed")

    # The first full window has no champion to be compared with: it asks for a first
    # training, whose challenger waits for approval. Bootstrap it, explicitly.
    pending = _wait(f"the first challenger of {model} awaiting approval",
                    lambda: approvals.pending_promotions(model), timeout=600, fail_fast=fail)
    mark("first training paused for approval")
    (first,) = pending
    left = approvals.resume_promotion(first.flow_run_id, "approve", BOOTSTRAP_APPROVER,
                                      "bootstrap: initial champion of a replayed history (test)")
    outcome = approvals.wait_for_outcome(first.flow_run_id, left, timeout=120)
    assert outcome is not None and outcome.is_completed(), outcome
    client = MlflowClient(tracking_uri=stack.ep.mlflow_tracking_uri, registry_uri=stack.ep.mlflow_tracking_uri)
    champion = client.get_model_version_by_alias(model, "champion")
    assert champion.version == first.version
    mark("initial champion approved")
    first_triggers = [t for t in ds.triggers(db, [model]) if t.action == "started"]
    assert [t.kind for t in first_triggers] == ["first_training"], [(t.kind, t.reason) for t in first_triggers]
    phase1 = _wait("the checks of the first export's windows", lambda: _checks_done(loop, loop.window_ids),
                   timeout=300, fail_fast=fail)
    assert len(phase1) == len(loop.window_ids), "each window is judged exactly once"
    assert all(r.status in ("no_champion", "ok") and not r.drifted for r in phase1), \
        [(r.window_id, r.status, r.reason) for r in phase1]

    # ---- the second export: the drift, judged against the champion's training set.
    _ingest(stack, broker)
    mark("part 2 ingested")
    windows = _closed_windows(stack, model)
    assert len(windows) == len(frame) // WINDOW_WAFERS == 7
    new_ids = [w.id for w in windows if w.id not in loop.window_ids]
    loop.window_ids.extend(new_ids)

    def drift_retraining() -> Any:
        started = [t for t in ds.triggers(db, [model]) if t.action == "started"
                   and t.kind in ("drift", "performance") and t.flow_run_id]
        return started[0] if started else None

    trigger = _wait(f"a drift-triggered retraining of {model}", drift_retraining, timeout=600, fail_fast=fail)
    mark("drift-triggered retraining started")

    # The check that decided it judged a window of the drifted export against the champion.
    (check,) = ds.checks(db, [trigger.window_id])
    assert check.id == trigger.check_id and check.window_id in new_ids
    assert check.reference.startswith(f"{model} v{champion.version} training set"), check.reference
    drifted_wafers = _share_from(stack, check.window_id, part2)
    assert drifted_wafers == 1.0, f"the deciding window holds wafers of the first export ({drifted_wafers:.0%} drifted)"
    assert trigger.kind == "drift" and check.drifted and check.share >= 0.5, (trigger.kind, check.reason)

    # The retraining is the ``retrain`` deployment's run, a child of that check's run.
    run = pa.flow_run(stack, trigger.flow_run_id)
    assert run["parameters"]["model"] == model
    assert run["parameters"]["drift_check_id"] == check.id and run["parameters"]["window_ids"] == [check.window_id]
    assert run["deployment_id"] == pa.deployment_id(stack, "retrain", "retrain")
    assert pa.parent_flow_run_id(stack, run) == check.flow_run_id
    assert pa.flow_run(stack, check.flow_run_id)["deployment_id"] == pa.deployment_id(
        stack, "drift-check", "drift-check"
    )
    retrains = [r for r in _runs(loop, "retrain") if r["parameters"].get("model") == model]
    assert sorted(r["id"] for r in retrains) == sorted([first_triggers[0].flow_run_id, run["id"]]), \
        "the first training and the drift retraining, nothing else"
    print(f"\nreplay loop ({model}, window {check.window_id}, {check.share:.0%} of sensors drifted): "
          + ", ".join(f"{what} {t:.0f}s" for what, t in marks))
    print("runs: " + _timeline(loop, t0))

