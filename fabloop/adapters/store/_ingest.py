"""The ingestor's writes: one transaction per Kafka batch, windows, dead letters, durability.

``fabloop.adapters.ingestor`` consumes and validates; everything it writes goes
through ``IngestStore`` here. A batch is one transaction (``IngestStore.batch``):
the good events (idempotent on event id), the dead letters, the new readings'
window memberships (closing full windows) and the batch record commit together.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, cast

from asyncpg.exceptions import InterfaceError as PgClientError
from sqlalchemy import Table, func, insert, select, text, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from fabloop.adapters.store._checks import CLAIMED
from fabloop.adapters.store._engine import sessionmaker
from fabloop.adapters.store._migrate import migrate
from fabloop.adapters.store._schema import (
    Base,
    DeadLetterRow,
    DriftCheckRow,
    IngestBatchRow,
    SensorReadingRow,
    TestResultRow,
    WindowRow,
    WindowWaferRow,
    utcnow,
)
from fabloop.core.schemas import SensorReading, TestResult
from fabloop.core.scopes import ModelCatalogValue, ModelSpec

INSERT_PAGE_ROWS = 50  # rows per multi-row INSERT statement (see _store_events)
WINDOW_LOCK_ID = 7_301_733  # PostgreSQL advisory lock serialising window updates across ingestors


class SourceMessage(Protocol):
    """What the store reads off a consumed Kafka message (``confluent_kafka.Message``)."""

    def topic(self) -> Any: ...
    def partition(self) -> Any: ...
    def offset(self) -> Any: ...
    def value(self) -> Any: ...


class RefusedMessage(Protocol):
    """A consumed message that failed validation, and why."""

    @property
    def msg(self) -> SourceMessage: ...
    @property
    def reason(self) -> str: ...
    @property
    def detail(self) -> str: ...


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


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _dialect(session: AsyncSession) -> str:
    return session.get_bind().dialect.name


def _insert(session: AsyncSession) -> Any:
    return postgresql.insert if _dialect(session) == "postgresql" else sqlite.insert


def _sensor_row(msg: SourceMessage, ev: SensorReading, at: datetime) -> dict[str, Any]:
    return {
        "event_id": ev.event_id, "ts": ev.ts, "fab": ev.fab, "tool": ev.tool, "chamber": ev.chamber,
        "recipe": ev.recipe, "step": ev.step, "lot": ev.lot, "wafer": ev.wafer,
        "payload": msg.value().decode(), "topic": msg.topic(), "partition": msg.partition(),
        "offset": msg.offset(), "ingested_at": at,
    }


def _test_row(msg: SourceMessage, ev: TestResult, at: datetime) -> dict[str, Any]:
    return {
        "event_id": ev.event_id, "ts": ev.ts, "lot": ev.lot, "wafer": ev.wafer, "program": ev.program,
        "stage": ev.stage, "passed": ev.passed, "yield_pct": ev.yield_pct, "part_id": ev.part_id,
        "hard_bin": ev.hard_bin, "soft_bin": ev.soft_bin, "payload": msg.value().decode(),
        "topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(), "ingested_at": at,
    }


async def _store_events(session: AsyncSession, table: type[Base], rows: list[dict[str, Any]]) -> set[str]:
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
    core = cast(Table, table.__table__)
    if _dialect(session) == "sqlite":
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


ErrorKind = Literal["data", "connection", "other"]

# SQLSTATE classes (PostgreSQL): 22 data exception, 23 integrity constraint violation
# are about the rows; 08 connection, 53 resources, 57 operator intervention (a
# restart), 40 serialization/deadlock pass once the database is back or calmer.
_DATA_SQLSTATES = ("22", "23")
_TRANSIENT_SQLSTATES = ("08", "53", "57", "40")
_TRANSIENT_SQLITE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_FULL")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The error and what it wraps: SQLAlchemy's ``orig``, then the driver's cause."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else (current.__cause__ or current.__context__)


def error_kind(exc: BaseException) -> ErrorKind:
    """Whether a failed write was refused for its rows ("data"), lost the database
    ("connection": wait and retry, the rows are fine), or failed otherwise."""
    for e in _causes(exc):
        if isinstance(e, sa_exc.DBAPIError) and e.connection_invalidated:
            return "connection"
        if isinstance(e, sa_exc.DisconnectionError | sa_exc.TimeoutError):
            return "connection"
        sqlstate = getattr(e, "sqlstate", None)
        if isinstance(sqlstate, str) and len(sqlstate) == 5:
            if sqlstate.startswith(_DATA_SQLSTATES):
                return "data"
            return "connection" if sqlstate.startswith(_TRANSIENT_SQLSTATES) else "other"
        if isinstance(e, PgClientError):
            # asyncpg's client-side DataError (a ValueError): a value its codec cannot send,
            # e.g. an int beyond int4; any other interface error is a closed or busy connection.
            return "data" if isinstance(e, ValueError) else "connection"
        if isinstance(e, sqlite3.Error):
            name = getattr(e, "sqlite_errorname", "") or ""
            if name.startswith(_TRANSIENT_SQLITE):
                return "connection"
            refused = isinstance(e, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.InterfaceError)
            return "data" if refused else "other"
        if isinstance(e, OSError | TimeoutError):
            return "connection"
        if isinstance(e, OverflowError | ValueError):
            return "data"  # a bind-time conversion: "Python int too large to convert to SQLite INTEGER"
    return "other"


def error_text(exc: BaseException, limit: int = 500) -> str:
    """The database's own message (the innermost cause), without SQLAlchemy's statement and parameters."""
    *_, root = _causes(exc)
    text_ = f"{type(root).__name__}: {root}".replace("\x00", "\\x00")
    return text_ if len(text_) <= limit else text_[: limit - 1] + "…"


async def _lock_windows(session: AsyncSession) -> None:
    if _dialect(session) == "postgresql":
        await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": WINDOW_LOCK_ID})


@dataclass(frozen=True)
class LateReading:
    """A stored reading older than the end of its scope's last closed window: in no window."""

    model: str
    event_id: str
    ts: datetime
    closed_until: datetime


class WindowBook:
    """Adds stored sensor readings to their scopes' open windows and closes full ones.

    Windows are cut in event time: a scope's windows never overlap. A reading is added
    to its scope's open window only if it is no older than the end (``ts_end``) of the
    scope's last closed window; within a batch a scope's readings are taken oldest
    first. A reading older than that is *late*: the window it belongs to was already
    judged, and putting it into the open window would make that window reach back over
    the closed one. It stays stored (the training sets read the store by scope, not by
    window), is left out of every window, and is logged and counted as late in the
    batch record's log line (``BatchWriter.late``); a late reading is exactly one of
    its scope's readings without a window membership.

    Late readings are rare by construction: the producer keys readings by their scope
    (``fabloop.adapters.kafka.partition_key``), so a scope's readings arrive in the
    order they were produced. They happen when a tool's buffered readings arrive after
    newer ones, or when a catalog scopes models across the producer's key.
    """

    def __init__(self, catalog: ModelCatalogValue) -> None:
        self.catalog = catalog

    def spec_for(self, model: str) -> ModelSpec | None:
        for spec in self.catalog.models:
            if model.startswith(spec.name + "-"):
                return spec
        return None

    async def add(
        self, session: AsyncSession, readings: Sequence[tuple[SourceMessage, SensorReading]],
        late: list[LateReading] | None = None,
    ) -> list[WindowRow]:
        """Add readings to their windows; returns the windows closed. Late readings go to ``late``."""
        late = late if late is not None else []
        if not readings:
            return []
        await _lock_windows(session)
        by_model: dict[str, tuple[ModelSpec, dict[str, str], list[tuple[SourceMessage, SensorReading]]]] = {}
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
        # Each scope's event-time watermark: where its last closed window ended.
        closed_until: dict[str, datetime] = {
            model: _aware(ts_end)
            for model, ts_end in (
                await session.execute(
                    select(WindowRow.model, func.max(WindowRow.ts_end))
                    .where(WindowRow.status == "closed", WindowRow.model.in_(list(by_model)))
                    .group_by(WindowRow.model)
                )
            ).all()
            if ts_end is not None
        }
        closed: list[WindowRow] = []
        members: list[dict[str, Any]] = []
        for model, (spec, scope, items) in by_model.items():
            items.sort(key=lambda it: it[1].ts)
            window = open_rows.get(model)
            watermark = closed_until.get(model)
            if watermark is not None:
                # Sorted: the late readings are a prefix.
                n_late = next((k for k, (_m, ev) in enumerate(items) if ev.ts >= watermark), len(items))
                late.extend(LateReading(model, ev.event_id, ev.ts, watermark) for _m, ev in items[:n_late])
                items = items[n_late:]
            i = 0
            while i < len(items):
                if window is None:
                    window = WindowRow(
                        model=model, scope=scope, status="open", opened_at=utcnow(), offsets={}, wafer_count=0
                    )
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
                    partition, offset = f"{msg.topic()}:{msg.partition()}", msg.offset()
                    lo, hi = offsets.get(partition, (offset, offset))
                    offsets[partition] = [min(lo, offset), max(hi, offset)]
                    members.append({"window_id": window.id, "event_id": ev.event_id})
                    if count >= spec.window_wafers:
                        reason = "wafer_count"
                window.wafer_count, window.ts_start, window.ts_end, window.offsets = count, ts_start, ts_end, offsets
                if reason:
                    window.status, window.close_reason, window.closed_at = "closed", reason, utcnow()
                    closed.append(window)
                    window = None
                    # The next window starts where this one ended: this batch's readings of
                    # the scope older than that (the closed window held newer ones from an
                    # earlier batch) are late too.
                    assert ts_end is not None
                    n_late = next((k for k in range(i, len(items)) if items[k][1].ts >= ts_end), len(items)) - i
                    until = _aware(ts_end)
                    late.extend(LateReading(model, ev.event_id, ev.ts, until) for _m, ev in items[i:i + n_late])
                    i += n_late
        await session.flush()
        # One executemany for the memberships (the windows they point at exist by now).
        if members:  # an empty list would execute one "INSERT ... DEFAULT VALUES"
            await session.execute(insert(cast(Table, WindowWaferRow.__table__)), members)
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
    return ClosedWindow(
        w.id, w.model, dict(w.scope), w.wafer_count, w.ts_start, w.ts_end, dict(w.offsets), w.close_reason or ""
    )


class BatchWriter:
    """The writes of one ingest batch, all inside the batch's transaction."""

    def __init__(self, session: AsyncSession, book: WindowBook) -> None:
        self.session = session
        self.book = book
        self.late: list[LateReading] = []  # stored readings this batch left out of every window

    async def store_sensor_readings(
        self, readings: Sequence[tuple[SourceMessage, SensorReading]], at: datetime
    ) -> set[str]:
        """Store the readings not stored before; returns their event ids."""
        return await _store_events(self.session, SensorReadingRow, [_sensor_row(m, e, at) for m, e in readings])

    async def store_test_results(self, results: Sequence[tuple[SourceMessage, TestResult]], at: datetime) -> set[str]:
        """Store the test results not stored before; returns their event ids."""
        return await _store_events(self.session, TestResultRow, [_test_row(m, e, at) for m, e in results])

    async def record_dead_letters(self, dead: Sequence[RefusedMessage], at: datetime) -> None:
        if not dead:
            return
        await self.session.execute(
            _insert(self.session)(DeadLetterRow).on_conflict_do_nothing(),
            [
                {"topic": d.msg.topic(), "partition": d.msg.partition(), "offset": d.msg.offset(),
                 # A refusal's detail may quote the NUL that got the event refused; PostgreSQL text cannot hold it.
                 "reason": d.reason, "detail": d.detail[:2000].replace("\x00", "\\x00"),
                 "size": len(d.msg.value() or b""), "at": at}
                for d in dead
            ],
        )

    async def add_to_windows(self, readings: Sequence[tuple[SourceMessage, SensorReading]]) -> list[ClosedWindow]:
        """Add newly stored readings (each once) to their windows; returns the windows this closed.

        Readings older than their scope's last closed window are kept out (``self.late``).
        """
        return [_closed(w) for w in await self.book.add(self.session, readings, self.late)]

    def record_batch(
        self, consumer: str, consumed: int, stored: int, duplicates: int, dead_lettered: int,
        windows_closed: int, lag: int | None,
    ) -> None:
        self.session.add(IngestBatchRow(
            consumer=consumer, consumed=consumed, stored=stored, duplicates=duplicates,
            dead_lettered=dead_lettered, windows_closed=windows_closed, lag=lag,
        ))


class IngestStore:
    """The event store as one ingestor sees it (it keeps a pooled engine for its lifetime)."""

    def __init__(self, engine: AsyncEngine, catalog: ModelCatalogValue) -> None:
        self.engine = engine
        self.sessions = sessionmaker(engine)
        self.book = WindowBook(catalog)

    @property
    def durable_on_commit(self) -> bool:
        """PostgreSQL fsyncs at commit; SQLite (``synchronous=NORMAL``) only at a checkpoint."""
        return self.engine.dialect.name != "sqlite"

    async def prepare(self) -> None:
        """Bring the schema to head (the ingestor is the store's first writer)."""
        await asyncio.to_thread(migrate, self.engine.url.render_as_string(hide_password=False))

    @asynccontextmanager
    async def batch(self) -> AsyncIterator[BatchWriter]:
        """One transaction for one Kafka batch; it commits when the block ends without error."""
        async with self.sessions() as session, session.begin():
            yield BatchWriter(session, self.book)

    error_kind = staticmethod(error_kind)
    error_text = staticmethod(error_text)

    async def close_stale_windows(self) -> list[ClosedWindow]:
        async with self.sessions() as session, session.begin():
            await _lock_windows(session)
            return [_closed(w) for w in await self.book.close_stale(session)]

    async def mark_announced(self, window_ids: list[int], accepted_at: datetime | None) -> None:
        """Mark windows announced; ``accepted_at``: when the Prefect API accepted their events.

        None marks them announced without an event (a set-up or backfill that must
        not be judged): the sweep never re-announces those.
        """
        if not window_ids:
            return
        async with self.sessions() as session, session.begin():
            await session.execute(update(WindowRow).where(WindowRow.id.in_(window_ids))
                                  .values(announced=True, announced_at=accepted_at))

    async def windows_to_announce(self, recheck_after: timedelta, horizon: timedelta) -> list[ClosedWindow]:
        """Closed windows to announce now, oldest first.

        Those never announced (closed before a crash, or while the Prefect API was
        unreachable), and those whose event the API accepted more than
        ``recheck_after`` ago that still have no verdict (no check, or a check's
        claim that long without one), for ``horizon`` after they closed. A window
        announced again waits at least as long as it had waited before (5, 10, 20
        minutes…): a backlog of checks is not swelled by a re-announcement of every
        window it holds at every sweep.
        """
        now = utcnow()
        judged = (select(DriftCheckRow.id)
                  .where(DriftCheckRow.window_id == WindowRow.id)
                  .where((DriftCheckRow.status != CLAIMED) | (DriftCheckRow.checked_at > now - recheck_after)))
        due = select(WindowRow).where(
            WindowRow.status == "closed",
            WindowRow.announced.is_(False)
            | ((WindowRow.announced_at < now - recheck_after) & (WindowRow.closed_at > now - horizon)
               & ~judged.exists()),
        ).order_by(WindowRow.id)
        async with self.sessions() as session:
            rows = (await session.execute(due)).scalars().all()
        return [_closed(w) for w in rows if not w.announced or w.announced_at is None or w.closed_at is None
                or now - w.announced_at >= w.announced_at - w.closed_at]

    async def checkpoint(self, mode: str) -> bool:
        """Run a SQLite WAL checkpoint; True when every frame reached the database file.

        With ``synchronous=NORMAL`` SQLite fsyncs the WAL before a checkpoint and the
        database after a complete one. ``PASSIVE`` never waits; ``FULL`` (on stop)
        waits for readers and writers through the busy timeout.
        """
        async with self.engine.connect() as conn:
            # The driver connection: a checkpoint must not run inside the BEGIN IMMEDIATE
            # that SQLAlchemy's begin hook would open.
            raw = await conn.get_raw_connection()
            assert raw.driver_connection is not None  # an open aiosqlite connection
            cursor = await raw.driver_connection.execute(f"PRAGMA wal_checkpoint({mode})")
            busy, frames, checkpointed = await cursor.fetchone()
            await cursor.close()
        return busy == 0 and frames == checkpointed
