"""Shared by the retraining tests: a simulated fab with one tool per scenario, ingested once.

Every scenario is a tool of its own (so a model of its own, ``yield-<tool>``) with
its own lot prefix (so wafer ids never collide in the stack's event store). The
events go through a private broker and the real ``fabloop ingest`` command into the
store that the stack's ``default`` database block points at, which is where the
``retrain`` flow reads its training sets from.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from fabloop.adapters.kafka import broker_healthy, ensure_topics, make_producer, publish_events
from fabloop.adapters.store import WindowRow
from fabloop.core.schemas import TOPICS, SensorReading, TestResult
from fabloop.core.simulate import DriftInjection, SimulationConfig, ToolSpec, simulate
from fabloop.infra.process import ProcessManager, free_port, wait_until
from fabloop.infra.stack import broker_command
from tests.helpers.ingest import finish, query, start_ingest
from tests.helpers.stack import Broker, RunningStack

N_SENSORS = 30
WINDOW_WAFERS = 400
MISSING_SENSOR = "chuck_temp_mean"


@dataclass(frozen=True)
class Scenario:
    """One tool's share of the simulated fab and what it is meant to provoke."""

    key: str
    wafers: int
    seed: int
    missing_share: float = 0.0  # share of wafers whose MISSING_SENSOR reads None
    all_pass: bool = False  # the tester reports every wafer as passing


SCENARIOS = (
    Scenario("GOOD", wafers=2000, seed=3),  # plenty of labelled wafers, learnable signal
    Scenario("CHAMP", wafers=2000, seed=4),  # a strong champion, then a weak challenger
    Scenario("NAN", wafers=400, seed=5, missing_share=0.95),  # one sensor 95% missing
    Scenario("ONE", wafers=400, seed=6, all_pass=True),  # one class only
    Scenario("FEW", wafers=120, seed=7),  # too few rows
)


@dataclass
class Fab:
    """What the module's ingest produced: model names and closed windows per scenario."""

    prefix: str
    catalog: str
    models: dict[str, str]
    events: dict[str, list[SensorReading | TestResult]]
    ingest_output: str

    def windows(self, stack: RunningStack, key: str) -> list[tuple[int, dict[str, Any]]]:
        """(id, offsets) of the scenario's closed windows, oldest first."""
        rows = query(
            stack.ep.database_url,
            select(WindowRow.id, WindowRow.offsets)
            .where(WindowRow.model == self.models[key], WindowRow.status == "closed")
            .order_by(WindowRow.id),
        )
        return [(int(i), dict(o)) for i, o in rows]


def scenario_events(prefix: str, sc: Scenario) -> list[SensorReading | TestResult]:
    drifts = []
    if sc.missing_share:
        drifts.append(DriftInjection(kind="nan", sensors=[MISSING_SENSOR],
                                     from_wafer=round(sc.wafers * (1 - sc.missing_share))))
    config = SimulationConfig(
        seed=sc.seed, wafers=sc.wafers, n_sensors=N_SENSORS, lot_prefix=f"{prefix}{sc.key}",
        tools=[ToolSpec(name=f"{prefix}-{sc.key}", chambers=["A", "B"])], drifts=drifts,
    )
    events = list(simulate(config))
    if not sc.all_pass:
        return events
    # Hand-built sort results: the prober reported every wafer of this tool as good.
    readings = [e for e in events if isinstance(e, SensorReading)]
    passed = [
        TestResult(ts=r.ts + timedelta(hours=6), lot=r.lot, wafer=r.wafer, program="SORT1", stage="wafer_sort",
                   passed=True, yield_pct=97.5, hard_bin=1, soft_bin=1)
        for r in readings
    ]
    return [*readings, *passed]


@dataclass
class ModuleBroker:
    broker: Broker
    pm: ProcessManager

    def stop(self) -> None:
        self.pm.stop("kafka")


def start_broker(home: Path) -> ModuleBroker:
    """A private broker shared by one test module (conftest's ``broker`` is per test)."""
    port = free_port()
    pm = ProcessManager(home)
    pm.start("kafka", broker_command("127.0.0.1", port), env=dict(os.environ))
    b = Broker(f"127.0.0.1:{port}")
    wait_until(lambda: broker_healthy(b.conf), 30, what="broker")
    ensure_topics(b.conf, 3, TOPICS)
    return ModuleBroker(b, pm)


def build_fab(stack: RunningStack, broker: Broker) -> Fab:
    """Publish every scenario, then ingest them with the real CLI into the stack's store."""
    from fabloop.blocks import ModelCatalog
    from fabloop.core.scopes import ModelSpec

    prefix = f"R{uuid.uuid4().hex[:6]}"
    catalog = f"retrain-{prefix.lower()}"
    ModelCatalog(models=[ModelSpec(name="yield", window_wafers=WINDOW_WAFERS, window_minutes=1e6)]).save(
        catalog, overwrite=True
    )
    events = {sc.key: scenario_events(prefix, sc) for sc in SCENARIOS}
    stats = publish_events(make_producer(broker.conf), [e for evs in events.values() for e in evs])
    assert stats.failed == 0
    out = finish(start_ingest(stack, broker, stack.ep.database_url, "--catalog", catalog), timeout=300)
    models = {sc.key: f"yield-{prefix}-{sc.key}" for sc in SCENARIOS}
    return Fab(prefix=prefix, catalog=catalog, models=models, events=events, ingest_output=out)


def save_retrain_policy(**fields: Any) -> str:
    """A RetrainPolicy block of the test's own (small budget unless told otherwise)."""
    from fabloop.blocks import RetrainPolicyBlock
    from fabloop.core.policies import RetrainPolicy

    name = f"retrain-test-{uuid.uuid4().hex[:8]}"
    RetrainPolicyBlock(policy=RetrainPolicy(**{"n_trials": 8, "timeout_s": 120, **fields})).save(name, overwrite=True)
    return name


def mlflow_client(stack: RunningStack) -> Any:
    from mlflow import MlflowClient

    uri = stack.ep.mlflow_tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def versions(stack: RunningStack, model: str) -> list[Any]:
    return list(mlflow_client(stack).search_model_versions(f"name='{model}'"))


def module_broker(tmp_path_factory: Any) -> Iterator[Broker]:
    running = start_broker(tmp_path_factory.mktemp("retrain-broker"))
    try:
        yield running.broker
    finally:
        running.stop()
