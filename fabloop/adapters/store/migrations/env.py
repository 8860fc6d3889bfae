"""Alembic's environment for the event store, configured in code (there is no alembic.ini).

``fabloop.adapters.store.migrate`` builds the ``Config`` and hands over a
connection whose transaction already holds the migration lock (in
``config.attributes["connection"]``), so the version check and the upgrade run
under it. Without one, a sync engine is made from ``sqlalchemy.url``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from fabloop.adapters.store._engine import make_sync_engine
from fabloop.adapters.store._migrate import VERSION_TABLE
from fabloop.adapters.store._schema import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        compare_type=True,
        # SQLite alters a table by copying it; batch mode lets later revisions do that.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
        version_table=VERSION_TABLE, literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection: Connection | None = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    engine = make_sync_engine(config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.begin() as conn:
            _configure(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
