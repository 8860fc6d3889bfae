"""Drift and retraining policies as Prefect Blocks, editable in the UI's Blocks page.

Each block wraps the plain value model its task module decides with, so the flows
read ``DriftPolicyBlock.load(name).policy`` at the start of every run: an edit in
the UI is picked up by the next check, with no deploy.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field

from fabloop.core.policies import DriftPolicy, RetrainPolicy


class DriftPolicyBlock(Block):
    """When a window counts as drifted, and how often a breach may retrain a model."""

    _block_type_name = "fabloop DriftPolicy"
    _block_type_slug = "fabloop-drift-policy"
    _description = (
        "Stattest and thresholds, drift share, critical sensors, minimum window size, cooldown, "
        "performance tolerances, and per-model overrides."
    )

    policy: DriftPolicy = Field(default_factory=DriftPolicy)


class RetrainPolicyBlock(Block):
    """How a model is retrained (tuning budget, data gate) and judged against the champion."""

    _block_type_name = "fabloop RetrainPolicy"
    _block_type_slug = "fabloop-retrain-policy"
    _description = "Optuna budget, data gate limits, time split, operating point and the challenger gate."

    policy: RetrainPolicy = Field(default_factory=RetrainPolicy)
