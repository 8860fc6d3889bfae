"""Wire schemas: what is accepted, and how a refusal names the field."""

from __future__ import annotations

import json
import math

import pytest

from fabloop.core.schemas import EventValidationError, SensorReading, TestResult, parse_event, validate_event


def sensor(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "kind": "sensor", "schema_version": 1, "event_id": "e-1", "ts": "2026-03-01T10:00:00+00:00",
        "fab": "FAB1", "tool": "ETCH-01", "chamber": "A", "recipe": "POLY", "step": "ETCH",
        "lot": "L0001", "wafer": "L0001-01", "sensors": {f"s{i:03d}": float(i) for i in range(590)},
    }
    base.update(overrides)
    return base


def test_a_590_sensor_reading_round_trips() -> None:
    event = parse_event(json.dumps(sensor()))
    assert isinstance(event, SensorReading)
    assert len(event.sensors) == 590
    assert parse_event(event.to_json()) == event


def test_missing_sensor_value_is_none_not_nan() -> None:
    event = parse_event(json.dumps(sensor(sensors={"a": None, "b": 1.0})))
    assert event.sensors["a"] is None


def test_test_result_with_parametrics() -> None:
    raw = {
        "kind": "test", "ts": "2026-03-01T12:00:00Z", "lot": "L0001", "wafer": "L0001-01", "program": "SORT1",
        "passed": False, "yield_pct": 71.5, "parametrics": [{"name": "IDDQ", "value": 1.2e-6, "units": "A"}],
    }
    event = parse_event(json.dumps(raw))
    assert isinstance(event, TestResult) and not event.passed and event.parametrics[0].units == "A"


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        (b"{not json", "<json>", "invalid JSON"),
        (json.dumps(sensor(sensors={"rf_power": "high"})), "sensors.rf_power", "valid number"),
        (json.dumps(sensor(tool="")), "tool", "at least 1 character"),
        (json.dumps({k: v for k, v in sensor().items() if k != "wafer"}), "wafer", "Field required"),
        (json.dumps(sensor(ts="2026-03-01T10:00:00")), "ts", "timezone"),
        (json.dumps(sensor(schema_version=9)), "schema_version", "unknown schema version 9"),
        (json.dumps(sensor(kind="maintenance")), "kind", "does not match"),
        (json.dumps(sensor(sensors={})), "sensors", "at least 1 item"),
        (json.dumps(sensor(colour="red")), "colour", "Extra inputs"),
        (json.dumps({"kind": "test", "ts": "2026-03-01T12:00:00Z", "lot": "L", "wafer": "W", "program": "P",
                     "passed": True, "yield_pct": 140}), "yield_pct", "less than or equal to 100"),
    ],
)
def test_invalid_events_name_the_field(raw: bytes | str, field: str, reason: str) -> None:
    with pytest.raises(EventValidationError) as info:
        parse_event(raw)
    assert info.value.field == field
    assert reason in info.value.reason
    assert f"field '{field}'" in str(info.value)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_sensor_values_are_refused(token: str) -> None:
    raw = json.dumps(sensor(sensors={"a": 1.0, "b": 2.0})).replace("2.0", token)
    with pytest.raises(EventValidationError) as info:
        parse_event(raw)
    assert info.value.field == "sensors.b" and "finite" in info.value.reason


def test_validate_event_in_memory() -> None:
    with pytest.raises(EventValidationError, match="sensors.x"):
        validate_event(sensor(sensors={"x": math.inf}))


def _test_result(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "kind": "test", "ts": "2026-03-01T12:00:00Z", "lot": "L0001", "wafer": "L0001-01", "program": "SORT1",
        "passed": True,
    }
    base.update(overrides)
    return base


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        # Values a store column cannot hold: refused here, with the field named, not by the database.
        (_test_result(hard_bin=2**63), "hard_bin", "less than or equal to 2147483647"),
        (_test_result(soft_bin=2**31), "soft_bin", "less than or equal to 2147483647"),
        (_test_result(hard_bin=-(2**31) - 1), "hard_bin", "greater than or equal to -2147483648"),
        (_test_result(ts="9999-12-31T23:59:59-05:00"), "ts", "timestamp must be from 1970-01-01"),
        (_test_result(ts="2100-01-01T00:00:00Z"), "ts", "to before 2100-01-01"),
        (sensor(ts="1969-12-31T23:59:59+00:00"), "ts", "timestamp must be from 1970-01-01"),
        (sensor(ts="0001-01-01T00:00:00+14:00"), "ts", "timestamp must be from 1970-01-01"),
        (sensor(lot="L\u00000001"), "lot", "NUL"),
        (sensor(sensors={"rf\u0000power": 1.0}), "sensors.rf\u0000power.[key]", "NUL"),
        (_test_result(parametrics=[{"name": "IDDQ", "value": 1.0, "units": "\u0000A"}]), "parametrics.0.units", "NUL"),
        (sensor(wafer="W" * 129), "wafer", "at most 128 characters"),
    ],
)
def test_values_the_store_cannot_hold_are_refused_naming_the_field(
    raw: dict[str, object], field: str, reason: str
) -> None:
    with pytest.raises(EventValidationError) as info:
        parse_event(json.dumps(raw))
    assert info.value.field == field
    assert reason in info.value.reason


@pytest.mark.parametrize(
    "raw",
    [
        _test_result(hard_bin=2**31 - 1, soft_bin=-(2**31)),
        _test_result(ts="1970-01-01T00:00:00Z"),
        _test_result(ts="2099-12-31T23:59:59.999999Z"),
        _test_result(ts="2099-12-31T20:00:00-03:59"),  # 23:59 UTC: an offset near the bound is fine
    ],
)
def test_values_at_the_store_bounds_are_accepted(raw: dict[str, object]) -> None:
    assert isinstance(parse_event(json.dumps(raw)), TestResult)
