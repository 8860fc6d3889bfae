"""MLflow down and the worker killed, on the session's real stack: retried or failed clearly, never misread.

One small simulated tool (one model) is ingested into the stack's event store and
trained once as champion (a real ``retrain`` run). Then:

- the worker is killed with SIGKILL (its flow-run processes with it: the retraining's
  engine, forked by the fork server, dies with its launcher) in the middle of a
  retraining started on it, and restarted;
- MLflow is stopped while a drift check of the model's window and a retraining
  run: the champion lookup fails loudly (it is never read as "no champion"), both
  runs retry, and once MLflow is back the check judges the window against the
  champion and the challenger is scored against it;
- by then the killed run's heartbeats are overdue: the model's next breach closes
  its trigger as crashed and starts a retraining that actually runs.

The kill comes first so that its heartbeat timeout passes during the MLflow outage.
Outcomes are read from the event store, the Prefect REST API and the MLflow server.
"""

from __future__ import annotations

import contextvars
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import psutil
import pytest
from mlflow.exceptions import MlflowException

from fabloop.adapters import registry, store
from fabloop.adapters.run_states import flow_run_status
from fabloop.adapters.transient import is_transient
from fabloop.core.scopes import ModelCatalogValue
from fabloop.core.simulate import SimulationConfig, ToolSpec, simulate
from fabloop.infra.launcher import ping
from fabloop.infra.stack import forkserver_socket
from tests.helpers import drift as ds
from tests.helpers import faults
from tests.helpers import prefect_api as pa
from tests.helpers.retrain import mlflow_client, save_retrain_policy, start_broker
from tests.helpers.stack import RunningStack
from tests.helpers.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]



@dataclass
class Model:
    name: str
    champion: str
    windows: list[int]


@pytest.fixture(scope="module")
def model(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> Model:
    """One tool's wafers stored quietly (no drift checks) and a real first training as its champion."""
    prefix = f"F{uuid.uuid4().hex[:6]}"
    config = SimulationConfig(seed=31, wafers=500, n_sensors=10, tools=[ToolSpec(name=prefix)], lot_prefix=prefix,
                              target_fail_rate=0.12, pm_every_wafers=None, chamber_drift_per_500_wafers=0.0)
    running = start_broker(tmp_path_factory.mktemp("outage-broker"))
    try:
        ds.publish(running.broker.bootstrap, list(simulate(config)))
        closed = ds.ingest_quietly(running.broker.bootstrap, stack.ep.database_url, ModelCatalogValue(),
                                   f"outages-{prefix}")
    finally:
        running.stop()
    name = f"yield-{prefix}"
    windows = [w.id for w in closed if w.model == name]
    assert windows, closed
    champion = ds.train_champion(stack.ep.mlflow_tracking_uri, name, save_retrain_policy(n_trials=2, timeout_s=60))
    return Model(name, champion, windows)


@dataclass
class Killed:
    trigger_id: int
    flow_run_id: str
    pids: list[int]


@pytest.fixture(scope="module")
def killed(stack: RunningStack, model: Model, deployments: None) -> Iterator[Killed]:
    """A retraining started on the worker as a breach would start it, then the worker killed -9 and restarted."""
    since = datetime.now(UTC)  # prefect.yaml's retrain deployment beats every 30 s
    first = _decide(stack, model.name)
    assert first.started, first
    # A long search: the run is surely still training when the worker dies.
    run_id = _start_retrain(stack, model.name, first.trigger_id, save_retrain_policy(n_trials=500, timeout_s=600))

    def beating() -> bool:  # running, with two heartbeats (so its interval is known)
        status = store.run_sync(flow_run_status(run_id))
        return bool(status and status.state == "RUNNING" and status.heartbeat_interval
                    and status.heartbeat_interval < timedelta(seconds=60))

    wait_for("the retraining running with heartbeats", beating, timeout=150, interval=3)
    # Its engine was forked by the stack's fork server (fabloop.infra.forkserver), not
    # started by the worker: killing the worker's tree must take it too.
    server = ping(str(forkserver_socket(stack.ep)))
    assert server is not None, "the stack's fork server does not answer"
    [engine] = [int(pid) for pid, run in server["engines"].items() if run == run_id]
    assert psutil.Process(engine).ppid() == server["pid"]
    pids = faults.kill(stack, "worker")
    wait_for("the forked engine killed with the worker", lambda: not psutil.pid_exists(engine), timeout=10,
             interval=0.2)
    assert pa.flow_run(stack, run_id)["state_type"] == "RUNNING"  # nobody told Prefect
    faults.restart(stack)
    yield Killed(first.trigger_id, run_id, pids)
    ds.cancel_unfinished(stack, ["retrain"], [model.name], since)


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` beside the test, in the test's Prefect context (the stack's API URL)."""
    out: dict[str, Any] = {}
    ctx = contextvars.copy_context()

    def target() -> None:
        try:
            out["value"] = ctx.run(fn)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def _task_runs(stack: RunningStack, flow_run_id: str) -> dict[str, int]:
    """Task name → highest run count in the flow run (a count above 1 is a retry)."""
    runs = pa.api(stack, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200})
    counts: dict[str, int] = {}
    for r in runs:
        name = r["name"].rsplit("-", 1)[0]
        counts[name] = max(counts.get(name, 0), r["run_count"])
    return counts


def test_mlflow_down_during_a_drift_check_and_a_retraining_is_retried_never_read_as_no_champion(
    stack: RunningStack, model: Model, killed: Killed
) -> None:
    from fabloop.core.policies import RetrainPolicy
    from fabloop.flows.drift_check import drift_check
    from fabloop.flows.retrain import retrain
    from fabloop.tasks.retraining import score_champion

    window_id = model.windows[-1]
    client = registry.client(stack.ep.mlflow_tracking_uri)
    policy = save_retrain_policy(n_trials=2, timeout_s=60)
    with faults.outage(stack, "mlflow"):
        check, checked = _in_thread(lambda: drift_check(window_id=window_id, retrain="off", return_state=True))
        training, trained = _in_thread(lambda: retrain(model=model.name, reasons=["fault test: MLflow down"],
                                                       policy_block=policy, promotion="off", return_state=True))
        # What the challenger gate is given while MLflow is down: an error, never "no champion".
        with pytest.raises(MlflowException) as failed:
            score_champion.fn(client, model.name, pd.DataFrame(), RetrainPolicy())
        assert is_transient(failed.value), failed.value
        time.sleep(5)  # past the first attempt of each run's first MLflow call
        assert check.is_alive() and training.is_alive(), (checked, trained)  # retrying, not done on a guess
    check.join(timeout=300)
    training.join(timeout=300)
    assert not check.is_alive() and not training.is_alive(), "not finished within the retries after MLflow returned"

    # The drift check: judged against the champion; never "no_champion".
    state = checked["value"]
    assert state.is_completed(), (state, checked.get("error"))
    rows = ds.checks(stack.ep.database_url, [window_id])
    assert [r for r in rows if r.status == "no_champion"] == [], "an outage was read as 'no champion'"
    [row] = rows  # one check per window
    assert row.reference and f"v{model.champion} " in row.reference, row.reference
    assert row.flow_run_id == str(state.state_details.flow_run_id)
    assert _task_runs(stack, row.flow_run_id).get("find champion", 0) > 1, "the champion lookup was not retried"

    # The retraining: the challenger was scored against the real champion.
    state = trained["value"]
    assert state.is_completed(), (state, trained.get("error"))
    summary = state.result()
    assert summary["champion_version"] == model.champion and summary["champion_note"] == "ok", summary
    tags = mlflow_client(stack).get_model_version(model.name, summary["version"]).tags
    assert tags["fabloop.champion_at_validation"] == model.champion
    assert _task_runs(stack, str(state.state_details.flow_run_id)).get("train challenger", 0) > 1


def test_worker_killed_during_a_retraining_does_not_block_the_next_breach(
    stack: RunningStack, model: Model, killed: Killed
) -> None:
    # Once the dead run's heartbeats are overdue, a reconcile (the next breach runs one)
    # closes its trigger as crashed and marks the run Crashed in Prefect.
    def reconciled() -> bool:
        return killed.trigger_id in store.run_sync(_reconcile(stack, model.name))

    wait_for("the dead retraining's trigger closed", reconciled, timeout=150, interval=5)
    [trigger] = [t for t in ds.triggers(stack.ep.database_url, [model.name]) if t.id == killed.trigger_id]
    assert trigger.outcome == "crashed" and trigger.finished_at is not None
    assert pa.flow_run(stack, killed.flow_run_id)["state_type"] == "CRASHED"

    second = _decide(stack, model.name)
    assert second.started, f"the next breach was suppressed: {second.reason} (killed pids {killed.pids})"
    # And the retraining it starts runs: the dead run's concurrency slot was released.
    next_run = _start_retrain(stack, model.name, second.trigger_id, save_retrain_policy(n_trials=500, timeout_s=600))
    wait_for("the next retraining running", lambda: pa.flow_run(stack, next_run)["state_type"] == "RUNNING",
             timeout=120, interval=3)


def _decide(stack: RunningStack, model: str) -> store.TriggerDecision:
    """The decision a breaching drift check takes (the same store call, reconcile included)."""

    async def run() -> store.TriggerDecision:
        async with store.engine_for(stack.ep.database_url) as engine:
            return await store.decide_retrain(engine, model, "fault test: breach", timedelta(minutes=60))

    return store.run_sync(run())


def _start_retrain(stack: RunningStack, model: str, trigger_id: int, policy: str) -> str:
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    run = run_deployment("retrain/retrain", timeout=0, parameters={
        "model": model, "reasons": ["fault test"], "trigger_id": trigger_id, "policy_block": policy,
        "promotion": "off"})
    assert isinstance(run, FlowRun)
    store.run_sync(_attach(stack, trigger_id, str(run.id)))
    return str(run.id)


async def _attach(stack: RunningStack, trigger_id: int, flow_run_id: str) -> None:
    async with store.engine_for(stack.ep.database_url) as engine:
        await store.attach_flow_run(engine, trigger_id, flow_run_id)


async def _reconcile(stack: RunningStack, model: str) -> dict[int, str]:
    async with store.engine_for(stack.ep.database_url) as engine:
        return await store.reconcile_triggers(engine, model)
