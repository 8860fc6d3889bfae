"""Ingest under faults: poison events mid-stream, the broker restarted, PostgreSQL restarted.

Real components only: a private Tansu broker per test, a real event store (SQLite
or a PostgreSQL cluster), and the real ``fabloop ingest`` command, a Prefect flow
run against the session's server. Each test keeps ingest running through the fault
(``--max-idle`` far beyond the test) and stops it with SIGTERM at the end: a clean
exit proves the run never failed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from sqlalchemy import func, select

from fabloop.adapters.kafka import broker_healthy, ensure_topics, make_producer, publish_events, read_topic
from fabloop.adapters.store import DeadLetterRow, IngestBatchRow, WindowWaferRow
from fabloop.blocks import ModelCatalog
from fabloop.core.schemas import DEADLETTER_TOPIC, SENSOR_TOPIC, TEST_TOPIC, TOPICS, SensorReading, TestResult
from fabloop.core.scopes import ModelSpec
from fabloop.infra.process import ProcessManager, free_port, wait_until
from fabloop.infra.stack import broker_command
from tests.helpers.ingest import finish, query, sim, start_ingest, stored_ids, wait_for_rows
from tests.helpers.stack import Broker, RunningStack

pytestmark = pytest.mark.integration

RUNS_ON = 600  # --max-idle: ingest must still be running when the test stops it


def _stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, as cancelling the run does: the run must still be alive, and end cleanly."""
    assert proc.poll() is None, "ingest stopped by itself during the fault"
    proc.send_signal(signal.SIGTERM)
    return finish(proc, timeout=90)


def _wait_for_dead_letters(db: str, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if query(db, select(func.count()).select_from(DeadLetterRow))[0][0] >= at_least:
            return
        time.sleep(0.3)
    raise TimeoutError(f"fewer than {at_least} dead letters after {timeout}s")


def _assert_stored_exactly_once(db: str, events: list[SensorReading | TestResult]) -> None:
    ids = stored_ids(db)
    assert len(ids) == len(set(ids)), "an event was stored twice"
    assert sorted(ids) == sorted(e.event_id for e in events)
    # Window bookkeeping too: every stored reading sits in exactly one window.
    memberships = Counter(r[0] for r in query(db, select(WindowWaferRow.event_id)))
    assert memberships == Counter(e.event_id for e in events if isinstance(e, SensorReading))


# ---------------------------------------------------------------------------------------------
# poison-but-valid-looking events


def _poison(prefix: str) -> tuple[list[tuple[str, bytes, str, str]], SensorReading]:
    """Events a store column cannot hold, as raw JSON (the schema refuses to build them),
    each with its topic, expected dead-letter reason and the field the refusal names;
    and one reading the schema accepts but PostgreSQL refuses (see below)."""
    reading = json.loads(SensorReading(
        ts="2026-03-01T10:00:00Z", fab="F", tool=f"{prefix}-1", chamber="A", recipe="R", step="S",
        lot="L1", wafer=f"{prefix}-POISON", sensors={"a": 1.0},
    ).to_json())
    result = json.loads(TestResult(ts="2026-03-01T10:00:00Z", lot="L1", wafer=f"{prefix}-POISON", program="P",
                                   passed=True).to_json())

    def raw(base: dict[str, Any], **overrides: Any) -> bytes:
        return json.dumps({**base, "event_id": str(uuid.uuid4()), **overrides}).encode()

    poison = [
        (TEST_TOPIC, raw(result, hard_bin=2**63), "schema_violation", "hard_bin"),  # SQLite: OverflowError
        (TEST_TOPIC, raw(result, soft_bin=2**31), "schema_violation", "soft_bin"),  # PostgreSQL: beyond int4
        (SENSOR_TOPIC, raw(reading, ts="9999-12-31T23:59:59-05:00"), "schema_violation", "ts"),  # UTC overflow
        (SENSOR_TOPIC, raw(reading, lot="L\u00001"), "schema_violation", "lot"),  # NUL: PostgreSQL text refuses
    ]
    # Valid to the schema (every name within 128 characters), but its model, scoped by tool
    # and chamber, is named with 263 characters: windows.model is String(255), which only
    # PostgreSQL enforces. It is the one the store must isolate from its batch by itself.
    long_scope = SensorReading(
        ts="2026-03-01T10:00:00Z", fab="F", tool=f"{prefix}-".ljust(128, "T"), chamber="C" * 128, recipe="R",
        step="S", lot="L1", wafer=f"{prefix}-LONG", sensors={"a": 1.0},
    )
    return poison, long_scope


def test_poison_events_mid_stream_are_dead_lettered_and_ingest_keeps_running(
    stack: RunningStack, broker: Broker, database_url: str
) -> None:
    prefix = f"P{uuid.uuid4().hex[:6]}"
    block = prefix.lower()
    # Windows far larger than the stream: none closes, no drift check starts.
    ModelCatalog(models=[ModelSpec(scope_by=["tool", "chamber"], window_wafers=10_000, window_minutes=1e6)]).save(
        block, overwrite=True)
    on_postgres = database_url.startswith("postgresql")
    good = sim(prefix, wafers=40)
    later = sim(f"{prefix}L", wafers=10, seed=5)
    poison, long_scope = _poison(prefix)
    producer = Producer(broker.conf)
    assert publish_events(make_producer(broker.conf), good[:40]).failed == 0
    for topic, value, _, _ in poison:
        producer.produce(topic, value)
    assert producer.flush(30) == 0
    assert publish_events(make_producer(broker.conf), [long_scope, *good[40:]]).failed == 0

    proc = start_ingest(stack, broker, database_url, "--catalog", block, max_idle=RUNS_ON)
    try:
        kept = good + ([] if on_postgres else [long_scope])
        wait_for_rows(database_url, len(kept))
        _wait_for_dead_letters(database_url, len(poison) + on_postgres)
        # Still consuming after the poison: a second wave, with one more poison event in it.
        assert proc.poll() is None, "ingest stopped on a poison event"
        assert publish_events(make_producer(broker.conf), later[:10]).failed == 0
        producer.produce(TEST_TOPIC, poison[0][1])  # the same poison again, redelivered by its producer
        assert producer.flush(30) == 0
        assert publish_events(make_producer(broker.conf), later[10:]).failed == 0
        wait_for_rows(database_url, len(kept) + len(later))
        _wait_for_dead_letters(database_url, len(poison) + on_postgres + 1)
    finally:
        out = _stop(proc) if proc.poll() is None else finish(proc)

    _assert_stored_exactly_once(database_url, kept + later)
    expected = Counter(reason for _, _, reason, _ in [*poison, poison[0]])
    if on_postgres:
        expected["store_rejected"] += 1
    rows = query(database_url, select(DeadLetterRow.reason, DeadLetterRow.detail))
    assert Counter(reason for reason, _ in rows) == expected
    details = [detail for _, detail in rows]
    for _, _, _, field in poison:  # each refusal names its field
        assert any(f"field '{field}'" in d for d in details), (field, details)
    if on_postgres:
        [rejected] = [d for reason, d in rows if reason == "store_rejected"]
        assert long_scope.event_id in rejected and "255" in rejected, rejected
        assert "isolating the refused ones" in out
    # The same verdicts on fab.deadletter, for whoever watches the topic.
    letters = list(read_topic(broker.conf, DEADLETTER_TOPIC, expected=sum(expected.values()), idle_timeout=10))
    assert Counter(dict(m.headers())["fabloop.reason"].decode() for m in letters) == expected
    # The batch records add up to what was published: nothing vanished.
    consumed, stored, dead, dupes = query(database_url, select(
        func.sum(IngestBatchRow.consumed), func.sum(IngestBatchRow.stored),
        func.sum(IngestBatchRow.dead_lettered), func.sum(IngestBatchRow.duplicates),
    ))[0]
    assert consumed == len(good) + len(later) + len(poison) + 2 == stored + dead
    assert (stored, dead, dupes) == (len(kept) + len(later), sum(expected.values()), 0)


# ---------------------------------------------------------------------------------------------
# the broker restarted


@pytest.fixture
def restartable_broker(tmp_path: Path) -> Iterator[tuple[Broker, ProcessManager, list[str]]]:
    """A private broker that the test may stop and start again on the same port."""
    port = free_port()
    pm = ProcessManager(tmp_path / "broker")
    cmd = broker_command("127.0.0.1", port)
    b = Broker(f"127.0.0.1:{port}")
    _start_broker(pm, cmd, b)
    yield b, pm, cmd
    pm.stop("kafka")


def _start_broker(pm: ProcessManager, cmd: list[str], b: Broker) -> None:
    import os

    pm.start("kafka", cmd, env=dict(os.environ))
    wait_until(lambda: broker_healthy(b.conf), 30, what="broker")
    ensure_topics(b.conf, 3, TOPICS)


def test_broker_restarted_mid_stream_ingest_resumes_and_loses_nothing_it_consumed(
    stack: RunningStack, restartable_broker: tuple[Broker, ProcessManager, list[str]], tmp_path: Path
) -> None:
    """The embedded broker keeps its log in memory (Tansu's only storage engine in this build that
    needs no other server): a restart forgets the log and the group's offsets. What ingest had
    consumed is stored; it keeps running through the outage and consumes the new log."""
    broker, pm, cmd = restartable_broker
    db = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    prefix = f"R{uuid.uuid4().hex[:6]}"
    before = sim(prefix, wafers=60)
    after = sim(f"{prefix}N", wafers=150, seed=4)  # more per partition than before: old positions must not skip it
    assert publish_events(make_producer(broker.conf), before).failed == 0

    proc = start_ingest(stack, broker, db, "--batch-size", "50", max_idle=RUNS_ON)
    try:
        wait_for_rows(db, len(before))
        time.sleep(1.5)  # SQLite: offsets follow the next checkpoint (about once a second)
        pm.stop("kafka")
        time.sleep(3)  # ingest polls, commits and heartbeats against nothing
        assert proc.poll() is None, "ingest stopped when the broker went away"
        _start_broker(pm, cmd, broker)
        assert publish_events(make_producer(broker.conf), after).failed == 0
        wait_for_rows(db, len(before) + len(after), timeout=120)
    finally:
        out = _stop(proc) if proc.poll() is None else finish(proc)

    _assert_stored_exactly_once(db, before + after)
    assert "Traceback" not in out


# ---------------------------------------------------------------------------------------------
# PostgreSQL restarted


def test_postgresql_restarted_mid_stream_loses_nothing_and_ingest_keeps_running(
    stack: RunningStack, broker: Broker
) -> None:
    from fabloop.infra.postgres import PostgresCluster, server_bin_dir

    if server_bin_dir() is None:
        pytest.skip("PostgreSQL server binaries not installed (scripts/system-deps.sh installs them as root)")
    cluster = PostgresCluster.start(free_port())  # its own: the session's cluster serves other tests
    try:
        prefix = f"G{uuid.uuid4().hex[:6]}"
        first, during = sim(prefix, wafers=100), sim(f"{prefix}D", wafers=100, seed=6)
        assert publish_events(make_producer(broker.conf), first).failed == 0
        proc = start_ingest(stack, broker, cluster.url, "--batch-size", "50", max_idle=RUNS_ON)
        try:
            wait_for_rows(cluster.url, len(first))
            cluster.stop_server("fast")  # ends every session: the ingestor's pooled connections die
            # Published while the database is down: consumed, not storable, so not committed.
            assert publish_events(make_producer(broker.conf), during).failed == 0
            time.sleep(2)
            assert proc.poll() is None, "ingest stopped when PostgreSQL went away"
            cluster.start_server()
            wait_for_rows(cluster.url, len(first) + len(during), timeout=120)
        finally:
            out = _stop(proc) if proc.poll() is None else finish(proc)
        assert "event store unreachable" in out, "the outage never reached ingest: the test proved nothing"
        _assert_stored_exactly_once(cluster.url, first + during)
        assert query(cluster.url, select(func.count()).select_from(DeadLetterRow))[0][0] == 0
    finally:
        cluster.stop()
