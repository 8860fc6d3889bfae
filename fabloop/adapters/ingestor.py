"""At-least-once ingest: Kafka → validation → event store, with dead letters and windows.

The order of a batch is what makes it safe:

1. validate every message; refused ones are produced to ``fab.deadletter`` with
   the reason, source topic, partition and offset in headers, and flushed;
2. one database transaction stores the good events (idempotent on event id),
   records the dead letters, adds new sensor readings to their model windows and
   closes the windows that are full (windows are cut in event time: a reading older
   than its scope's last closed window is stored, kept out of every window and
   logged as late, see ``WindowBook``);
3. only then are the offsets committed — and only once the transaction is on disk
   (PostgreSQL: at commit; SQLite: after the next WAL checkpoint, about once a
   second); a crash anywhere before that replays the batch, which changes nothing
   the second time;
4. closed windows are announced, and marked announced only once the Prefect API
   has accepted their events; a window the API did not accept stays unannounced,
   and the sweep (every few seconds, with backoff while the API is unreachable)
   announces it again. The sweep also re-announces a window whose drift check has
   not shown up a few minutes after its event was accepted; checks claim their
   window, so a window announced twice is still judged once.

No event stops ingest. The schemas refuse what a store column cannot hold; should
the database still refuse a batch for its rows, the batch is split until the
refused events are alone, those are dead-lettered (``store_rejected``) and the
rest is stored. A lost database connection is not the events' fault: the batch is
retried, with backoff, until the database is back, and its offsets wait for it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncEngine

from fabloop.adapters.kafka import CLIENT_LOG, with_error_cb
from fabloop.adapters.store import ClosedWindow, IngestStore, LateReading, utcnow
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

# Announces one closed window: returns True once the Prefect API has accepted its event,
# and raises if it was not accepted (the window stays unannounced and is announced again).
# A falsy return marks the window announced without an event (a set-up or backfill that
# must not be judged): the sweep leaves it alone.
Announce = Callable[[ClosedWindow], Awaitable[bool] | bool | None]

T = TypeVar("T")
Accepted = tuple[Message, SensorReading | TestResult]
STORE_REJECTED = "store_rejected"
# Consumer errors that pass on their own (a broker restarting, a rebalance, a batch
# that outlasted max.poll.interval.ms): librdkafka reconnects and rejoins by itself.
TRANSIENT_KAFKA_ERRORS = frozenset({
    KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN, KafkaError._MAX_POLL_EXCEEDED, KafkaError._TIMED_OUT,
    KafkaError._RESOLVE, KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.UNKNOWN_TOPIC_ID, KafkaError.OFFSET_OUT_OF_RANGE,
    KafkaError._AUTO_OFFSET_RESET, KafkaError.REQUEST_TIMED_OUT, KafkaError._WAIT_COORD,
    KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION, KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError._NO_OFFSET,
})


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
    # Waiting out an unreachable event store: the first retry after this long, doubling up to the max.
    db_retry_initial_s: float = Field(default=0.5, gt=0)
    db_retry_max_s: float = Field(default=10.0, gt=0)
    # Announcing closed windows: one window's event, retries included, must be accepted
    # within the timeout; while announcements fail, the next try waits, doubling up to the max.
    announce_timeout_s: float = Field(default=15.0, gt=0)
    announce_retry_initial_s: float = Field(default=2.0, gt=0)
    announce_retry_max_s: float = Field(default=30.0, gt=0)
    # A window whose event was accepted but which has no verdict this long after is
    # announced again (the event or its check was lost), for ``recheck_horizon_s`` after it closed.
    recheck_after_s: float = Field(default=300.0, gt=0)
    recheck_horizon_s: float = Field(default=86_400.0, gt=0)


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
    late: int = 0  # stored readings older than their scope's last closed window: in no window
    lag: int | None = None
    reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, other: BatchStats) -> None:
        self.consumed += other.consumed
        self.stored += other.stored
        self.duplicates += other.duplicates
        self.dead_lettered += other.dead_lettered
        self.windows_closed += other.windows_closed
        self.late += other.late
        self.lag = other.lag
        for k, v in other.reasons.items():
            self.reasons[k] += v

    def line(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.reasons.items()))
        return (
            f"events in {self.consumed}, stored {self.stored}, duplicates {self.duplicates}, "
            f"dead-lettered {self.dead_lettered}{f' ({reasons})' if reasons else ''}, "
            f"windows closed {self.windows_closed}{f', late readings {self.late}' if self.late else ''}, "
            f"lag {self.lag if self.lag is not None else '?'}"
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


def _log_late(late: list[LateReading]) -> None:
    """Late readings are stored but judged in no window (see ``WindowBook``): say which, per scope."""
    by_model: dict[str, list[LateReading]] = defaultdict(list)
    for r in late:
        by_model[r.model].append(r)
    for model, rows in by_model.items():
        oldest = min(r.ts for r in rows)
        log.warning("%d late reading(s) of %s (oldest %s, e.g. %s) are older than its last closed window's end "
                    "%s: stored, left out of every window", len(rows), model, f"{oldest:%Y-%m-%d %H:%M:%S}",
                    rows[0].event_id, f"{rows[0].closed_until:%Y-%m-%d %H:%M:%S}")


class Stopped(Exception):
    """Asked to stop while the event store was unreachable: the batch stays unstored and uncommitted."""


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
        announce: Announce | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        producer_conf: dict[str, Any] | None = None,
    ) -> None:
        """``kafka_conf``: the consumer's librdkafka settings; ``producer_conf``: the dead-letter
        producer's (default the same). A refused login or TLS handshake makes :meth:`run` raise
        ``KafkaRefused`` (their ``error_cb``), so a misconfigured member fails instead of idling."""
        self.settings = settings or IngestSettings()
        self.engine = engine
        self.store = IngestStore(engine, catalog)
        self.announce = announce
        self.on_batch = on_batch
        self.consumer = Consumer(
            {
                "logger": CLIENT_LOG,
                **with_error_cb(kafka_conf),
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
            "logger": CLIENT_LOG, **with_error_cb(producer_conf or kafka_conf), "linger.ms": 5,
            "message.max.bytes": self.settings.max_message_bytes * 4,
        })
        self.totals = BatchStats()
        self._pending: dict[tuple[str, int], int] = {}  # stored, not yet committed: high offset per partition
        self._last_durable = time.monotonic()
        self._stop = threading.Event()  # run()'s stop: ends a wait for an unreachable event store

    async def run(self, stop: threading.Event, max_idle_s: float | None = None) -> BatchStats:
        """Consume until ``stop`` is set (or ``max_idle_s`` without messages); always ends cleanly,
        committing what is stored. Raises ``KafkaRefused`` when the cluster refuses this member's
        credentials or TLS: waiting would not fix a setting."""
        self._stop = stop
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
                    try:
                        stats = await self.process_batch(msgs)
                    except Stopped:
                        log.warning("stopped while the event store was unreachable: that batch is consumed again")
                        break
                    self.totals.add(stats)
                    if self.on_batch:
                        self.on_batch(stats)
                    last_msg = time.monotonic()  # idle is time without messages, not time spent storing them
                elif max_idle_s is not None and time.monotonic() - last_msg > max_idle_s:
                    break
                if time.monotonic() - last_window_check > self.settings.window_check_interval_s:
                    last_window_check = time.monotonic()
                    try:
                        await self._close_stale()
                        await self._announce_pending()
                    except Exception as exc:
                        if self.store.error_kind(exc) != "connection":
                            raise
                        log.warning("event store unreachable, stale windows wait: %s", self.store.error_text(exc, 200))
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
        if err.code() in TRANSIENT_KAFKA_ERRORS or (err.retriable() and not err.fatal()):
            if err.code() != KafkaError._PARTITION_EOF:
                log.info("kafka: %s (the client recovers by itself)", err)
            return True
        raise KafkaException(err)

    async def process_batch(self, msgs: list[Message]) -> BatchStats:
        stats = BatchStats(consumed=len(msgs))
        accepted: list[Accepted] = []
        dead: list[DeadLetter] = []
        for msg in msgs:
            verdict = classify(msg, self.settings.max_message_bytes)
            if isinstance(verdict, DeadLetter):
                dead.append(verdict)
                stats.reasons[verdict.reason] += 1
            else:
                accepted.append((msg, verdict))
        self._dead_letter(dead)
        at = utcnow()
        try:
            _stored, closed_windows = await self._retrying(functools.partial(self._write, accepted, dead, at, stats))
        except Exception as exc:
            if self.store.error_kind(exc) != "data":
                raise
            log.warning("the event store refused a batch of %d events (%s): isolating the refused ones",
                        len(accepted), self.store.error_text(exc, 300))
            stored, closed_windows, refused = await self._isolate(accepted, at)
            rejected = [
                DeadLetter(m, STORE_REJECTED, f"{ev.kind} event {ev.event_id}: {err}") for (m, ev), err in refused
            ]
            self._dead_letter(rejected)
            stats.reasons[STORE_REJECTED] += len(rejected)
            await self._retrying(functools.partial(
                self._write, [], dead + rejected, at, stats, stored, len(closed_windows)))
        for m in msgs:
            # A consumed message (not an error event) always has its topic, partition and offset.
            key = (m.topic() or "", m.partition() or 0)
            self._pending[key] = max(self._pending.get(key, -1), m.offset() or 0)
        await self._commit_durable()
        await self._announce(closed_windows)
        return stats

    async def _write(
        self, accepted: list[Accepted], dead: list[DeadLetter], at: datetime, stats: BatchStats | None,
        stored_before: int = 0, closed_before: int = 0,
    ) -> tuple[int, list[ClosedWindow]]:
        """One transaction: events, dead letters, windows and, given ``stats``, the batch's record."""
        sensors = [(m, ev) for m, ev in accepted if isinstance(ev, SensorReading)]
        tests = [(m, ev) for m, ev in accepted if isinstance(ev, TestResult)]
        async with self.store.batch() as batch:
            new_sensor_ids = await batch.store_sensor_readings(sensors, at)
            new_test_ids = await batch.store_test_results(tests, at)
            await batch.record_dead_letters(dead, at)
            closed_windows = await batch.add_to_windows(_first_of_each(sensors, new_sensor_ids))
            stored = len(new_sensor_ids) + len(new_test_ids)
            if stats is not None:
                stats.late = len(batch.late)
                # Assigned, not added: a retried transaction must not count twice.
                stats.stored = stored_before + stored
                stats.dead_lettered = len(dead)
                stats.duplicates = stats.consumed - stats.dead_lettered - stats.stored
                stats.windows_closed = closed_before + len(closed_windows)
                stats.lag = self._lag()
                batch.record_batch(
                    consumer=self.settings.consumer_name, consumed=stats.consumed, stored=stats.stored,
                    duplicates=stats.duplicates, dead_lettered=stats.dead_lettered,
                    windows_closed=stats.windows_closed, lag=stats.lag,
                )
        if batch.late:  # committed: said once, not per retried transaction
            _log_late(batch.late)
        return stored, closed_windows

    async def _isolate(
        self, accepted: list[Accepted], at: datetime
    ) -> tuple[int, list[ClosedWindow], list[tuple[Accepted, str]]]:
        """Split a refused batch until each refused event is alone, storing every part the store takes.

        Each stored part is its own transaction; the idempotent store makes a replay of
        the batch after a crash in between harmless.
        """
        stored, closed, refused = 0, list[ClosedWindow](), list[tuple[Accepted, str]]()
        parts = [accepted]
        while parts:
            part = parts.pop()
            try:
                n, windows = await self._retrying(functools.partial(self._write, part, [], at, None))
            except Exception as exc:
                if self.store.error_kind(exc) != "data":
                    raise
                if len(part) == 1:
                    refused.append((part[0], self.store.error_text(exc)))
                    log.warning("the event store refused event %s: %s", part[0][1].event_id, refused[-1][1])
                else:
                    half = len(part) // 2
                    parts += [part[half:], part[:half]]  # the first half is tried first: stream order
                continue
            stored += n
            closed += windows
        return stored, closed, refused

    async def _retrying(self, write: Callable[[], Awaitable[T]]) -> T:
        """Run a write until it succeeds: a lost database is waited out, never taken for bad events."""
        delay = self.settings.db_retry_initial_s
        while True:
            try:
                return await write()
            except Exception as exc:
                if self.store.error_kind(exc) != "connection":
                    raise
                if self._stop.is_set():
                    raise Stopped from exc
                log.warning("event store unreachable (%s): retrying in %.1f s; offsets stay uncommitted",
                            self.store.error_text(exc, 200), delay)
                await asyncio.to_thread(self._stop.wait, delay)
                delay = min(delay * 2, self.settings.db_retry_max_s)

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
        while remaining and not failures:
            # The broker away (restarting): the producer retries until its message timeout;
            # wait with it, but never past a stop (the batch is then consumed again).
            if self._stop.is_set():
                raise Stopped(f"{remaining} dead letters undelivered")
            log.warning("%d dead letters not yet delivered (broker unreachable?): still trying", remaining)
            remaining = self.producer.flush(5)
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
            # A broker away (restarting) fails the commit likewise: these batches are
            # stored, so at worst they are re-read, and the next commit moves past them.
            if exc.args[0].code() not in TRANSIENT_KAFKA_ERRORS and not exc.args[0].retriable():
                raise
            log.warning("offset commit failed (%s): stored batches may be re-read, harmlessly", exc.args[0])

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

    # Announcement backoff: no announcement is tried before this (monotonic) time.
    _announce_retry_at: float = 0.0
    _announce_failures: int = 0

    async def _announce(self, windows: list[ClosedWindow]) -> None:
        """Announce windows in order until one fails; only those announced are marked so.

        The rest stay unannounced for the sweep (``_announce_pending``) to retry, after
        a backoff that doubles while announcements keep failing: ingest goes on storing
        events, and an unreachable Prefect API costs it one refused connection per try.
        """
        if not windows or self.announce is None or time.monotonic() < self._announce_retry_at:
            return
        accepted: list[int] = []
        recorded: list[int] = []  # marked announced by an announcer that sends no event
        try:
            for w in windows:
                result = self.announce(w)
                if inspect.isawaitable(result):
                    result = await asyncio.wait_for(result, self.settings.announce_timeout_s)
                (accepted if result else recorded).append(w.id)
            self._announce_failures = 0
        except Exception as exc:  # noqa: BLE001 - whatever failed, the window stays unannounced and is retried
            self._announce_failures += 1
            delay = min(self.settings.announce_retry_initial_s * 2 ** (self._announce_failures - 1),
                        self.settings.announce_retry_max_s)
            self._announce_retry_at = time.monotonic() + delay
            log.warning("window %s not announced (%s: %s); it and %d more stay unannounced, retried in %.0fs",
                        windows[len(accepted) + len(recorded)].id, type(exc).__name__, exc,
                        len(windows) - len(accepted) - len(recorded) - 1, delay)
        finally:
            await self.store.mark_announced(accepted, utcnow())
            await self.store.mark_announced(recorded, None)

    async def _announce_pending(self) -> None:
        """The sweep: announce what is due (never announced, or accepted long ago and still unjudged)."""
        if self.announce is None or time.monotonic() < self._announce_retry_at:
            return
        due = await self.store.windows_to_announce(
            timedelta(seconds=self.settings.recheck_after_s), timedelta(seconds=self.settings.recheck_horizon_s))
        if due:
            log.info("sweep: announcing %d closed window(s) not yet announced or still unjudged: %s",
                     len(due), [w.id for w in due])
        await self._announce(due)


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
