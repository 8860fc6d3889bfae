"""fabloop's event store: every engine, every SQL statement and the schema's migrations.

Callers pass an ``AsyncEngine`` (from ``make_engine``, or a ``FabloopDatabase``
block's ``get_engine()``) to the async query functions below; nothing outside
this package writes SQL or creates an engine.
"""

from fabloop.adapters.store._approvals import complete_decision, decisions, record_decision
from fabloop.adapters.store._checks import (
    CLAIMED,
    Claim,
    ClaimLost,
    WindowNotClosed,
    already_checked,
    claim_window,
    record_check,
    set_report_url,
    take_over_claim,
)
from fabloop.adapters.store._engine import engine_for, make_engine, optuna_storage, run_sync, sessionmaker, sync_url
from fabloop.adapters.store._frames import (
    LABEL,
    META,
    latest_scope,
    load_window,
    scope_where,
    sensor_columns,
    training_frame,
    window_frame,
    window_offsets,
)
from fabloop.adapters.store._ingest import BatchWriter, ClosedWindow, IngestStore, LateReading, WindowBook
from fabloop.adapters.store._migrate import current_revision, migrate, schema_drift
from fabloop.adapters.store._schema import (
    ApprovalRow,
    Base,
    DeadLetterRow,
    DriftCheckRow,
    FeatureDriftRow,
    IngestBatchRow,
    RetrainTriggerRow,
    SensorReadingRow,
    TestResultRow,
    WindowRow,
    WindowWaferRow,
    utcnow,
)
from fabloop.adapters.store._summary import LoopSummary, loop_summary
from fabloop.adapters.store._triggers import (
    TriggerDecision,
    attach_flow_run,
    decide_retrain,
    finish_trigger,
    reconcile_triggers,
)

__all__ = [
    "CLAIMED", "Claim", "ClaimLost", "WindowNotClosed", "claim_window", "set_report_url", "take_over_claim",
    "LABEL", "META", "ApprovalRow", "Base", "BatchWriter", "ClosedWindow", "DeadLetterRow", "DriftCheckRow",
    "FeatureDriftRow", "IngestBatchRow", "IngestStore", "LateReading", "LoopSummary", "RetrainTriggerRow",
    "SensorReadingRow",
    "TestResultRow", "TriggerDecision", "WindowBook", "WindowRow", "WindowWaferRow", "already_checked",
    "attach_flow_run", "complete_decision",
    "current_revision", "decide_retrain", "decisions", "engine_for", "finish_trigger",
    "latest_scope", "load_window", "loop_summary", "make_engine", "migrate", "optuna_storage", "record_check",
    "record_decision", "run_sync", "schema_drift", "scope_where", "sensor_columns", "sessionmaker", "sync_url",
    "training_frame", "utcnow", "window_frame", "window_offsets",
    "reconcile_triggers",
]
