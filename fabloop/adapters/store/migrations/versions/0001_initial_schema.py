"""The event store's schema as it stood when migrations were introduced.

Revision ID: 0001
Revises:
Create Date: 2026-12-02 04:28:34.845369
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _consumed() -> list[sa.Column[object]]:
    """The columns every stored event keeps of its Kafka message (readings and test results alike)."""
    return [
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("topic", sa.String(length=255), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "approvals",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("approver", sa.String(length=255), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        sa.Column("previous_champion", sa.String(length=32), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_approvals_model"), "approvals", ["model"], unique=False)
    op.create_table(
        "dead_letters",
        sa.Column("topic", sa.String(length=255), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("topic", "partition", "offset"),
    )
    op.create_table(
        "ingest_batches",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("consumer", sa.String(length=255), nullable=False),
        sa.Column("consumed", sa.Integer(), nullable=False),
        sa.Column("stored", sa.Integer(), nullable=False),
        sa.Column("duplicates", sa.Integer(), nullable=False),
        sa.Column("dead_lettered", sa.Integer(), nullable=False),
        sa.Column("windows_closed", sa.Integer(), nullable=False),
        sa.Column("lag", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "sensor_readings",
        sa.Column("event_id", sa.String(length=128), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fab", sa.String(length=128), nullable=False),
        sa.Column("tool", sa.String(length=128), nullable=False),
        sa.Column("chamber", sa.String(length=128), nullable=False),
        sa.Column("recipe", sa.String(length=128), nullable=False),
        sa.Column("step", sa.String(length=128), nullable=False),
        sa.Column("lot", sa.String(length=128), nullable=False),
        sa.Column("wafer", sa.String(length=128), nullable=False),
        *_consumed(),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_index(op.f("ix_sensor_readings_wafer"), "sensor_readings", ["wafer"], unique=False)
    op.create_index("ix_sensor_tool_ts", "sensor_readings", ["tool", "ts"], unique=False)
    op.create_table(
        "test_results",
        sa.Column("event_id", sa.String(length=128), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lot", sa.String(length=128), nullable=False),
        sa.Column("wafer", sa.String(length=128), nullable=False),
        sa.Column("program", sa.String(length=128), nullable=False),
        sa.Column("stage", sa.String(length=128), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("yield_pct", sa.Float(), nullable=True),
        sa.Column("part_id", sa.String(length=128), nullable=True),
        sa.Column("hard_bin", sa.Integer(), nullable=True),
        sa.Column("soft_bin", sa.Integer(), nullable=True),
        *_consumed(),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_index(op.f("ix_test_results_wafer"), "test_results", ["wafer"], unique=False)
    op.create_table(
        "windows",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("scope", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ts_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ts_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("wafer_count", sa.Integer(), nullable=False),
        sa.Column("offsets", sa.JSON(), nullable=False),
        sa.Column("close_reason", sa.String(length=32), nullable=True),
        sa.Column("announced", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_windows_model"), "windows", ["model"], unique=False)
    op.create_index(op.f("ix_windows_status"), "windows", ["status"], unique=False)
    op.create_table(
        "drift_checks",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("window_id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("drifted", sa.Boolean(), nullable=False),
        sa.Column("performance_breach", sa.Boolean(), nullable=False),
        sa.Column("share", sa.Float(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("reference", sa.Text(), nullable=True),
        sa.Column("report_url", sa.Text(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["window_id"], ["windows.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_drift_checks_model"), "drift_checks", ["model"], unique=False)
    op.create_index(op.f("ix_drift_checks_window_id"), "drift_checks", ["window_id"], unique=False)
    op.create_table(
        "window_wafers",
        sa.Column("window_id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(["window_id"], ["windows.id"]),
        sa.ForeignKeyConstraint(["event_id"], ["sensor_readings.event_id"]),
        sa.PrimaryKeyConstraint("window_id", "event_id"),
    )
    op.create_table(
        "feature_drift",
        sa.Column("check_id", sa.Integer(), nullable=False),
        sa.Column("feature", sa.String(length=255), nullable=False),
        sa.Column("stattest", sa.String(length=64), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("drifted", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(["check_id"], ["drift_checks.id"]),
        sa.PrimaryKeyConstraint("check_id", "feature"),
    )
    op.create_table(
        "retrain_triggers",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("window_id", sa.Integer(), nullable=True),
        sa.Column("check_id", sa.Integer(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=24), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.ForeignKeyConstraint(["window_id"], ["windows.id"]),
        sa.ForeignKeyConstraint(["check_id"], ["drift_checks.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_retrain_triggers_model"), "retrain_triggers", ["model"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_retrain_triggers_model"), table_name="retrain_triggers")
    op.drop_table("retrain_triggers")
    op.drop_table("feature_drift")
    op.drop_table("window_wafers")
    op.drop_index(op.f("ix_drift_checks_window_id"), table_name="drift_checks")
    op.drop_index(op.f("ix_drift_checks_model"), table_name="drift_checks")
    op.drop_table("drift_checks")
    op.drop_index(op.f("ix_windows_status"), table_name="windows")
    op.drop_index(op.f("ix_windows_model"), table_name="windows")
    op.drop_table("windows")
    op.drop_index(op.f("ix_test_results_wafer"), table_name="test_results")
    op.drop_table("test_results")
    op.drop_index("ix_sensor_tool_ts", table_name="sensor_readings")
    op.drop_index(op.f("ix_sensor_readings_wafer"), table_name="sensor_readings")
    op.drop_table("sensor_readings")
    op.drop_table("ingest_batches")
    op.drop_table("dead_letters")
    op.drop_index(op.f("ix_approvals_model"), table_name="approvals")
    op.drop_table("approvals")
