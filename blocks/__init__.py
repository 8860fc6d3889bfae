"""Configuration and credentials as Prefect Blocks."""

# Installed as ``fabloop.blocks``. Imported under its folder name (a checkout on sys.path),
# it would load a second copy of every module beside the installed one.
if __name__ != "fabloop.blocks":
    raise ImportError(f"import fabloop.blocks, not {__name__!r} (the folder is installed under the fabloop namespace)")

from prefect.blocks.core import Block

from fabloop.blocks.approval import ApprovalPolicy
from fabloop.blocks.connections import DEFAULT, FabloopDatabase, KafkaConnection, MLflowServer
from fabloop.blocks.loading import load_block
from fabloop.blocks.models import ModelCatalog
from fabloop.blocks.policies import DriftPolicyBlock, RetrainPolicyBlock


def policy_defaults() -> list[Block]:
    """Configuration blocks saved as ``default`` by the set-up, next to the connections."""
    return [ModelCatalog(), DriftPolicyBlock(), RetrainPolicyBlock(), ApprovalPolicy()]


__all__ = [
    "DEFAULT", "ApprovalPolicy", "DriftPolicyBlock", "FabloopDatabase", "KafkaConnection", "MLflowServer",
    "ModelCatalog", "RetrainPolicyBlock", "load_block", "policy_defaults",
]
