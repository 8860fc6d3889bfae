"""The event store's engines: the one place fabloop connects to its database.

Flows and tasks get an async engine without a connection pool: a flow run calls
``asyncio.run`` several times, and a pooled asyncio connection belongs to the loop
that opened it (SQLAlchemy's asyncio docs: share an ``AsyncEngine`` across event
loops only with ``NullPool``). The long-lived ingestor runs one loop and keeps its
connections (``pooled=True``). Alembic and Optuna are synchronous, so they get the
same database through a sync driver (``sync_url``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

T = TypeVar("T")

# Async drivers of the event store and the sync drivers that reach the same database.
_SYNC_DRIVERS = {"sqlite+aiosqlite://": "sqlite://", "postgresql+asyncpg://": "postgresql+psycopg://"}


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _sqlite_hooks(engine: Engine) -> None:
    """WAL, a large page cache and BEGIN IMMEDIATE on every SQLite connection of ``engine``."""

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" hook below emit BEGIN, so that it can be IMMEDIATE.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        # 32 MB of page cache instead of 2 MB: the event-id and wafer indexes take
        # random inserts, and once they outgrow the cache every insert re-reads
        # index pages (ingest slowed by a third over 100k SECOM-width events).
        cur.execute("PRAGMA cache_size=-32768")
        # Checkpoint the WAL every 64 MB instead of every 4 MB: an ingest batch of
        # SECOM-width readings is ~6 MB, so the default checkpointed (and fsynced)
        # after every batch; this cut ingest time by ~7 %. Durability is unchanged.
        cur.execute("PRAGMA wal_autocheckpoint=16384")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        # Take the write lock up front: two ingestors updating the same window
        # then serialise instead of failing with "database is locked" mid-way.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, *, pooled: bool = False) -> AsyncEngine:
    """An async engine for ``url``; SQLite gets WAL and a busy timeout for concurrent writers.

    ``pooled=False`` (NullPool) lets one engine serve several event loops, one after
    the other; ``pooled=True`` keeps connections open for a process that runs one loop.
    """
    kwargs: dict[str, Any] = {} if pooled else {"poolclass": NullPool}
    if _is_sqlite(url):
        kwargs["connect_args"] = {"timeout": 60}
    engine = create_async_engine(url, **kwargs)
    if _is_sqlite(url):
        _sqlite_hooks(engine.sync_engine)
    return engine


def make_sync_engine(url: str) -> Engine:
    """A synchronous engine (no pool) on the same database, for Alembic: same SQLite hooks."""
    url = sync_url(url)
    engine = create_engine(url, poolclass=NullPool, **({"connect_args": {"timeout": 60}} if _is_sqlite(url) else {}))
    if _is_sqlite(url):
        _sqlite_hooks(engine)
    return engine


@asynccontextmanager
async def engine_for(url: str) -> AsyncIterator[AsyncEngine]:
    """An engine for one piece of work (a CLI command, a summary), disposed afterwards."""
    engine = make_engine(url)
    try:
        yield engine
    finally:
        await engine.dispose()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, also when an event loop already runs in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def sync_url(url: str) -> str:
    """The same database through a synchronous driver (Alembic, Optuna's RDB storage)."""
    for async_prefix, sync_prefix in _SYNC_DRIVERS.items():
        if url.startswith(async_prefix):
            return sync_prefix + url[len(async_prefix):]
    return url


def optuna_storage(url: str) -> str:
    """Optuna's RDB storage URL for the event store's database (Optuna is synchronous)."""
    return sync_url(url)


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[Any]:
    return async_sessionmaker(engine, expire_on_commit=False)
