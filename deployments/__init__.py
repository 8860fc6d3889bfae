"""Deployment definitions: where and how the flows run (per work-pool type).

Prefect's process pool, from this checkout (:mod:`fabloop.deployments.process`, the
embedded stack's), and Docker and Kubernetes pools running the fabloop image
(:mod:`fabloop.deployments.container`, the same deployments rendered from prefect.yaml).
"""

# Installed as ``fabloop.deployments``. Imported under its folder name (a checkout on sys.path),
# it would load a second copy of every module beside the installed one.
if __name__ != "fabloop.deployments":
    raise ImportError(
        f"import fabloop.deployments, not {__name__!r} (the folder is installed under the fabloop namespace)"
    )

from fabloop.core.names import (
    DRIFT_CHECK_DEPLOYMENT,
    INGEST_DEPLOYMENT,
    PROMOTE_DEPLOYMENT,
    PROMOTION_TIMEOUT_DEPLOYMENT,
    RETRAIN_DEPLOYMENT,
)
from fabloop.deployments.process import PREFECT_YAML, PULL_STEPS, PYTHON_VAR, WORK_POOL, WORK_POOL_TYPE, deploy

DEPLOYMENTS = (
    INGEST_DEPLOYMENT, DRIFT_CHECK_DEPLOYMENT, RETRAIN_DEPLOYMENT, PROMOTE_DEPLOYMENT, PROMOTION_TIMEOUT_DEPLOYMENT,
)
"""Every deployment ``prefect.yaml`` defines, as ``flow-name/deployment-name`` (what run_deployment takes)."""


def deployment_name(deployment: str) -> str:
    """``ingest/ingest`` → ``ingest``: the name ``prefect.yaml`` and the UI give the deployment."""
    return deployment.split("/", 1)[1]


def flow_name(deployment: str) -> str:
    """``drift-check/drift-check`` → ``drift-check``: the ``@flow(name=…)`` the deployment runs."""
    return deployment.split("/", 1)[0]


__all__ = [
    "DEPLOYMENTS", "PREFECT_YAML", "PULL_STEPS", "PYTHON_VAR", "WORK_POOL", "WORK_POOL_TYPE", "deploy",
    "deployment_name", "flow_name",
]
