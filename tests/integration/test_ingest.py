"""Ingest on the real broker, the real Prefect server and both real databases.

Each test gets a private broker (so it sees only its own messages) and a fresh
event store; the ingest process is the real `fabloop ingest` command, a Prefect
flow run against the session's Prefect server.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from sqlalchemy import func, select

from fabloop.adapters.ingestor import Ingestor, IngestSettings
from fabloop.adapters.kafka import make_producer, publish_events, read_topic
from fabloop.adapters.store import DeadLetterRow, IngestBatchRow, WindowRow, WindowWaferRow, make_engine
from fabloop.core.schemas import DEADLETTER_TOPIC, SENSOR_TOPIC, TEST_TOPIC, SensorReading
from fabloop.core.scopes import ModelCatalogValue
from tests.helpers.ingest import finish, query, sim, start_ingest, stored_ids, wait_for_rows
from tests.helpers.prefect_api import api
from tests.helpers.stack import Broker, RunningStack

pytestmark = pytest.mark.integration


def test_kill_9_mid_stream_then_restart_stores_every_event_exactly_once(
    stack: RunningStack, broker: Broker, database_url: str
) -> None:
    events = sim(f"K{uuid.uuid4().hex[:6]}", wafers=6000)
    assert publish_events(make_producer(broker.conf), events).failed == 0

    first = start_ingest(stack, broker, database_url, "--batch-size", "100", "--name", "first")
    wait_for_rows(database_url, 1000)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    partial = len(stored_ids(database_url))
    assert 0 < partial < len(events), "the kill must land mid-stream"

    finish(start_ingest(stack, broker, database_url, "--batch-size", "100", "--name", "second"))
    ids = stored_ids(database_url)
    assert len(ids) == len(set(ids)) == len(events)
    assert set(ids) == {e.event_id for e in events}
    # Window bookkeeping is exactly-once too: every reading sits in exactly one window.
    memberships = query(database_url, select(WindowWaferRow.event_id))
    assert Counter(r[0] for r in memberships) == Counter(e.event_id for e in events if isinstance(e, SensorReading))
    # The store's URL (it may hold a password) is masked in the runs' parameters.
    runs = api(stack, "POST", "/flow_runs/filter",
               {"flows": {"name": {"any_": ["ingest"]}}, "sort": "START_TIME_DESC", "limit": 200})
    ours = [r["parameters"] for r in runs if r["parameters"].get("bootstrap_servers") == broker.bootstrap]
    assert len(ours) == 2 and all(p["database_url"] == "*" * 10 for p in ours), ours


def test_sigterm_finishes_the_batch_commits_and_exits_cleanly(
    stack: RunningStack, broker: Broker, database_url: str
) -> None:
    events = sim(f"S{uuid.uuid4().hex[:6]}", wafers=6000)
    head, tail = events[:1000], events[1000:]
    producer = make_producer(broker.conf)
    assert publish_events(producer, head).failed == 0
    proc = start_ingest(stack, broker, database_url, "--batch-size", "100", max_idle=600)
    wait_for_rows(database_url, 500)
    # The stream is live when the stop comes: the rest is published at ~1,000 events/s,
    # slower than ingest, so the SIGTERM always lands between messages still arriving.
    live = threading.Thread(target=_publish_paced, args=(producer, tail, 100, 0.1), daemon=True)
    live.start()
    wait_for_rows(database_url, 2000)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc, timeout=60)
    assert "finishing the current batch" in out
    stopped_at = len(stored_ids(database_url))
    live.join(timeout=120)
    assert not live.is_alive() and producer.flush(30) == 0
    assert stopped_at < len(events), "the stop must land mid-stream"
    # Offsets were committed for what was stored: the restart consumes only the rest.
    finish(start_ingest(stack, broker, database_url, "--batch-size", "100"))
    consumed_after = query(
        database_url, select(func.sum(IngestBatchRow.consumed)).where(IngestBatchRow.id > 0)
    )[0][0]
    assert len(stored_ids(database_url)) == len(events)
    assert consumed_after == len(events), "a clean stop must not cause redelivery"


def _publish_paced(producer: Producer, events: list[Any], chunk: int, pause: float) -> None:
    for i in range(0, len(events), chunk):
        stats = publish_events(producer, events[i : i + chunk])
        assert stats.failed == 0, stats
        time.sleep(pause)


def _committed_total(broker: Broker, group: str) -> int:
    """What the group has committed, summed over every partition of both topics."""
    probe = Consumer({**broker.conf, "group.id": group, "enable.auto.commit": False})
    try:
        parts = [TopicPartition(t, p) for t in (SENSOR_TOPIC, TEST_TOPIC) for p in range(3)]
        return sum(tp.offset for tp in probe.committed(parts, timeout=10) if tp.offset >= 0)
    finally:
        probe.close()


@pytest.mark.parametrize("durable_interval_s", [3600.0, 0.001], ids=["checkpoint-on-stop", "checkpoint-every-batch"])
def test_on_sqlite_offsets_are_committed_only_once_a_checkpoint_made_the_batches_durable(
    broker: Broker, tmp_path: Path, durable_interval_s: float
) -> None:
    """SQLite commits without an fsync; the offsets wait for the WAL checkpoint that fsyncs."""
    events = sim(f"D{uuid.uuid4().hex[:6]}", wafers=300)
    assert publish_events(make_producer(broker.conf), events).failed == 0
    db, group = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}", f"durable-{uuid.uuid4().hex[:6]}"
    stop = threading.Event()
    consumed: list[int] = []
    committed: list[int] = []

    async def run() -> None:
        engine = make_engine(db, pooled=True)
        ingestor = Ingestor(broker.conf, engine, ModelCatalogValue(), group=group,
                            settings=IngestSettings(batch_size=100, durable_interval_s=durable_interval_s))

        def on_batch(_stats: Any) -> None:
            consumed.append(ingestor.totals.consumed)
            committed.append(_committed_total(broker, group))
            if ingestor.totals.consumed >= len(events):
                stop.set()

        ingestor.on_batch = on_batch
        try:
            await ingestor.run(stop, max_idle_s=15)
        finally:
            await engine.dispose()

    asyncio.run(run())
    assert len(stored_ids(db)) == len(events) and consumed[-1] == len(events)
    if durable_interval_s > 60:
        # Stored batch after batch, but none durable yet: nothing committed until the stop.
        assert len(committed) > 1 and set(committed) == {0}
    else:
        # A checkpoint after every batch: each batch's offsets are committed with it.
        assert committed == consumed
    assert _committed_total(broker, group) == len(events)


def _bad_messages() -> list[tuple[str, bytes, str]]:
    good = json.loads(
        SensorReading(ts="2026-03-01T10:00:00Z", lot="L1", wafer="BAD-1", fab="F", tool="T", chamber="A",
                      recipe="R", step="S", sensors={"a": 1.0, "b": 2.0}).to_json()
    )
    assert '"b": 2.0' in json.dumps(good)
    return [
        (SENSOR_TOPIC, b"{this is not json", "invalid_json"),
        (SENSOR_TOPIC, json.dumps({k: v for k, v in good.items() if k != "tool"}).encode(), "schema_violation"),
        (SENSOR_TOPIC, json.dumps(good).replace('"b": 2.0', '"b": NaN').encode(), "non_finite"),
        (SENSOR_TOPIC, json.dumps({**good, "schema_version": 2}).encode(), "unknown_schema_version"),
        (SENSOR_TOPIC, json.dumps({**good, "sensors": {f"s{i}": 1.0 for i in range(90_000)}}).encode(), "oversized"),
        (TEST_TOPIC, json.dumps(good).encode(), "wrong_topic"),
    ]


def test_bad_input_is_dead_lettered_with_reason_and_nothing_is_lost(
    stack: RunningStack, broker: Broker, database_url: str
) -> None:
    events = sim(f"B{uuid.uuid4().hex[:6]}", wafers=300)
    bad = _bad_messages()
    producer = Producer({**broker.conf, "message.max.bytes": 4_000_000})
    publish_events(make_producer(broker.conf), events[: len(events) // 2])
    for topic, value, _ in bad:
        producer.produce(topic, value, key=b"bad")
    assert producer.flush(30) == 0
    publish_events(make_producer(broker.conf), events[len(events) // 2 :])

    finish(start_ingest(stack, broker, database_url))

    assert sorted(stored_ids(database_url)) == sorted(e.event_id for e in events)
    letters = list(read_topic(broker.conf, DEADLETTER_TOPIC, expected=len(bad), idle_timeout=10))
    assert len(letters) == len(bad)
    by_reason = {}
    for msg in letters:
        headers = {k: v.decode() for k, v in msg.headers()}
        by_reason[headers["fabloop.reason"]] = headers
        assert headers["fabloop.source.topic"] in (SENSOR_TOPIC, TEST_TOPIC)
        assert int(headers["fabloop.source.partition"]) >= 0 and int(headers["fabloop.source.offset"]) >= 0
        assert headers["fabloop.detail"]
    assert sorted(by_reason) == sorted(reason for _, _, reason in bad)
    assert "field 'tool'" in by_reason["schema_violation"]["fabloop.detail"]
    assert "sensors.b" in by_reason["non_finite"]["fabloop.detail"]
    # The store's own counts add up to what was published.
    dead_rows = query(database_url, select(DeadLetterRow.reason))
    assert Counter(r[0] for r in dead_rows) == Counter(reason for _, _, reason in bad)
    consumed, stored, dead = query(
        database_url,
        select(
            func.sum(IngestBatchRow.consumed), func.sum(IngestBatchRow.stored), func.sum(IngestBatchRow.dead_lettered)
        ),
    )[0]
    assert consumed == len(events) + len(bad) == stored + dead


def test_two_ingestors_in_one_group_split_partitions_without_loss_or_duplicates(
    stack: RunningStack, broker: Broker, database_url: str
) -> None:
    events = sim(f"G{uuid.uuid4().hex[:6]}", wafers=3000)
    a = start_ingest(stack, broker, database_url, "--batch-size", "100", "--name", "member-a", max_idle=10)
    b = start_ingest(stack, broker, database_url, "--batch-size", "100", "--name", "member-b", max_idle=10)
    time.sleep(8)  # both members join before the stream starts
    assert publish_events(make_producer(broker.conf), events).failed == 0
    finish(a)
    finish(b)
    ids = stored_ids(database_url)
    assert len(ids) == len(set(ids)) == len(events)
    per_member = dict(
        query(
            database_url,
            select(IngestBatchRow.consumer, func.sum(IngestBatchRow.consumed)).group_by(IngestBatchRow.consumer),
        )
    )
    assert per_member.get("member-a", 0) > 0 and per_member.get("member-b", 0) > 0, per_member
    memberships = query(database_url, select(WindowWaferRow.event_id))
    assert len(memberships) == len({r[0] for r in memberships}) == sum(isinstance(e, SensorReading) for e in events)


def test_closed_windows_are_announced_once_each_in_prefects_event_feed(
    stack: RunningStack, broker: Broker, tmp_path: Path
) -> None:
    from fabloop.blocks import ModelCatalog
    from fabloop.core.scopes import ModelSpec

    prefix = f"W{uuid.uuid4().hex[:6]}"
    block = prefix.lower()  # block document names are lowercase
    ModelCatalog(models=[ModelSpec(name=prefix, window_wafers=50, window_minutes=1e6)]).save(block, overwrite=True)
    db = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    events = sim(prefix, wafers=360)  # ~120 per tool → full windows of 50, the rest left open
    publish_events(make_producer(broker.conf), events)
    finish(start_ingest(stack, broker, db, "--catalog", block))

    closed = query(
        db,
        select(WindowRow.model, WindowRow.wafer_count, WindowRow.status, WindowRow.id).where(
            WindowRow.status == "closed"
        ),
    )
    per_tool = Counter(e.tool for e in events if isinstance(e, SensorReading))  # lots go to tools at random
    expected = sorted((f"{prefix}-{tool}", 50) for tool, n in per_tool.items() for _ in range(n // 50))
    assert sorted((m, n) for m, n, _, _ in closed) == expected

    deadline = time.monotonic() + 30
    feed: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(feed) < len(expected):
        feed = api(stack, "POST", "/events/filter",
                   {"filter": {"event": {"name": ["fabloop.window.closed"]},
                               "any_resource": {"id_prefix": [f"fabloop.model.{prefix}-"]}}, "limit": 50})["events"]
        time.sleep(1)
    assert len(feed) == len(expected), "one event per closed window, never one per message"
    for ev in feed:
        assert ev["payload"]["wafer_count"] == 50
        assert ev["resource"]["prefect.resource.id"] == f"fabloop.model.{ev['payload']['model']}"
        assert ev["payload"]["offsets"] and ev["payload"]["ts_start"] <= ev["payload"]["ts_end"]
    assert sorted(ev["payload"]["window_id"] for ev in feed) == sorted(w for *_, w in closed)
