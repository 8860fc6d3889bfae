"""Wire schemas for the events that flow through Kafka.

Two kinds of event exist: an equipment-sensor summary per wafer and process step
(``SensorReading``), and a test result per wafer or per part (``TestResult``).
Both are JSON on the wire, carry ``kind`` and ``schema_version`` so that a
consumer can refuse what it does not understand, and validate strictly: a bad
event raises :class:`EventValidationError` naming the field and the reason.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    TypeAdapter,
    ValidationError,
)

SCHEMA_VERSION: Final = 1
SUPPORTED_VERSIONS = frozenset({SCHEMA_VERSION})

SENSOR_TOPIC = "fab.sensor.readings"
TEST_TOPIC = "fab.test.results"
DEADLETTER_TOPIC = "fab.deadletter"
TOPICS = (SENSOR_TOPIC, TEST_TOPIC, DEADLETTER_TOPIC)

# The bounds below are the event store's: a value the schema accepts must fit its
# column on SQLite and PostgreSQL alike, or one event would stop ingest for good.
INT32_MIN: Final = -(2**31)
INT32_MAX: Final = 2**31 - 1
TS_MIN: Final = datetime(1970, 1, 1, tzinfo=UTC)
TS_MAX: Final = datetime(2100, 1, 1, tzinfo=UTC)


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL; refusing it here names the field.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _sane_time(value: datetime) -> datetime:
    # The wall-clock year first: a time near year 9999 with an offset overflows in UTC.
    if not TS_MIN.year - 1 <= value.year <= TS_MAX.year or not TS_MIN <= value < TS_MAX:
        raise ValueError(
            f"timestamp must be from {TS_MIN:%Y-%m-%d} to before {TS_MAX:%Y-%m-%d} UTC, got {value.isoformat()}"
        )
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
Name = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_no_nul)]  # String(128) columns
Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]  # the store's Integer columns
Timestamp = Annotated[AwareDatetime, AfterValidator(_sane_time)]


def new_event_id() -> str:
    return str(uuid.uuid4())


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: Name = Field(default_factory=new_event_id)
    ts: Timestamp
    lot: Name
    wafer: Name = Field(description="Globally unique wafer id, e.g. 'L0042-07'.")

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


class SensorReading(_Event):
    """Per-wafer FDC summary from one tool/chamber for one process step.

    ``sensors`` maps sensor name to its summary value; ``None`` means the sensor
    reported nothing. Non-finite numbers are refused: an FDC summary of NaN or inf
    is a broken sensor, which the sender must send as ``None``.
    """

    kind: Literal["sensor"] = "sensor"
    fab: Name
    tool: Name
    chamber: Name
    recipe: Name
    step: Name
    sensors: dict[Name, FiniteFloat | None] = Field(min_length=1)


class ParametricResult(BaseModel):
    """One parametric measurement (an STDF PTR, or a simulator's e-test value)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: Name
    value: FiniteFloat | None
    units: Text | None = None
    test_num: int | None = None
    passed: bool | None = None


class TestResult(_Event):
    """Wafer-sort or final-test outcome for a wafer (``part_id`` is None) or a part."""

    __test__ = False  # not a pytest test class

    kind: Literal["test"] = "test"
    program: Name
    stage: Name = "wafer_sort"
    passed: bool
    yield_pct: Annotated[FiniteFloat, Field(ge=0, le=100)] | None = None
    part_id: Name | None = None
    hard_bin: Int32 | None = None
    soft_bin: Int32 | None = None
    parametrics: list[ParametricResult] = Field(default_factory=list)


Event = Annotated[SensorReading | TestResult, Field(discriminator="kind")]
_EVENT_ADAPTER: TypeAdapter[SensorReading | TestResult] = TypeAdapter(Event)


class EventValidationError(ValueError):
    """An event that cannot be accepted; ``field`` and ``reason`` say why."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"field '{field}': {reason}")


def _field_path(loc: tuple[Any, ...]) -> str:
    # Drop the discriminator tag pydantic puts first ('sensor' / 'test').
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("sensor", "test"):
        parts = parts[1:]
    return ".".join(parts) or "<event>"


def _from_validation_error(exc: ValidationError) -> EventValidationError:
    err = exc.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return EventValidationError("<json>", f"invalid JSON: {err['msg']}")
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return EventValidationError("kind", err["msg"])
    return EventValidationError(_field_path(tuple(err["loc"])), err["msg"])


def parse_event(raw: bytes | str) -> SensorReading | TestResult:
    """Decode one event from JSON, refusing unknown versions with a clear reason."""
    try:
        return _EVENT_ADAPTER.validate_json(raw)
    except ValidationError as exc:
        err = _from_validation_error(exc)
        if err.field == "schema_version":
            version = _peek_version(raw)
            raise EventValidationError(
                "schema_version",
                f"unknown schema version {version!r} (supported: {sorted(SUPPORTED_VERSIONS)})",
            ) from None
        raise err from None


def _peek_version(raw: bytes | str) -> Any:
    try:
        return json.loads(raw).get("schema_version")
    except Exception:  # noqa: BLE001 - best effort for the message only
        return None


def validate_event(data: dict[str, Any]) -> SensorReading | TestResult:
    """Validate an in-memory event (e.g. built by the simulator or replay)."""
    try:
        return _EVENT_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise _from_validation_error(exc) from None


def event_time(event: SensorReading | TestResult) -> datetime:
    return event.ts
