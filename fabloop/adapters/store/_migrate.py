"""The event store's schema comes from Alembic migrations (``migrations/``), applied by ``migrate``.

``fabloop up`` and every ingest run call ``migrate``; it is idempotent, and two
processes calling it at once serialise on a lock taken before Alembic reads the
schema version (SQLite: the write lock of ``BEGIN IMMEDIATE``; PostgreSQL: an
advisory lock held until the migration transaction ends), so the second one
finds the schema at head and changes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, inspect, text

from fabloop.adapters.store._engine import make_sync_engine, sync_url
from fabloop.adapters.store._schema import Base

if TYPE_CHECKING:  # Alembic is imported when a migration runs, not by every process that opens the store
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
BASELINE = "0001"  # the revision that creates the schema stores had before Alembic
MIGRATION_LOCK_ID = 7_301_734  # PostgreSQL advisory lock serialising migrations
# Not Alembic's default ``alembic_version``: Optuna's RDB storage keeps its own schema
# version under that name, in the same database, and refuses a revision it does not know.
VERSION_TABLE = "fabloop_schema_version"


def alembic_config(url: str, connection: Connection | None = None) -> Config:
    """Alembic's configuration, built in code: the migrations folder and the database."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolates "%" (percent-encoded passwords): escape it.
    config.set_main_option("sqlalchemy.url", sync_url(url).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _lock(conn: Connection) -> None:
    # SQLite: the engine's begin hook has already issued BEGIN IMMEDIATE (the write lock).
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_ID})


def migrate(url: str) -> None:
    """Bring the event store at ``url`` to the newest schema (``alembic upgrade head``)."""
    from alembic import command

    engine = make_sync_engine(url)
    try:
        with engine.begin() as conn:
            _lock(conn)
            config = alembic_config(url, conn)
            tables = set(inspect(conn).get_table_names())
            if VERSION_TABLE not in tables and tables & set(Base.metadata.tables):
                # A store created before migrations existed holds the baseline schema.
                command.stamp(config, BASELINE)
            command.upgrade(config, "head")
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    """The schema revision the store at ``url`` is at (None: never migrated)."""
    from alembic.migration import MigrationContext

    engine = make_sync_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
    finally:
        engine.dispose()


def _ours(name: str | None, type_: str, _parent: Any) -> bool:
    """Only fabloop's tables count: Optuna keeps its studies in the same database."""
    return type_ != "table" or name in Base.metadata.tables


def schema_drift(url: str) -> list[Any]:
    """Differences between the store at ``url`` and the ORM rows (empty: migrations and models agree)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = make_sync_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={
                "compare_type": True, "version_table": VERSION_TABLE, "include_name": _ours,
            })
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()
