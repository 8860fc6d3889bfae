"""How ingest reads a failed write: the events' fault (isolate them) or a lost database (wait)."""

from __future__ import annotations

import sqlite3
import tempfile

import asyncpg.exceptions as pg
import pytest
import sqlalchemy.exc as sa
from asyncpg.exceptions._base import DataError as PgClientDataError

from fabloop.adapters.store import IngestStore


def _sqlite_error(sql: str, *params: object, setup: str = "") -> BaseException:
    """A real error from a real (in-memory) SQLite database."""
    conn = sqlite3.connect(":memory:")
    try:
        if setup:
            conn.executescript(setup)
        conn.execute(sql, params)
    except (sqlite3.Error, OverflowError) as exc:
        return exc
    finally:
        conn.close()
    raise AssertionError(f"{sql} did not fail")


def _sqlite_busy() -> sqlite3.OperationalError:
    """A real "database is locked": another connection holds the write lock."""
    with tempfile.TemporaryDirectory() as tmp:
        holder = sqlite3.connect(f"{tmp}/db", isolation_level=None)
        other = sqlite3.connect(f"{tmp}/db", timeout=0, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            try:
                other.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                return exc
            raise AssertionError("the second writer was not refused")
        finally:
            other.close()
            holder.close()


def _wrapped(orig: BaseException, invalidated: bool = False) -> sa.DBAPIError:
    """As SQLAlchemy raises it: the driver's error as ``orig``, the statement and parameters around it."""
    exc = sa.DBAPIError.instance("INSERT INTO t VALUES (?)", (1,), orig, Exception,
                                 connection_invalidated=invalidated)
    exc.__cause__ = orig
    return exc


def _via_adapter(orig: BaseException) -> sa.DBAPIError:
    """asyncpg through SQLAlchemy's adapter: the adapter's error wraps the driver's as its cause."""
    adapted = Exception(str(orig))
    adapted.__cause__ = orig
    return _wrapped(adapted)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        # The events' fault: split the batch, dead-letter the refused ones.
        (_sqlite_error("SELECT ?", 2**63), "data"),  # Python int too large to convert to SQLite INTEGER
        (_wrapped(_sqlite_error("INSERT INTO t VALUES (NULL)", setup="CREATE TABLE t (x NOT NULL);")), "data"),
        (_via_adapter(PgClientDataError("invalid input for query argument $1: 2147483648 (value out of int32 range)")),
         "data"),
        (_via_adapter(pg.StringDataRightTruncationError("value too long for type character varying(255)")), "data"),
        (_via_adapter(pg.CharacterNotInRepertoireError("invalid byte sequence for encoding UTF8: 0x00")), "data"),
        (_via_adapter(pg.UniqueViolationError("duplicate key value")), "data"),
        (sa.StatementError("naive datetime", "INSERT", {}, ValueError("naive datetime given to the event store")),
         "data"),
        # The database away: wait and retry, never blame the events.
        (_via_adapter(pg.AdminShutdownError("terminating connection due to administrator command")), "connection"),
        (_via_adapter(pg.ConnectionDoesNotExistError("connection was closed in the middle of operation")),
         "connection"),
        (_via_adapter(pg.CannotConnectNowError("the database system is starting up")), "connection"),
        (_via_adapter(pg.InterfaceError("connection is closed")), "connection"),
        (_via_adapter(pg.DeadlockDetectedError("deadlock detected")), "connection"),
        (ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)"), "connection"),
        (_wrapped(pg.PostgresError("anything"), invalidated=True), "connection"),
        (_wrapped(_sqlite_busy()), "connection"),
        # Neither: a bug or a missing table fails the run (and the trigger restarts it).
        (_via_adapter(pg.UndefinedTableError('relation "windows" does not exist')), "other"),
        (_wrapped(_sqlite_error("INSERT INTO windows VALUES (1)")), "other"),  # no such table
        (RuntimeError("unexpected"), "other"),
    ],
)
def test_a_failed_write_is_read_as_the_events_fault_or_a_lost_database(exc: BaseException, kind: str) -> None:
    assert IngestStore.error_kind(exc) == kind


def test_the_dead_letter_detail_is_the_databases_message_without_statement_or_nul() -> None:
    exc = _via_adapter(pg.CharacterNotInRepertoireError("invalid byte sequence: \x00 here"))
    text = IngestStore.error_text(exc)
    assert text.startswith("CharacterNotInRepertoireError: invalid byte sequence")
    assert "\x00" not in text and "INSERT" not in text
    assert len(IngestStore.error_text(RuntimeError("x" * 5000), limit=100)) == 100
