"""Who may promote a model and how long a promotion waits, as a Prefect Block.

Prefect OSS has no user identity: the approver's name on the resume form is
self-declared. The allowlist therefore does not authenticate anyone; it stops
typos and strangers' names from becoming a decision, and every refusal is
recorded. Keep the Prefect API private (see the README) so that only people who
can reach it can type a name at all.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, field_validator


class ApprovalPolicy(Block):
    """The approver allowlist and the timing of human-approved promotions."""

    _block_type_name = "fabloop approval policy"
    _block_type_slug = "fabloop-approval-policy"
    _description = (
        "Names allowed to approve or reject a challenger model (self-declared on the form), "
        "and how long a promotion waits for a decision."
    )

    approvers: list[str] = Field(
        default_factory=list,
        description="Names accepted as approver (case-insensitive). Empty: every decision is refused.",
    )
    timeout_seconds: int = Field(
        default=3 * 24 * 3600, ge=1, description="How long a promotion waits before it ends as rejected."
    )
    poll_seconds: int = Field(
        default=5, ge=1,
        description="Unused: a waiting promotion is suspended and polls nothing (kept so saved blocks load).",
    )

    @field_validator("approvers")
    @classmethod
    def _clean(cls, names: list[str]) -> list[str]:
        cleaned = [n.strip() for n in names]
        if any(not n for n in cleaned):
            raise ValueError("approvers: empty name in the allowlist")
        return cleaned

    def allows(self, name: str | None) -> bool:
        """Is ``name`` on the allowlist (ignoring case and surrounding blanks)?"""
        wanted = (name or "").strip().casefold()
        return bool(wanted) and wanted in {a.casefold() for a in self.approvers}
