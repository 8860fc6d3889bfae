"""The MLflow model registry as fabloop uses it: aliases name the roles.

``champion`` is the version in production, ``challenger`` the candidate waiting
for a decision, ``previous`` the champion before the last promotion (the target
of a rollback). Decisions are also written to the version's tags (prefix
``fabloop.``), so the MLflow UI shows who promoted a version, when and why.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING
from urllib.parse import quote

from pydantic import BaseModel

if TYPE_CHECKING:  # importing mlflow costs seconds; a CLI listing only needs the URLs
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.exceptions import MlflowException

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"

TAG_PREFIX = "fabloop."
# Longest comment kept in a tag (the approvals table keeps all of it).
MAX_TAG_VALUE = 5000


class RegistryError(RuntimeError):
    """A registry state that makes the requested operation impossible (named in the message)."""


class VersionInfo(BaseModel):
    """What the decision page needs to know about one model version."""

    model: str
    version: str
    run_id: str | None
    experiment_id: str | None
    aliases: list[str]
    tags: dict[str, str]


def client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def version_url(tracking_uri: str, model: str, version: str) -> str:
    """The model version page in the MLflow UI."""
    return f"{tracking_uri.rstrip('/')}/#/models/{quote(model, safe='')}/versions/{version}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _missing(exc: MlflowException) -> bool:
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def get_version(mlflow: MlflowClient, model: str, version: str) -> ModelVersion:
    """The version, or a :class:`RegistryError` naming the model and version."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.get_model_version(model, str(version))
    except MlflowException as exc:
        if _missing(exc):
            raise RegistryError(f"model {model!r} has no version {version!r} in the registry") from None
        raise


def describe(mlflow: MlflowClient, model: str, version: str) -> VersionInfo:
    from mlflow.exceptions import MlflowException

    mv = get_version(mlflow, model, version)
    experiment_id = None
    if mv.run_id:
        try:
            experiment_id = mlflow.get_run(mv.run_id).info.experiment_id
        except MlflowException:
            experiment_id = None  # the run was deleted: the version page still works
    return VersionInfo(
        model=model, version=str(mv.version), run_id=mv.run_id or None, experiment_id=experiment_id,
        aliases=list(mv.aliases or []), tags=dict(mv.tags or {}),
    )


def aliases(mlflow: MlflowClient, model: str) -> dict[str, str]:
    """Every alias of ``model`` and the version it names (one registry call)."""
    from mlflow.exceptions import MlflowException

    try:
        registered = mlflow.get_registered_model(model)
    except MlflowException as exc:
        if _missing(exc):
            raise RegistryError(f"model {model!r} is not in the registry") from None
        raise
    return {alias: str(version) for alias, version in (registered.aliases or {}).items()}


def alias_version(mlflow: MlflowClient, model: str, alias: str) -> str | None:
    """The version carrying ``alias``, or None when no version has it."""
    return aliases(mlflow, model).get(alias)


def set_tags(mlflow: MlflowClient, model: str, version: str, tags: dict[str, object]) -> None:
    """Write ``fabloop.<key>`` tags on a version (None values are skipped)."""
    for key, value in tags.items():
        if value is None:
            continue
        text = value.isoformat() if isinstance(value, datetime) else str(value)
        mlflow.set_model_version_tag(model, str(version), f"{TAG_PREFIX}{key}", text[:MAX_TAG_VALUE])


def drop_alias_if_on(mlflow: MlflowClient, model: str, alias: str, version: str) -> None:
    """Remove ``alias`` only if it still names ``version`` (a newer challenger keeps its alias)."""
    if alias_version(mlflow, model, alias) == str(version):
        mlflow.delete_registered_model_alias(model, alias)


def promote_to_champion(mlflow: MlflowClient, model: str, version: str) -> str | None:
    """Make ``version`` the champion; the champion it replaces keeps the ``previous`` alias.

    The ``champion`` alias moves in a single registry call, so a reader never sees
    a model without a champion. Returns the replaced champion's version (None for
    a model's first champion).
    """
    get_version(mlflow, model, version)
    before = alias_version(mlflow, model, CHAMPION)
    if before is not None and before != str(version):
        mlflow.set_registered_model_alias(model, PREVIOUS, before)
    mlflow.set_registered_model_alias(model, CHAMPION, str(version))
    drop_alias_if_on(mlflow, model, CHALLENGER, version)
    return before if before != str(version) else None


def rollback_champion(mlflow: MlflowClient, model: str) -> tuple[str, str]:
    """Move ``champion`` back to ``previous``; returns (demoted, restored) versions.

    Afterwards ``previous`` names the champion the restored version had replaced
    (read from its ``fabloop.previous_champion`` tag), so rollbacks can walk back
    the promotion history; without that tag the alias is removed.
    """
    current = alias_version(mlflow, model, CHAMPION)
    restored = alias_version(mlflow, model, PREVIOUS)
    if restored is None:
        raise RegistryError(f"model {model!r} has no version with alias {PREVIOUS!r}: nothing to roll back to")
    if current is None:
        raise RegistryError(f"model {model!r} has no version with alias {CHAMPION!r}: nothing to roll back")
    if current == restored:
        raise RegistryError(f"model {model!r}: {CHAMPION!r} and {PREVIOUS!r} are both on version {current}")
    mlflow.set_registered_model_alias(model, CHAMPION, restored)
    before_restored = describe(mlflow, model, restored).tags.get(f"{TAG_PREFIX}previous_champion")
    if before_restored and before_restored not in (restored, current):
        mlflow.set_registered_model_alias(model, PREVIOUS, before_restored)
    else:
        mlflow.delete_registered_model_alias(model, PREVIOUS)
    return current, restored
