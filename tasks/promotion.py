"""The steps of a promotion or rollback that change something, one task run each.

Writing the audit row, tagging a version and moving an alias are separate tasks so
that the run graph shows what a decision did to the registry, and so that each can
be retried on its own. They take the flow run's engine or MLflow client, which no
cache key can hash: every task here uses ``NO_CACHE``, and keeps no result
(``persist_result=False``, whatever the promote flow persists): a resumed promotion
runs again from the top and decides from the audit rows and the registry, never
from a task's earlier result. Reads that only prepare the decision page are plain
functions, run inline.
"""

from __future__ import annotations

from typing import Any

from mlflow import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy.ext.asyncio import AsyncEngine

from fabloop.adapters import registry, store
from fabloop.core.approval import ApprovalRecord
from fabloop.core.names import CHALLENGER, CHAMPION
from fabloop.tasks.retries import TRANSIENT

# --- writes: one task run per step ----------------------------------------------------------


@task(name="record-decision", cache_policy=NO_CACHE, persist_result=False, **TRANSIENT)
def record_decision(engine: AsyncEngine, record: ApprovalRecord) -> ApprovalRecord:
    """Append the decision to the approvals table (the audit trail); returns it with id and time."""
    return store.run_sync(store.record_decision(engine, record))


@task(name="complete-decision", cache_policy=NO_CACHE, persist_result=False, **TRANSIENT)
def complete_decision(
    engine: AsyncEngine, record: ApprovalRecord, previous: str | None, detail: dict[str, Any] | None = None
) -> ApprovalRecord:
    """Mark an intended decision completed once its aliases moved (safe to repeat)."""
    assert record.id is not None  # an intent is recorded before it is completed
    return store.run_sync(store.complete_decision(engine, record.id, previous, detail))


@task(name="tag-version", cache_policy=NO_CACHE, persist_result=False, **TRANSIENT)
def tag_version(mlflow: MlflowClient, model: str, version: str, tags: dict[str, object]) -> None:
    """Write the decision to the version's ``fabloop.*`` tags, where the MLflow UI shows it."""
    registry.set_tags(mlflow, model, version, tags)


@task(name="promote-to-champion", cache_policy=NO_CACHE, persist_result=False, **TRANSIENT)
def promote_to_champion(mlflow: MlflowClient, model: str, version: str, replaced: str | None = None) -> str | None:
    """Move ``champion`` to ``version`` (the replaced champion keeps ``previous``); returns the replaced one.

    Safe to repeat: a retry, or a later run completing an intended decision, finishes the same move.
    """
    return registry.promote_to_champion(mlflow, model, version, replaced)


@task(name="drop-challenger-alias", cache_policy=NO_CACHE, persist_result=False, **TRANSIENT)
def drop_challenger_alias(mlflow: MlflowClient, model: str, version: str) -> None:
    """Take ``challenger`` off ``version`` unless a newer challenger already carries it."""
    registry.drop_alias_if_on(mlflow, model, CHALLENGER, version)


@task(name="rollback-champion", cache_policy=NO_CACHE, persist_result=False, **TRANSIENT)
def rollback_champion(mlflow: MlflowClient, model: str, planned: tuple[str, str]) -> tuple[str, str]:
    """Move ``champion`` back from ``planned`` (demoted, restored); returns them. Safe to repeat."""
    return registry.rollback_champion(mlflow, model, planned)


# --- reads for the decision page -------------------------------------------------------------


def champion_version(mlflow: MlflowClient, model: str) -> str | None:
    """The version carrying ``champion`` (None before the first promotion); the model must exist."""
    return registry.aliases(mlflow, model).get(CHAMPION)


def decision_links(
    mlflow: MlflowClient, tracking_uri: str, model: str, challenger: str, champion: str | None, given: dict[str, str]
) -> dict[str, str]:
    """Model version pages and training runs of both versions; links given by the caller win."""
    out: dict[str, str] = {}
    versions = {"challenger": challenger} | ({"champion": champion} if champion else {})
    for role, version in versions.items():
        out[f"{role}_version"] = registry.version_url(tracking_uri, model, version)
        info = registry.describe(mlflow, model, version)
        if info.run_id and info.experiment_id:
            out[f"{role}_run"] = registry.run_url(tracking_uri, info.experiment_id, info.run_id)
    return out | {k: v for k, v in given.items() if v}


def recorded_decisions(engine: AsyncEngine, model: str) -> list[ApprovalRecord]:
    """The model's audit trail, oldest first (a promotion resumes an intended decision from it)."""
    return store.run_sync(store.decisions(engine, model))
