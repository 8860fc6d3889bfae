"""The event store's schema comes from its Alembic migrations, beside Optuna's own tables."""

from __future__ import annotations

from pathlib import Path

import optuna

from fabloop.adapters import store


def test_migrations_build_the_orm_schema_and_are_idempotent(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    assert store.current_revision(url) is None
    store.migrate(url)
    store.migrate(url)
    assert store.current_revision(url) == "0001"
    assert store.schema_drift(url) == []


def test_optuna_studies_share_the_database_without_touching_the_schema_version(tmp_path: Path) -> None:
    """Optuna versions its tables in ``alembic_version``; fabloop's revision lives elsewhere."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    store.migrate(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=store.optuna_storage(url), study_name="yield-ETCH-01")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    store.migrate(url)
    assert store.current_revision(url) == "0001"
    assert store.schema_drift(url) == []
    assert len(optuna.load_study(study_name="yield-ETCH-01", storage=store.optuna_storage(url)).trials) == 2
