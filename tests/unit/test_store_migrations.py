"""The event store's schema comes from its Alembic migrations, beside Optuna's own tables."""

from __future__ import annotations

from pathlib import Path

import optuna
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import text

from fabloop.adapters import store
from fabloop.adapters.store._engine import make_sync_engine
from fabloop.adapters.store._migrate import alembic_config

HEAD = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def test_migrations_build_the_orm_schema_and_are_idempotent(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    assert store.current_revision(url) is None
    store.migrate(url)
    store.migrate(url)
    assert store.current_revision(url) == HEAD
    assert store.schema_drift(url) == []


def test_optuna_studies_share_the_database_without_touching_the_schema_version(tmp_path: Path) -> None:
    """Optuna versions its tables in ``alembic_version``; fabloop's revision lives elsewhere."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    store.migrate(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=store.optuna_storage(url), study_name="yield-ETCH-01")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    store.migrate(url)
    assert store.current_revision(url) == HEAD
    assert store.schema_drift(url) == []
    assert len(optuna.load_study(study_name="yield-ETCH-01", storage=store.optuna_storage(url)).trials) == 2


def test_a_store_with_several_checks_of_a_window_keeps_the_first(tmp_path: Path) -> None:
    """Revision 0002 makes drift_checks.window_id unique; checks recorded twice before it are merged."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    engine = make_sync_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(url, conn), "0001")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO windows (id, model, scope, status, opened_at, wafer_count, offsets, announced)"
                          " VALUES (1, 'm', '{}', 'closed', '2026-01-01', 0, '{}', 1)"))
        for i in (1, 2, 3):
            conn.execute(text("INSERT INTO drift_checks (id, window_id, model, checked_at, status, drifted,"
                              " performance_breach, reason, detail)"
                              f" VALUES ({i}, 1, 'm', '2026-01-01', 'ok', 0, 0, 'r', '{{}}')"))
            conn.execute(text(f"INSERT INTO feature_drift VALUES ({i}, 's001', 'psi', 1, 1, 0, 'ok')"))
            conn.execute(text("INSERT INTO retrain_triggers (id, model, window_id, check_id, at, kind, action, reason)"
                              f" VALUES ({i}, 'm', 1, {i}, '2026-01-01', 'drift', 'started', 'r')"))
    store.migrate(url)
    assert store.current_revision(url) == HEAD
    assert store.schema_drift(url) == []
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM drift_checks")).scalars().all() == [1]
        assert conn.execute(text("SELECT check_id FROM feature_drift")).scalars().all() == [1]
        assert conn.execute(text("SELECT check_id FROM retrain_triggers")).scalars().all() == [1, 1, 1]
    engine.dispose()
