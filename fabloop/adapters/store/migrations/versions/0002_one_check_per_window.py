"""One drift check per window, and when a window was last announced.

``drift_checks.window_id`` becomes unique: a check claims its window by inserting
its row first, so the second of two checks of one window (window events arrive at
least once) finds the claim instead of judging the window again.
``windows.announced_at`` records when the Prefect API last accepted the window's
``fabloop.window.closed`` event, so that the ingestor's sweep re-announces only
windows whose check has not shown up for a while.

A store that already holds several checks of one window keeps the first: the
later ones' sensor statistics go, and their retrain triggers point at the first.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 13:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FIRST = "(SELECT MIN(k.id) FROM drift_checks k WHERE k.window_id = {window_id})"
_LATER = f"(SELECT d.id FROM drift_checks d WHERE d.id > {_FIRST.format(window_id='d.window_id')})"


def upgrade() -> None:
    op.execute(
        "UPDATE retrain_triggers SET check_id = "
        + _FIRST.format(window_id="(SELECT c.window_id FROM drift_checks c WHERE c.id = retrain_triggers.check_id)")
        + f" WHERE check_id IN {_LATER}"
    )
    op.execute(f"DELETE FROM feature_drift WHERE check_id IN {_LATER}")
    op.execute(f"DELETE FROM drift_checks WHERE id IN {_LATER}")
    op.drop_index(op.f("ix_drift_checks_window_id"), table_name="drift_checks")
    op.create_index(op.f("ix_drift_checks_window_id"), "drift_checks", ["window_id"], unique=True)
    op.add_column("windows", sa.Column("announced_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("windows", "announced_at")
    op.drop_index(op.f("ix_drift_checks_window_id"), table_name="drift_checks")
    op.create_index(op.f("ix_drift_checks_window_id"), "drift_checks", ["window_id"], unique=False)
