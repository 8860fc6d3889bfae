"""Names shared across layers, defined once: events, resources, aliases, tags, keys.

Prefect automations (``prefect.yaml``), the flows that emit events, the CLI that
reads run tags and the tests all agree through this module, so a renamed event or
alias cannot drift apart between them.
"""

from __future__ import annotations

import re

# --- Prefect events (the automations in prefect.yaml match these names) -------------
WINDOW_CLOSED = "fabloop.window.closed"
DRIFT_DETECTED = "fabloop.drift.detected"
RETRAIN_REJECTED = "fabloop.retrain.rejected"
CHALLENGER_REGISTERED = "fabloop.challenger.registered"
CHALLENGER_REJECTED = "fabloop.challenger.rejected"
# A promotion waits for a named person's decision (its payload: the decision link and evidence).
PROMOTION_WAITING = "fabloop.promotion.waiting"
MODEL_PROMOTED = "fabloop.model.promoted"
MODEL_REJECTED = "fabloop.model.rejected"
MODEL_SUPERSEDED = "fabloop.model.superseded"
MODEL_ROLLED_BACK = "fabloop.model.rolled_back"
# A champion no recorded decision explains (``fabloop audit --verify``).
MODEL_CHAMPION_UNEXPLAINED = "fabloop.model.champion_unexplained"

# --- deployments, as ``flow-name/deployment-name`` for run_deployment ---------------
INGEST_DEPLOYMENT = "ingest/ingest"
DRIFT_CHECK_DEPLOYMENT = "drift-check/drift-check"
RETRAIN_DEPLOYMENT = "retrain/retrain"
PROMOTE_DEPLOYMENT = "promote/promote"
# Scheduled by each promotion at its deadline: ends it if it is still waiting.
PROMOTION_TIMEOUT_DEPLOYMENT = "promotion-timeout/promotion-timeout"

# --- MLflow registry aliases ---------------------------------------------------------
CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"

# --- flow-run tags and the approver the system itself resumes with ------------------
PROMOTION_TAG = "fabloop.promotion"
ROLLBACK_TAG = "fabloop.rollback"
SUPERSEDED_TAG_PREFIX = "superseded-by:"
# A promotion's deadline, written on its flow run by its first execution (ISO 8601, UTC).
DEADLINE_TAG_PREFIX = "decide-by:"
# The keys of a promotion's successive suspensions: decision-1, decision-2, …
DECISION_KEY_PREFIX = "decision-"
# The name the system resumes a suspended promotion with, to wake it: a superseding
# run (the woken run then trusts only its own ``superseded-by:`` tag) or the
# promotion's timeout run at the deadline.
SYSTEM_APPROVER = "fabloop"


def model_tag(model: str) -> str:
    """The flow-run tag that names a model (``model:<name>``)."""
    return f"model:{model}"


def model_resource(model: str, version: str | None = None) -> dict[str, str]:
    """The Prefect event resource of a model (``fabloop.model.<name>``)."""
    resource = {"prefect.resource.id": f"fabloop.model.{model}", "prefect.resource.name": model}
    if version is not None:
        resource["fabloop.model.version"] = str(version)
    return resource


def window_resource(model: str, window_id: int) -> dict[str, str]:
    """The resource of a closed window: its model's, plus the window id."""
    return {**model_resource(model), "fabloop.window.id": str(window_id)}


def artifact_key(prefix: str, model: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for one model's series."""
    return f"{prefix}-" + re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")
