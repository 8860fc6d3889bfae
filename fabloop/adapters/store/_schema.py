"""fabloop's event store: the typed SQLAlchemy 2 schema.

One schema serves SQLite (aiosqlite, the embedded default) and PostgreSQL
(asyncpg). Events are keyed by their event id so that a redelivered Kafka batch
changes nothing; each row remembers the topic/partition/offset it came from.

The tables themselves are created by the Alembic migrations (``migrations/``);
these classes must stay in step with them (``schema_drift(url)`` compares both).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware timestamps on every backend (SQLite stores naive UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the event store; timestamps must be timezone-aware")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class _Consumed:
    """What a stored event keeps of its Kafka message: the JSON as received, where it came from, when."""

    payload: Mapped[str] = mapped_column(Text, sort_order=1)
    topic: Mapped[str] = mapped_column(String(255), sort_order=1)
    partition: Mapped[int] = mapped_column(Integer, sort_order=1)
    offset: Mapped[int] = mapped_column(BigInteger, sort_order=1)
    ingested_at: Mapped[datetime] = mapped_column(default=utcnow, sort_order=1)


class SensorReadingRow(_Consumed, Base):
    """One equipment-sensor event; ``payload`` is the validated event JSON as received."""

    __tablename__ = "sensor_readings"

    event_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    ts: Mapped[datetime]
    fab: Mapped[str] = mapped_column(String(128))
    tool: Mapped[str] = mapped_column(String(128))
    chamber: Mapped[str] = mapped_column(String(128))
    recipe: Mapped[str] = mapped_column(String(128))
    step: Mapped[str] = mapped_column(String(128))
    lot: Mapped[str] = mapped_column(String(128))
    wafer: Mapped[str] = mapped_column(String(128), index=True)

    __table_args__ = (Index("ix_sensor_tool_ts", "tool", "ts"),)


class TestResultRow(_Consumed, Base):
    """One test-data event (wafer-level when ``part_id`` is null)."""

    __test__ = False
    __tablename__ = "test_results"

    event_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    ts: Mapped[datetime]
    lot: Mapped[str] = mapped_column(String(128))
    wafer: Mapped[str] = mapped_column(String(128), index=True)
    program: Mapped[str] = mapped_column(String(128))
    stage: Mapped[str] = mapped_column(String(128))
    passed: Mapped[bool] = mapped_column(Boolean)
    yield_pct: Mapped[float | None] = mapped_column(Float)
    part_id: Mapped[str | None] = mapped_column(String(128))
    hard_bin: Mapped[int | None] = mapped_column(Integer)
    soft_bin: Mapped[int | None] = mapped_column(Integer)


class DeadLetterRow(Base):
    """A consumed message that was refused, and why (it is also on ``fab.deadletter``)."""

    __tablename__ = "dead_letters"

    topic: Mapped[str] = mapped_column(String(255), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    offset: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    reason: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class WindowRow(Base):
    """A run of wafers for one model scope, closed after N wafers or T minutes."""

    __tablename__ = "windows"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(255), index=True)
    scope: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default="open", index=True)
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[datetime | None]
    ts_start: Mapped[datetime | None]
    ts_end: Mapped[datetime | None]
    wafer_count: Mapped[int] = mapped_column(Integer, default=0)
    offsets: Mapped[dict[str, Any]] = mapped_column(default=dict)
    close_reason: Mapped[str | None] = mapped_column(String(32))
    announced: Mapped[bool] = mapped_column(Boolean, default=False)
    # When the Prefect API last accepted the window's event (the sweep re-announces from it).
    announced_at: Mapped[datetime | None]


class WindowWaferRow(Base):
    """Which sensor readings make up a window."""

    __tablename__ = "window_wafers"

    window_id: Mapped[int] = mapped_column(ForeignKey("windows.id"), primary_key=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("sensor_readings.event_id"), primary_key=True)


class IngestBatchRow(Base):
    """What one ingest batch did, for the person watching the stream."""

    __tablename__ = "ingest_batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    consumer: Mapped[str] = mapped_column(String(255))
    consumed: Mapped[int] = mapped_column(Integer)
    stored: Mapped[int] = mapped_column(Integer)
    duplicates: Mapped[int] = mapped_column(Integer)
    dead_lettered: Mapped[int] = mapped_column(Integer)
    windows_closed: Mapped[int] = mapped_column(Integer)
    lag: Mapped[int | None] = mapped_column(BigInteger)


class DriftCheckRow(Base):
    """The verdict of one drift check of one window against the model's reference."""

    __tablename__ = "drift_checks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # Unique: a check claims its window by inserting this row first (``claim_window``).
    window_id: Mapped[int] = mapped_column(ForeignKey("windows.id"), index=True, unique=True)
    model: Mapped[str] = mapped_column(String(255), index=True)
    checked_at: Mapped[datetime] = mapped_column(default=utcnow)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32))
    drifted: Mapped[bool] = mapped_column(Boolean)
    performance_breach: Mapped[bool] = mapped_column(Boolean, default=False)
    share: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(Text)
    reference: Mapped[str | None] = mapped_column(Text)
    report_url: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class FeatureDriftRow(Base):
    """One sensor's statistic in one drift check."""

    __tablename__ = "feature_drift"

    check_id: Mapped[int] = mapped_column(ForeignKey("drift_checks.id"), primary_key=True)
    feature: Mapped[str] = mapped_column(String(255), primary_key=True)
    stattest: Mapped[str] = mapped_column(String(64))
    score: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    drifted: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[str] = mapped_column(String(32), default="ok")


class RetrainTriggerRow(Base):
    """A breach that started a retraining, or was suppressed, and why."""

    __tablename__ = "retrain_triggers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(255), index=True)
    window_id: Mapped[int | None] = mapped_column(ForeignKey("windows.id"))
    check_id: Mapped[int | None] = mapped_column(ForeignKey("drift_checks.id"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(24), default="drift")  # first_training | drift | performance | manual
    action: Mapped[str] = mapped_column(String(16))  # started | suppressed
    reason: Mapped[str] = mapped_column(Text)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    finished_at: Mapped[datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(16))  # challenger | rejected | refused | failed


class ApprovalRow(Base):
    """Every promotion decision, refusal and rollback: who, when, why, which run."""

    __tablename__ = "approvals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(255), index=True)
    version: Mapped[str] = mapped_column(String(32))
    # approved | rejected | refused | timed_out | superseded | rolled_back
    decision: Mapped[str] = mapped_column(String(16))
    approver: Mapped[str | None] = mapped_column(String(255))
    comment: Mapped[str | None] = mapped_column(Text)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    previous_champion: Mapped[str | None] = mapped_column(String(32))
    decided_at: Mapped[datetime] = mapped_column(default=utcnow)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
