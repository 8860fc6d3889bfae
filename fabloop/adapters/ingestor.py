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

import asyncio
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from pydantic import BaseModel, Field
from sqlalchemy import insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from fabloop.adapters.store.schema import (
    DeadLetterRow,
    IngestBatchRow,
    SensorReadingRow,
    TestResultRow,
    WindowRow,
    WindowWaferRow,
    create_schema,
    sessionmaker,
    utcnow,
)
from fabloop.core.schemas import (
    DEADLETTER_TOPIC,
    SENSOR_TOPIC,
    TEST_TOPIC,
    EventValidationError,
    SensorReading,
    TestResult,
    parse_event,
)
from fabloop.core.scopes import ModelCatalogValue, ModelSpec
from fabloop.adapters.kafka import CLIENT_LOG

log = logging.getLogger(__name__)

INSERT_PAGE_ROWS = 50  # rows per multi-row INSERT statement (see _store_events)
WINDOW_LOCK_ID = 7_301_733  # PostgreSQL advisory lock serialising window updates across ingestors


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


@dataclass(frozen=True)
class ClosedWindow:
    id: int
    model: str
    scope: dict[str, str]
    wafer_count: int
    ts_start: datetime | None
    ts_end: datetime | None
    offsets: dict[str, Any]
    close_reason: str


@dataclass
class BatchStats:
    consumed: int = 0
    stored: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    windows_closed: int = 0
    lag: int | None = None
    reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, other: "BatchStats") -> None:
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


def _insert(session: AsyncSession):
    return postgresql.insert if session.bind.dialect.name == "postgresql" else sqlite.insert


def _sensor_row(msg: Message, ev: SensorReading, at: datetime) -> dict[str, Any]:
    return {
        "event_id": ev.event_id, "ts": ev.ts, "fab": ev.fab, "tool": ev.tool, "chamber": ev.chamber,
        "recipe": ev.recipe, "step": ev.step, "lot": ev.lot, "wafer": ev.wafer,
        "payload": msg.value().decode(), "topic": msg.topic(), "partition": msg.partition(),
        "offset": msg.offset(), "ingested_at": at,
    }


def _test_row(msg: Message, ev: TestResult, at: datetime) -> dict[str, Any]:
    return {
        "event_id": ev.event_id, "ts": ev.ts, "lot": ev.lot, "wafer": ev.wafer, "program": ev.program,
        "stage": ev.stage, "passed": ev.passed, "yield_pct": ev.yield_pct, "part_id": ev.part_id,
        "hard_bin": ev.hard_bin, "soft_bin": ev.soft_bin, "payload": msg.value().decode(),
        "topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(), "ingested_at": at,
    }


async def _store_events(session: AsyncSession, table: type, rows: list[dict[str, Any]]) -> set[str]:
    """Insert, skipping event ids already stored; returns the ids that were new.

    Core inserts on the table (not the ORM class): the rows are plain dicts, and the
    ORM's bulk layer would only add per-row bookkeeping we never use.

    SQLite: the batch transaction holds the write lock from its start (``BEGIN
    IMMEDIATE``), so the ids found stored by one indexed SELECT are exact, and the
    new rows go in as one plain ``executemany`` (a prepared single-row statement).
    That is ~30 % cheaper than ``INSERT … ON CONFLICT DO NOTHING RETURNING``, whose
    multi-row statements SQLite parses and materialises page by page. A plain
    insert also fails loudly if that reasoning were ever wrong.

    PostgreSQL: several ingestors write at once, so the database decides which rows
    are new (``ON CONFLICT DO NOTHING RETURNING``), in pages of ``INSERT_PAGE_ROWS``
    so that the driver sees at most that many distinct statement texts.
    """
    if not rows:
        return set()
    core = table.__table__
    if session.bind.dialect.name == "sqlite":
        stored = set(
            (await session.execute(select(core.c.event_id).where(core.c.event_id.in_([r["event_id"] for r in rows]))))
            .scalars()
        )
        new: list[dict[str, Any]] = []
        for row in rows:  # a producer retry can repeat an event within one batch
            if row["event_id"] not in stored:
                stored.add(row["event_id"])
                new.append(row)
        if new:
            await session.execute(insert(core), new)
        return {row["event_id"] for row in new}
    stmt = (
        postgresql.insert(core)
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(core.c.event_id)
        .execution_options(insertmanyvalues_page_size=INSERT_PAGE_ROWS)
    )
    result = await session.execute(stmt, rows)
    return set(result.scalars().all())


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


class WindowBook:
    """Adds stored sensor readings to their scopes' open windows and closes full ones."""

    def __init__(self, catalog: ModelCatalogValue) -> None:
        self.catalog = catalog

    def spec_for(self, model: str) -> ModelSpec | None:
        for spec in self.catalog.models:
            if model.startswith(spec.name + "-"):
                return spec
        return None

    async def add(
        self, session: AsyncSession, readings: list[tuple[Message, SensorReading]]
    ) -> list[WindowRow]:
        if not readings:
            return []
        if session.bind.dialect.name == "postgresql":
            await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": WINDOW_LOCK_ID})
        by_model: dict[str, tuple[ModelSpec, dict[str, str], list[tuple[Message, SensorReading]]]] = {}
        names: dict[tuple[int, tuple[str, ...]], str] = {}  # a batch has few scopes; name each once
        for msg, ev in readings:
            for i, spec in enumerate(self.catalog.models):
                scope = spec.scope_of(ev)
                if scope is None:
                    continue
                key = (i, tuple(scope.values()))
                name = names.get(key)
                if name is None:
                    name = names[key] = spec.model_name(scope)
                by_model.setdefault(name, (spec, scope, []))[2].append((msg, ev))
        open_rows = {
            w.model: w
            for w in (
                await session.execute(
                    select(WindowRow).where(WindowRow.status == "open", WindowRow.model.in_(list(by_model)))
                )
            ).scalars()
        }
        closed: list[WindowRow] = []
        members: list[dict[str, Any]] = []
        for model, (spec, scope, items) in by_model.items():
            items.sort(key=lambda it: it[1].ts)
            window = open_rows.get(model)
            i = 0
            while i < len(items):
                if window is None:
                    window = WindowRow(model=model, scope=scope, status="open", opened_at=utcnow(), offsets={}, wafer_count=0)
                    session.add(window)
                    await session.flush()
                # Fill this window in plain locals and write its row once: setting ORM
                # attributes per reading costs more than the rest of the bookkeeping.
                count, ts_start, ts_end = window.wafer_count, window.ts_start, window.ts_end
                offsets = dict(window.offsets)
                reason = None
                while i < len(items) and reason is None:
                    msg, ev = items[i]
                    i += 1
                    count += 1
                    ts_start = ev.ts if ts_start is None or ev.ts < ts_start else ts_start
                    ts_end = ev.ts if ts_end is None or ev.ts > ts_end else ts_end
                    key, offset = f"{msg.topic()}:{msg.partition()}", msg.offset()
                    lo, hi = offsets.get(key, (offset, offset))
                    offsets[key] = [min(lo, offset), max(hi, offset)]
                    members.append({"window_id": window.id, "event_id": ev.event_id})
                    if count >= spec.window_wafers:
                        reason = "wafer_count"
                window.wafer_count, window.ts_start, window.ts_end, window.offsets = count, ts_start, ts_end, offsets
                if reason:
                    window.status, window.close_reason, window.closed_at = "closed", reason, utcnow()
                    closed.append(window)
                    window = None
        await session.flush()
        # One executemany for the memberships (the windows they point at exist by now).
        if members:  # an empty list would execute one "INSERT ... DEFAULT VALUES"
            await session.execute(insert(WindowWaferRow.__table__), members)
        return closed

    async def close_stale(self, session: AsyncSession) -> list[WindowRow]:
        """Close windows that have been open longer than their spec's minutes of wall time."""
        now = utcnow()
        closed = []
        for window in (await session.execute(select(WindowRow).where(WindowRow.status == "open"))).scalars():
            spec = self.spec_for(window.model)
            minutes = spec.window_minutes if spec else 60.0
            if window.wafer_count > 0 and now - window.opened_at >= timedelta(minutes=minutes):
                window.status, window.close_reason, window.closed_at = "closed", "wall_time", now
                closed.append(window)
        await session.flush()
        return closed


def _closed(w: WindowRow) -> ClosedWindow:
    return ClosedWindow(w.id, w.model, dict(w.scope), w.wafer_count, w.ts_start, w.ts_end, dict(w.offsets), w.close_reason or "")


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
        self.sessions = sessionmaker(engine)
        self.book = WindowBook(catalog)
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
        self.producer = Producer({"logger": CLIENT_LOG, **kafka_conf, "linger.ms": 5, "message.max.bytes": self.settings.max_message_bytes * 4})
        self.totals = BatchStats()
        self._pending: dict[tuple[str, int], int] = {}  # stored, not yet committed: high offset per partition
        self._last_durable = time.monotonic()

    async def run(self, stop: threading.Event, max_idle_s: float | None = None) -> BatchStats:
        """Consume until ``stop`` is set (or ``max_idle_s`` without messages); always ends cleanly."""
        await self._ensure_schema()
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
                    last_msg = time.monotonic()
                    stats = await self.process_batch(msgs)
                    self.totals.add(stats)
                    if self.on_batch:
                        self.on_batch(stats)
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

    async def _ensure_schema(self) -> None:
        for attempt in range(5):
            try:
                await create_schema(self.engine)
                return
            except Exception:  # noqa: BLE001 - two ingestors racing to create tables
                if attempt == 4:
                    raise
                await asyncio.sleep(0.5 + attempt)

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
        async with self.sessions() as session, session.begin():
            new_sensor_ids = await _store_events(session, SensorReadingRow, [_sensor_row(m, e, at) for m, e in sensors])
            new_test_ids = await _store_events(session, TestResultRow, [_test_row(m, e, at) for m, e in tests])
            if dead:
                await session.execute(
                    _insert(session)(DeadLetterRow).on_conflict_do_nothing(),
                    [
                        {"topic": d.msg.topic(), "partition": d.msg.partition(), "offset": d.msg.offset(),
                         "reason": d.reason, "detail": d.detail[:2000], "size": len(d.msg.value() or b""), "at": at}
                        for d in dead
                    ],
                )
            closed = await self.book.add(session, _first_of_each(sensors, new_sensor_ids))
            stats.stored = len(new_sensor_ids) + len(new_test_ids)
            stats.duplicates = len(sensors) + len(tests) - stats.stored
            stats.dead_lettered = len(dead)
            stats.windows_closed = len(closed)
            stats.lag = self._lag()
            session.add(IngestBatchRow(
                consumer=self.settings.consumer_name, consumed=stats.consumed, stored=stats.stored,
                duplicates=stats.duplicates, dead_lettered=stats.dead_lettered,
                windows_closed=stats.windows_closed, lag=stats.lag,
            ))
            closed_windows = [_closed(w) for w in closed]
        for m in msgs:
            key = (m.topic(), m.partition())
            self._pending[key] = max(self._pending.get(key, -1), m.offset())
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
                    ("fabloop.source.topic", d.msg.topic().encode()),
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
        if self.engine.dialect.name == "sqlite":
            if not final and time.monotonic() - self._last_durable < self.settings.durable_interval_s:
                return
            if not await self._checkpoint("FULL" if final else "PASSIVE"):
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

    async def _checkpoint(self, mode: str) -> bool:
        """Run a SQLite WAL checkpoint; True when every frame reached the database file.

        With ``synchronous=NORMAL`` SQLite fsyncs the WAL before a checkpoint and the
        database after a complete one. ``PASSIVE`` never waits; ``FULL`` (on stop)
        waits for readers and writers through the busy timeout.
        """
        async with self.engine.connect() as conn:
            # The driver connection: a checkpoint must not run inside the BEGIN IMMEDIATE
            # that SQLAlchemy's begin hook would open.
            raw = await conn.get_raw_connection()
            cursor = await raw.driver_connection.execute(f"PRAGMA wal_checkpoint({mode})")
            busy, frames, checkpointed = await cursor.fetchone()
            await cursor.close()
        return busy == 0 and frames == checkpointed

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
        async with self.sessions() as session, session.begin():
            if session.bind.dialect.name == "postgresql":
                await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": WINDOW_LOCK_ID})
            closed = [_closed(w) for w in await self.book.close_stale(session)]
        await self._announce(closed)

    async def _announce(self, windows: list[ClosedWindow]) -> None:
        if not windows or self.announce is None:
            return
        for w in windows:
            self.announce(w)
        async with self.sessions() as session, session.begin():
            await session.execute(
                update(WindowRow).where(WindowRow.id.in_([w.id for w in windows])).values(announced=True)
            )

    async def _announce_pending(self) -> None:
        """Windows closed before a crash but never announced are announced now."""
        if self.announce is None:
            return
        async with self.sessions() as session:
            rows = (
                await session.execute(select(WindowRow).where(WindowRow.status == "closed", WindowRow.announced.is_(False)))
            ).scalars().all()
            pending = [_closed(w) for w in rows]
        await self._announce(pending)


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
