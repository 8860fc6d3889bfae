"""At-least-once ingest: Kafka → validation → event store, with dead letters and windows.

The order of a batch is what makes it safe:

1. validate every message; refused ones are produced to ``fab.deadletter`` with
   the reason, source topic, partition and offset in headers, and flushed;
2. one database transaction stores the good events (idempotent on event id),
   records the dead letters, adds new sensor readings to their model windows and
   closes the windows that are full;
3. only then are the offsets committed — and only once the transaction is on disk
   (PostgreSQL: at commit; SQLite: after the next WAL checkpoint, about once a
   second); a crash anywhere before that replays the batch, which changes nothing
   the second time;
4. closed windows are announced (once per window) and marked as announced.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncEngine

from fabloop.adapters.kafka import CLIENT_LOG
from fabloop.adapters.store import ClosedWindow, IngestStore, utcnow
from fabloop.core.schemas import (
    DEADLETTER_TOPIC,
    SENSOR_TOPIC,
    TEST_TOPIC,
    EventValidationError,
    SensorReading,
    TestResult,
    parse_event,
)
from fabloop.core.scopes import ModelCatalogValue

log = logging.getLogger(__name__)


class IngestSettings(BaseModel):
    batch_size: int = Field(default=500, ge=1)
    poll_timeout_s: float = Field(default=0.5, gt=0)
    max_message_bytes: int = Field(default=1_000_000, ge=1024)
    window_check_interval_s: float = Field(default=5.0, gt=0)
    # SQLite only: how often stored batches are made durable (a WAL checkpoint, which
    # fsyncs) so that their offsets may be committed. See ``Ingestor._commit_durable``.
    durable_interval_s: float = Field(default=1.0, gt=0)
    # Kept short on purpose: a member that died is noticed (and its partitions
    # handed over) within seconds, and the embedded broker completes a join in
    # about half the session timeout.
    session_timeout_ms: int = Field(default=6000, ge=1000)
    consumer_name: str = "ingest"


@dataclass(frozen=True)
class DeadLetter:
    msg: Message
    reason: str
    detail: str


@dataclass
class BatchStats:
    consumed: int = 0
    stored: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    windows_closed: int = 0
    lag: int | None = None
    reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, other: BatchStats) -> None:
        self.consumed += other.consumed
        self.stored += other.stored
        self.duplicates += other.duplicates
        self.dead_lettered += other.dead_lettered
        self.windows_closed += other.windows_closed
        self.lag = other.lag
        for k, v in other.reasons.items():
            self.reasons[k] += v

    def line(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.reasons.items()))
        return (
            f"events in {self.consumed}, stored {self.stored}, duplicates {self.duplicates}, "
            f"dead-lettered {self.dead_lettered}{f' ({reasons})' if reasons else ''}, "
            f"windows closed {self.windows_closed}, lag {self.lag if self.lag is not None else '?'}"
        )


def classify(msg: Message, max_bytes: int) -> SensorReading | TestResult | DeadLetter:
    """Decide one message's fate: a valid event for the store, or a dead letter with a reason."""
    value = msg.value()
    if value is None:
        return DeadLetter(msg, "empty", "message has no value")
    if len(value) > max_bytes:
        return DeadLetter(msg, "oversized", f"{len(value)} bytes > limit {max_bytes}")
    try:
        event = parse_event(value)
    except EventValidationError as exc:
        if exc.field == "<json>":
            reason = "invalid_json"
        elif exc.field == "schema_version":
            reason = "unknown_schema_version"
        elif "finite" in exc.reason:
            reason = "non_finite"
        else:
            reason = "schema_violation"
        return DeadLetter(msg, reason, str(exc))
    expected = SENSOR_TOPIC if isinstance(event, SensorReading) else TEST_TOPIC
    if msg.topic() != expected:
        return DeadLetter(msg, "wrong_topic", f"a {event.kind} event belongs on {expected}, not {msg.topic()}")
    return event


def _first_of_each(
    readings: list[tuple[Message, SensorReading]], new_ids: set[str]
) -> list[tuple[Message, SensorReading]]:
    """The newly stored readings, each once: a producer retry can put the same event
    twice into one batch, and adding it twice to a window would fail the batch on
    every redelivery."""
    unseen = set(new_ids)
    fresh = []
    for msg, ev in readings:
        if ev.event_id in unseen:
            unseen.discard(ev.event_id)
            fresh.append((msg, ev))
    return fresh


class Ingestor:
    """One member of the ingest consumer group."""

    def __init__(
        self,
        kafka_conf: dict[str, Any],
        engine: AsyncEngine,
        catalog: ModelCatalogValue,
        group: str = "fabloop-ingest",
        settings: IngestSettings | None = None,
        announce: Callable[[ClosedWindow], None] | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self.settings = settings or IngestSettings()
        self.engine = engine
        self.store = IngestStore(engine, catalog)
        self.announce = announce
        self.on_batch = on_batch
        self.consumer = Consumer(
            {
                "logger": CLIENT_LOG,
                **kafka_conf,
                "group.id": group,
                "client.id": self.settings.consumer_name,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": self.settings.session_timeout_ms,
                "heartbeat.interval.ms": max(self.settings.session_timeout_ms // 6, 500),
                # A batch takes seconds; a member silent for a minute is gone, and a
                # rebalance never waits longer than that for it.
                "max.poll.interval.ms": 60_000,
                "fetch.message.max.bytes": self.settings.max_message_bytes * 4,
                "receive.message.max.bytes": max(self.settings.max_message_bytes * 8, 100_000_000),
                # Prefetch ~16 MB (a few batches) instead of librdkafka's 64 MB, whose
                # filling and draining was most of the RSS swing; re-fetch 20 ms after
                # the queue drains below it (the 1 s default starved the consumer).
                "queued.max.messages.kbytes": 16_384,
                "fetch.queue.backoff.ms": 20,
            }
        )
        self.producer = Producer({
            "logger": CLIENT_LOG, **kafka_conf, "linger.ms": 5,
            "message.max.bytes": self.settings.max_message_bytes * 4,
        })
        self.totals = BatchStats()
        self._pending: dict[tuple[str, int], int] = {}  # stored, not yet committed: high offset per partition
        self._last_durable = time.monotonic()

    async def run(self, stop: threading.Event, max_idle_s: float | None = None) -> BatchStats:
        """Consume until ``stop`` is set (or ``max_idle_s`` without messages); always ends cleanly."""
        await self.store.prepare()
        await self._announce_pending()
        self.consumer.subscribe([SENSOR_TOPIC, TEST_TOPIC])
        last_msg = time.monotonic()
        last_window_check = time.monotonic()
        try:
            while not stop.is_set():
                msgs = self.consumer.consume(self.settings.batch_size, self.settings.poll_timeout_s)
                msgs = [m for m in msgs if not self._transient_error(m)]
                if not self.consumer.assignment():
                    last_msg = time.monotonic()  # idle time counts only once we own partitions
                if msgs:
                    stats = await self.process_batch(msgs)
                    self.totals.add(stats)
                    if self.on_batch:
                        self.on_batch(stats)
                    last_msg = time.monotonic()  # idle is time without messages, not time spent storing them
                elif max_idle_s is not None and time.monotonic() - last_msg > max_idle_s:
                    break
                if time.monotonic() - last_window_check > self.settings.window_check_interval_s:
                    last_window_check = time.monotonic()
                    await self._close_stale()
        finally:
            try:
                await self._commit_durable(final=True)
                if self._pending:
                    log.warning("stored batches not yet on disk: %s will be re-read (harmlessly) on restart",
                                {f"{t}:{p}": o for (t, p), o in self._pending.items()})
            finally:
                self.consumer.close()
                self.producer.flush(30)
        return self.totals

    @staticmethod
    def _transient_error(msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return False
        if err.code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
            return True
        raise KafkaException(err)

    async def process_batch(self, msgs: list[Message]) -> BatchStats:
        stats = BatchStats(consumed=len(msgs))
        sensors: list[tuple[Message, SensorReading]] = []
        tests: list[tuple[Message, TestResult]] = []
        dead: list[DeadLetter] = []
        for msg in msgs:
            verdict = classify(msg, self.settings.max_message_bytes)
            if isinstance(verdict, DeadLetter):
                dead.append(verdict)
                stats.reasons[verdict.reason] += 1
            elif isinstance(verdict, SensorReading):
                sensors.append((msg, verdict))
            else:
                tests.append((msg, verdict))
        self._dead_letter(dead)
        at = utcnow()
        async with self.store.batch() as batch:
            new_sensor_ids = await batch.store_sensor_readings(sensors, at)
            new_test_ids = await batch.store_test_results(tests, at)
            await batch.record_dead_letters(dead, at)
            closed_windows = await batch.add_to_windows(_first_of_each(sensors, new_sensor_ids))
            stats.stored = len(new_sensor_ids) + len(new_test_ids)
            stats.duplicates = len(sensors) + len(tests) - stats.stored
            stats.dead_lettered = len(dead)
            stats.windows_closed = len(closed_windows)
            stats.lag = self._lag()
            batch.record_batch(
                consumer=self.settings.consumer_name, consumed=stats.consumed, stored=stats.stored,
                duplicates=stats.duplicates, dead_lettered=stats.dead_lettered,
                windows_closed=stats.windows_closed, lag=stats.lag,
            )
        for m in msgs:
            # A consumed message (not an error event) always has its topic, partition and offset.
            key = (m.topic() or "", m.partition() or 0)
            self._pending[key] = max(self._pending.get(key, -1), m.offset() or 0)
        await self._commit_durable()
        await self._announce(closed_windows)
        return stats

    def _dead_letter(self, dead: list[DeadLetter]) -> None:
        if not dead:
            return
        failures: list[str] = []

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(str(err))

        for d in dead:
            value = d.msg.value() or b""
            truncated = len(value) > self.settings.max_message_bytes
            self.producer.produce(
                DEADLETTER_TOPIC,
                value[: self.settings.max_message_bytes // 2] if truncated else value,
                key=d.msg.key(),
                headers=[
                    ("fabloop.reason", d.reason.encode()),
                    ("fabloop.detail", d.detail[:1000].encode()),
                    ("fabloop.source.topic", (d.msg.topic() or "").encode()),
                    ("fabloop.source.partition", str(d.msg.partition()).encode()),
                    ("fabloop.source.offset", str(d.msg.offset()).encode()),
                    ("fabloop.source.size", str(len(value)).encode()),
                    ("fabloop.truncated", b"true" if truncated else b"false"),
                ],
                on_delivery=delivered,
            )
        remaining = self.producer.flush(30)
        if remaining or failures:
            # Not committing is the safe choice: the batch will be consumed again.
            raise RuntimeError(f"dead-letter publish failed ({remaining} undelivered, errors: {failures[:3]})")

    async def _commit_durable(self, final: bool = False) -> None:
        """Commit the offsets of every stored batch whose transaction is on disk.

        PostgreSQL's commit is durable (it fsyncs), so offsets follow every batch. The
        SQLite store commits with ``synchronous=NORMAL`` (WAL), which survives a killed
        process but not a power loss; an fsync per batch would cost ~10 % of ingest.
        So about once a second (and when stopping) a WAL checkpoint runs: it fsyncs
        the WAL and copies it into the database, which makes every batch stored so far
        durable, and only then are their offsets committed. A crash in between
        re-reads at most that second's batches, which the idempotent store ignores.
        """
        if not self._pending:
            return
        if not self.store.durable_on_commit:
            if not final and time.monotonic() - self._last_durable < self.settings.durable_interval_s:
                return
            if not await self.store.checkpoint("FULL" if final else "PASSIVE"):
                return  # readers still on older frames: try again after the next batch
            self._last_durable = time.monotonic()
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in self._pending.items()]
        self._pending.clear()
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # A rebalance took the partition away: its new owner re-reads the batch,
            # and the idempotent store makes that harmless.
            if exc.args[0].code() not in (
                KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION, KafkaError.UNKNOWN_MEMBER_ID,
                KafkaError._NO_OFFSET,
            ):
                raise

    def _lag(self) -> int | None:
        try:
            assignment = self.consumer.assignment()
            if not assignment:
                return None
            total = 0
            for tp in self.consumer.position(assignment):
                _lo, hi = self.consumer.get_watermark_offsets(tp, cached=True)
                if hi >= 0 and tp.offset >= 0:
                    total += max(hi - tp.offset, 0)
            return total
        except KafkaException:
            return None

    async def _close_stale(self) -> None:
        await self._announce(await self.store.close_stale_windows())

    async def _announce(self, windows: list[ClosedWindow]) -> None:
        if not windows or self.announce is None:
            return
        for w in windows:
            self.announce(w)
        await self.store.mark_announced([w.id for w in windows])

    async def _announce_pending(self) -> None:
        """Windows closed before a crash but never announced are announced now."""
        if self.announce is None:
            return
        await self._announce(await self.store.unannounced_windows())


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
