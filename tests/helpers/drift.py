"""Shared by the drift → retrain tests: simulated phases, set-up ingest, champions, Prefect API reads.

Everything runs against the session's real stack: events go through a real
Kafka-compatible broker into the stack's event store, champions are real
``retrain`` runs registered in its MLflow server, and the outcome is read back from
the event store and the Prefect REST API (what the UI shows).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import select

from fabloop.adapters.ingestor import ClosedWindow, Ingestor, IngestSettings
from fabloop.adapters.kafka import make_producer, publish_events
from fabloop.adapters.store import DriftCheckRow, RetrainTriggerRow, WindowRow, make_engine, sessionmaker
from fabloop.core.schemas import SensorReading, TestResult
from fabloop.core.scopes import ModelCatalogValue
from tests.helpers.ingest import query
from tests.helpers.prefect_api import FINAL, api, runs_of_flow
from tests.helpers.stack import RunningStack

Event = SensorReading | TestResult


# --------------------------------------------------------------------------- stream


def split_at_wafer(
    events: Iterable[Event], first_index: int, lot_size: int, lot_prefix: str
) -> tuple[list[Event], list[Event]]:
    """Events before the first sensor reading of global wafer ``first_index``, and the rest."""
    lot, slot = divmod(first_index, lot_size)
    first = f"{lot_prefix}{lot + 1:04d}-{slot + 1:02d}"
    head: list[Event] = []
    it = iter(events)
    for ev in it:
        if isinstance(ev, SensorReading) and ev.wafer == first:
            return head, [ev, *it]
        head.append(ev)
    raise AssertionError(f"wafer {first} is not in the stream")


def publish(bootstrap: str, events: list[Event]) -> None:
    stats = publish_events(make_producer({"bootstrap.servers": bootstrap}), events)
    assert stats.failed == 0 and stats.published == len(events), stats


def ingest_quietly(
    bootstrap: str, database_url: str, catalog: ModelCatalogValue, group: str, max_idle: float = 4
) -> list[ClosedWindow]:
    """Set-up ingest: the real ``Ingestor``, but its closed windows are not announced to Prefect.

    They are marked announced all the same, so no later ``fabloop ingest`` announces
    them either: set-up data must not start drift checks.
    """
    closed: list[ClosedWindow] = []

    async def run() -> None:
        engine = make_engine(database_url, pooled=True)
        ingestor = Ingestor(
            {"bootstrap.servers": bootstrap}, engine, catalog, group=group,
            settings=IngestSettings(batch_size=1000, consumer_name="drift-test-setup"), announce=closed.append,
        )
        try:
            await ingestor.run(threading.Event(), max_idle_s=max_idle)
        finally:
            await engine.dispose()

    asyncio.run(run())
    return closed


# --------------------------------------------------------------------------- champions


def train_champion(tracking_uri: str, model: str, retrain_policy_block: str) -> str:
    """A real first training (``retrain`` in-process, no promotion), then ``champion`` on it."""
    from mlflow import MlflowClient

    from fabloop.flows.retrain import retrain

    summary = retrain(
        model=model, reasons=["test set-up: initial champion"], policy_block=retrain_policy_block, promotion="off"
    )
    version = str(summary["version"])
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.set_registered_model_alias(model, "champion", version)
    return version


def set_model_overrides(overrides: dict[str, dict[str, Any] | None]) -> None:
    """Merge per-model overrides into the shared ``default`` DriftPolicy block (None removes one).

    Each override spells out every field (the base policy's values, then the given
    ones): a partial override does not survive the block's round trip yet (see
    ``test_a_partial_model_override_saved_in_the_block_keeps_the_base_policy``).
    """
    from fabloop.blocks import DEFAULT, DriftPolicyBlock
    from fabloop.core.policies import DriftPolicyOverride

    block = DriftPolicyBlock.load(DEFAULT)
    merged = dict(block.policy.overrides)
    base = block.policy.model_dump(exclude={"overrides"})
    for model, fields in overrides.items():
        if fields is None:
            merged.pop(model, None)
        else:
            merged[model] = DriftPolicyOverride(**{**base, **fields})
    block.policy = block.policy.model_copy(update={"overrides": merged})
    block.save(DEFAULT, overwrite=True)


# --------------------------------------------------------------------------- event store


def entities(database_url: str, stmt: Any) -> list[Any]:
    """ORM rows (detached, attributes loaded) for a ``select(Entity)``."""

    async def run() -> list[Any]:
        engine = make_engine(database_url)
        try:
            async with sessionmaker(engine)() as session:
                return list((await session.scalars(stmt)).all())
        finally:
            await engine.dispose()

    return asyncio.run(run())


def closed_windows(database_url: str, models: list[str]) -> list[Any]:
    return query(database_url, select(WindowRow.id, WindowRow.model, WindowRow.wafer_count, WindowRow.announced)
                 .where(WindowRow.model.in_(models), WindowRow.status == "closed").order_by(WindowRow.id))


def checks(database_url: str, window_ids: list[int]) -> list[DriftCheckRow]:
    return entities(
        database_url, select(DriftCheckRow).where(DriftCheckRow.window_id.in_(window_ids)).order_by(DriftCheckRow.id)
    )


def triggers(database_url: str, models: list[str]) -> list[RetrainTriggerRow]:
    return entities(
        database_url,
        select(RetrainTriggerRow).where(RetrainTriggerRow.model.in_(models)).order_by(RetrainTriggerRow.id),
    )


# ----------------------------------------------------------------- Prefect API (see tests.helpers.prefect_api)


def cancel_unfinished(stack: RunningStack, flow_names: list[str], models: list[str], since: datetime) -> list[str]:
    """Cancel runs these tests caused that may still be going (a retraining, a suspended promotion)."""
    cancelled = []
    for name in flow_names:
        for run in runs_of_flow(stack, name, since):
            if run["parameters"].get("model") in models and run["state_type"] not in FINAL:
                # Prefect 3.8: no worker acts on a CANCELLING run it has not picked up
                # (scheduled, awaiting a concurrency slot): that one must be CANCELLED.
                # Nor on a suspended promotion, which has no process to stop.
                running = run["start_time"] and run["state_type"] != "PAUSED"
                to = ("CANCELLING", "Cancelling") if running else ("CANCELLED", "Cancelled")
                api(stack, "POST", f"/flow_runs/{run['id']}/set_state",
                    {"state": {"type": to[0], "name": to[1], "message": "test teardown"}, "force": True})
                cancelled.append(run["id"])
    return cancelled


# prefect.yaml's drift-check trigger: one check per closed-window event.
WINDOW_TRIGGER = "check every closed window"


def set_automation(stack: RunningStack, name: str, *, enabled: bool) -> None:
    for automation in api(stack, "POST", "/automations/filter", {"limit": 200}):
        if automation["name"] == name and automation["enabled"] != enabled:
            api(stack, "PATCH", f"/automations/{automation['id']}", {"enabled": enabled})


@contextlib.contextmanager
def window_trigger(stack: RunningStack) -> Iterator[None]:
    """The window trigger on inside the block, off after it: no other test's windows are checked by it."""
    set_automation(stack, WINDOW_TRIGGER, enabled=True)
    try:
        yield
    finally:
        set_automation(stack, WINDOW_TRIGGER, enabled=False)
