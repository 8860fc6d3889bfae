"""Configuration and credentials as Prefect Blocks."""

from prefect.blocks.core import Block

from blocks.approval import ApprovalPolicy
from blocks.connections import DEFAULT, FabloopDatabase, KafkaConnection, MLflowServer
from blocks.models import ModelCatalog
from blocks.policies import DriftPolicyBlock, RetrainPolicyBlock


def policy_defaults() -> list[Block]:
    """Configuration blocks saved as ``default`` by the set-up, next to the connections."""
    return [ModelCatalog(), DriftPolicyBlock(), RetrainPolicyBlock(), ApprovalPolicy()]


__all__ = [
    "DEFAULT", "ApprovalPolicy", "DriftPolicyBlock", "RetrainPolicyBlock", "FabloopDatabase", "KafkaConnection", "MLflowServer", "ModelCatalog",
    "policy_defaults",
]
