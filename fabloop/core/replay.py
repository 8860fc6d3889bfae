"""Recorded tables (CSV / Parquet) → time-ordered ``SensorReading`` / ``TestResult`` events.

A recorded table has one row per wafer (and process step): a timestamp, a wafer
id, optional tool / chamber / recipe / lot / step columns, sensor columns and a
pass/fail label (SECOM is the classic example). Replaying it emits, in time
order, one ``SensorReading`` per row and — ``test_delay`` later, because test
results arrive after processing — one wafer-level ``TestResult`` per labelled
row. Rows that cannot become events are reported as :class:`BadRow` (file line,
column, reason) in :class:`ReplayReport` and skipped, never silently dropped.

Line numbers are as in the file: for CSV the header is line 1, so the first data
row is line 2 (quoted fields spanning several lines would shift this); blank CSV
lines are kept as rows and reported. For Parquet the number is the row index + 1.
For an in-memory frame it is the row position + 1.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fabloop.core.schemas import SensorReading, TestResult

__all__ = [
    "SECOM_LABELS",
    "BadRow",
    "Replay",
    "ReplayColumns",
    "ReplayDefaults",
    "ReplayReport",
    "ReplayTableError",
    "paced",
    "read_table",
    "replay_events",
]

Event = SensorReading | TestResult
E = TypeVar("E")
Verdict = Literal["pass", "fail"]

SECOM_LABELS: dict[str, Verdict] = {"-1": "pass", "1": "fail"}
_DEFAULT_LABELS: dict[str, Verdict] = {
    "pass": "pass", "p": "pass", "ok": "pass", "good": "pass", "true": "pass",
    "fail": "fail", "f": "fail", "ng": "fail", "bad": "fail", "false": "fail",
}
_EVENT_NAMESPACE = uuid.UUID("0b6f7a8e-2f7e-4f55-8d0c-5b7f3f0e9a21")
_NAME_MAX = 128
_CSV_LINE = "csv_line"
_PARQUET_ROW = "parquet_row"
_NUMBERING = {
    _CSV_LINE: "CSV file line (header = line 1)",
    _PARQUET_ROW: "Parquet row index + 1",
}
_FRAME_NUMBERING = "frame row position + 1"
_ROW = "<row>"


class ReplayTableError(ValueError):
    """A table that cannot be replayed at all (missing column, unreadable file)."""

    def __init__(self, path: str | Path, column: str | None, reason: str) -> None:
        self.path = str(path)
        self.column = column
        self.reason = reason
        where = f"{self.path}: column {column!r}: " if column else f"{self.path}: "
        super().__init__(where + reason)


class ReplayDefaults(BaseModel):
    """Values for roles that have no column in the table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fab: str = Field("REPLAY", min_length=1, max_length=_NAME_MAX)
    lot: str = Field("REPLAY", min_length=1, max_length=_NAME_MAX)
    tool: str = Field("REPLAY", min_length=1, max_length=_NAME_MAX)
    chamber: str = Field("REPLAY", min_length=1, max_length=_NAME_MAX)
    recipe: str = Field("REPLAY", min_length=1, max_length=_NAME_MAX)
    step: str = Field("REPLAY", min_length=1, max_length=_NAME_MAX)
    program: str = Field("REPLAY", min_length=1, max_length=_NAME_MAX)
    stage: str = Field("wafer_sort", min_length=1, max_length=_NAME_MAX)


class ReplayColumns(BaseModel):
    """Which column plays which role, and how to read the label and timestamps.

    ``sensors="numeric"`` takes every other column whose values are mostly
    numbers (so a stray text cell in a sensor column is a bad row, not a lost
    column); columns left out are listed in ``ReplayReport.ignored_columns``.
    ``labels`` maps a label as written (case-insensitive; ``-1.0`` reads as
    ``-1``) to ``"pass"`` / ``"fail"`` (booleans accepted: True = pass). An
    empty label means "not tested": the row gives no ``TestResult``.
    ``timezone`` applies to naive timestamps; ``timestamp_format`` is a strptime
    format or pandas' ``"ISO8601"`` / ``"mixed"``; without it the first row's
    format is inferred and must hold for all rows. Numeric timestamps are epoch
    seconds.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    timestamp: str = "timestamp"
    wafer: str = "wafer"
    label: str | None = "label"
    tool: str | None = None
    chamber: str | None = None
    recipe: str | None = None
    lot: str | None = None
    step: str | None = None
    sensors: list[str] | Literal["numeric"] = "numeric"
    labels: dict[str, Verdict] = Field(default_factory=lambda: dict(_DEFAULT_LABELS))
    timezone: str = "UTC"
    timestamp_format: str | None = None
    dayfirst: bool = False
    defaults: ReplayDefaults = ReplayDefaults()

    @field_validator("labels", mode="before")
    @classmethod
    def _normalise_labels(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        out = {}
        for key, verdict in value.items():
            if isinstance(verdict, bool):
                verdict = "pass" if verdict else "fail"
            out[_label_key(key)] = verdict
        return out

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {value!r}") from None
        return value

    @classmethod
    def secom(cls, **overrides: Any) -> ReplayColumns:
        """SECOM conventions: -1 = pass, 1 = fail, timestamps like ``19/07/2008 11:55:00``."""
        base: dict[str, Any] = {"labels": SECOM_LABELS, "timestamp_format": "%d/%m/%Y %H:%M:%S"}
        return cls(**(base | overrides))

    def roles(self) -> dict[str, str]:
        """Role → column for every mapped role column (sensors excluded)."""
        mapped = {"timestamp": self.timestamp, "wafer": self.wafer, "label": self.label, "tool": self.tool,
                  "chamber": self.chamber, "recipe": self.recipe, "lot": self.lot, "step": self.step}
        return {role: col for role, col in mapped.items() if col is not None}


class BadRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    line_number: int
    column: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line_number}, column {self.column!r}: {self.reason}"


class ReplayReport(BaseModel):
    """What a replay will emit and what it had to skip."""

    model_config = ConfigDict(frozen=True)

    source: str
    line_numbering: str
    rows: int
    sensor_events: int
    test_events: int
    skipped_rows: int
    bad_rows: list[BadRow]
    sensor_columns: list[str]
    ignored_columns: list[str]
    nonfinite_values: int  # ±inf sensor values sent as None (the schema's "broken sensor")


# ------------------------------------------------------------------------- reading


def read_table(path: str | Path, columns: ReplayColumns) -> pd.DataFrame:
    """Load a CSV (``.csv``, ``.csv.gz``, ``.txt``) or Parquet file, checking the mapped columns.

    The returned frame's index holds the line numbers that bad rows will cite,
    and ``frame.attrs["replay_source"]`` identifies the file content so that
    event ids are the same each time the same file is replayed.
    """
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            frame = pd.read_parquet(path)
            _check_columns(path, list(frame.columns), columns)
            frame.index = pd.RangeIndex(1, len(frame) + 1, name=_PARQUET_ROW)
        elif name.endswith((".csv", ".csv.gz", ".txt")):
            header = pd.read_csv(path, nrows=0, encoding="utf-8-sig")
            _check_columns(path, [str(c) for c in header.columns], columns)
            text_cols = {c: str for c in columns.roles().values()}
            frame = pd.read_csv(path, dtype=text_cols, skip_blank_lines=False, low_memory=False,
                                encoding="utf-8-sig")
            frame.index = pd.RangeIndex(2, len(frame) + 2, name=_CSV_LINE)
        else:
            raise ReplayTableError(path, None, "unsupported file type (expected .csv, .csv.gz, .txt, .parquet)")
    except ReplayTableError:
        raise
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ReplayTableError(path, None, f"cannot read table: {exc}") from None
    frame.attrs["replay_source"] = f"{path.name}:{_file_digest(path)}"
    frame.attrs["replay_path"] = str(path)
    return frame


def _check_columns(path: str | Path, present: list[str], columns: ReplayColumns) -> None:
    wanted = [(role, col) for role, col in columns.roles().items()]
    if isinstance(columns.sensors, list):
        wanted += [("sensor", col) for col in columns.sensors]
    have = set(present)
    for role, col in wanted:
        if col not in have:
            shown = ", ".join(map(repr, present[:12])) + (", …" if len(present) > 12 else "")
            raise ReplayTableError(path, col, f"mapped as {role} but not in the table (columns: {shown})")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:32]


# ----------------------------------------------------------------------- replaying


@dataclass(frozen=True)
class _Rows:
    """Validated rows in replay order (arrays aligned with each other)."""

    lines: np.ndarray
    ts: list[datetime]
    roles: dict[str, list[str]]
    sensors: np.ndarray  # float64, NaN = None
    verdicts: list[bool | None]


@dataclass(frozen=True)
class Replay:
    """An iterable of ``(time, event)`` in time order, plus the report of skipped rows.

    Iterating again yields the same events (same ids), so a replay can be retried.
    """

    report: ReplayReport
    columns: ReplayColumns
    test_delay: timedelta
    _rows: _Rows
    _sensor_names: tuple[str, ...]
    _source: str

    def __len__(self) -> int:
        return self.report.sensor_events + self.report.test_events

    def __iter__(self) -> Iterator[tuple[datetime, Event]]:
        rows = self._rows
        sensor_keys = ((ts, 0, int(line), i) for i, (ts, line) in enumerate(zip(rows.ts, rows.lines, strict=True)))
        test_keys = (
            (ts + self.test_delay, 1, int(line), i)
            for i, (ts, line, verdict) in enumerate(zip(rows.ts, rows.lines, rows.verdicts, strict=True))
            if verdict is not None
        )
        for ts, kind, _, i in heapq.merge(sensor_keys, test_keys):
            yield ts, (self._sensor_event(i) if kind == 0 else self._test_event(i, ts))

    def _id(self, line: int, kind: str) -> str:
        return str(uuid.uuid5(_EVENT_NAMESPACE, f"{self._source}:{line}:{kind}"))

    def _sensor_event(self, i: int) -> SensorReading:
        rows, d = self._rows, self.columns.defaults
        row = rows.sensors[i].tolist()
        values = {name: (None if v != v else v) for name, v in zip(self._sensor_names, row, strict=True)}
        return SensorReading(
            event_id=self._id(int(rows.lines[i]), "sensor"), ts=rows.ts[i], lot=_role(rows, "lot", i, d.lot),
            wafer=rows.roles["wafer"][i], fab=d.fab, tool=_role(rows, "tool", i, d.tool),
            chamber=_role(rows, "chamber", i, d.chamber), recipe=_role(rows, "recipe", i, d.recipe),
            step=_role(rows, "step", i, d.step), sensors=values,
        )

    def _test_event(self, i: int, ts: datetime) -> TestResult:
        rows, d = self._rows, self.columns.defaults
        return TestResult(
            event_id=self._id(int(rows.lines[i]), "test"), ts=ts, lot=_role(rows, "lot", i, d.lot),
            wafer=rows.roles["wafer"][i], program=d.program, stage=d.stage, passed=bool(rows.verdicts[i]),
        )


def _role(rows: _Rows, role: str, i: int, default: str) -> str:
    values = rows.roles.get(role)
    return values[i] if values is not None else default


def replay_events(frame: pd.DataFrame, columns: ReplayColumns, *,
                  test_delay: timedelta = timedelta(hours=1)) -> Replay:
    """Validate every row up front and return the time-ordered replay.

    ``for ts, event in replay_events(frame, cols)`` gives the events;
    ``.report.bad_rows`` lists what was skipped and why.
    """
    if test_delay < timedelta(0):
        raise ValueError(f"test_delay must not be negative, got {test_delay}")
    where = frame.attrs.get("replay_path", "<frame>")
    _check_columns(where, [str(c) for c in frame.columns], columns)
    lines = _line_numbers(frame)
    bad: list[BadRow] = []
    keep = np.ones(len(frame), dtype=bool)

    def add(pos: int, column: str, reason: str) -> None:
        bad.append(BadRow(line_number=int(lines[pos]), column=column, reason=reason))
        keep[pos] = False

    blank = frame.isna().all(axis=1).to_numpy() if len(frame.columns) else np.zeros(len(frame), bool)
    for blank_pos in np.flatnonzero(blank):
        add(int(blank_pos), _ROW, "blank line")

    ts, ts_problems = _timestamps(frame[columns.timestamp], columns)
    for pos, reason in ts_problems.items():
        if not blank[pos]:
            add(pos, columns.timestamp, reason)

    roles: dict[str, list[str | None]] = {}
    for role, col in columns.roles().items():
        if role in ("timestamp", "label"):
            continue
        roles[role] = _names(frame[col])
        for pos, value in enumerate(roles[role]):
            if blank[pos]:
                continue
            if value is None:
                add(pos, col, f"missing {role}")
            elif len(value) > _NAME_MAX:
                add(pos, col, f"{role} longer than {_NAME_MAX} characters")

    verdicts: list[bool | None] = [None] * len(frame)
    if columns.label is not None:
        verdicts, label_problems = _verdicts(frame[columns.label], columns)
        for pos, reason in label_problems.items():
            if not blank[pos]:
                add(pos, columns.label, reason)

    sensor_names, ignored = _sensor_columns(frame, columns, where)
    matrix = np.empty((len(frame), len(sensor_names)), dtype=np.float64)
    for j, col in enumerate(sensor_names):
        matrix[:, j], non_numeric = _numbers(frame[col])
        for bad_pos in np.flatnonzero(non_numeric & ~blank):
            add(int(bad_pos), col, f"non-numeric sensor value {frame[col].iat[bad_pos]!r}")
    nonfinite = np.isinf(matrix)
    matrix[nonfinite] = np.nan

    kept = np.flatnonzero(keep)
    ts_kept = ts[kept]
    order = kept[np.lexsort((lines[kept], ts_kept.asi8))]
    rows = _Rows(
        lines=lines[order],
        ts=list(ts[order].to_pydatetime()),
        roles={role: [values[p] for p in order] for role, values in roles.items()},
        sensors=matrix[order],
        verdicts=[verdicts[p] for p in order],
    )
    bad.sort(key=lambda b: b.line_number)  # stable: per line, in column-check order
    source = frame.attrs.get("replay_source") or _frame_digest(frame)
    report = ReplayReport(
        source=source,
        line_numbering=_NUMBERING.get(str(frame.index.name), _FRAME_NUMBERING),
        rows=len(frame),
        sensor_events=len(order),
        test_events=sum(v is not None for v in rows.verdicts),
        skipped_rows=int((~keep).sum()),
        bad_rows=bad,
        sensor_columns=list(sensor_names),
        ignored_columns=ignored,
        nonfinite_values=int(nonfinite[kept].sum()),
    )
    return Replay(report=report, columns=columns, test_delay=test_delay, _rows=rows,
                  _sensor_names=tuple(sensor_names), _source=source)


def _line_numbers(frame: pd.DataFrame) -> np.ndarray:
    if frame.index.name in _NUMBERING:
        return np.asarray(frame.index.to_numpy(dtype=np.int64), dtype=np.int64)
    return np.arange(1, len(frame) + 1, dtype=np.int64)


def _frame_digest(frame: pd.DataFrame) -> str:
    digest = hashlib.sha256("\x1f".join(map(str, frame.columns)).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return "frame:" + digest.hexdigest()[:32]


def _timestamps(series: pd.Series, columns: ReplayColumns) -> tuple[pd.DatetimeIndex, dict[int, str]]:
    """UTC timestamps (NaT where bad) and, per bad position, the reason."""
    zone = columns.timezone
    raw = series.reset_index(drop=True)
    missing = raw.isna().to_numpy() | (raw.astype(str).str.strip() == "").to_numpy()
    if pd.api.types.is_datetime64_any_dtype(raw):
        parsed = pd.DatetimeIndex(raw)
    elif pd.api.types.is_numeric_dtype(raw) and not pd.api.types.is_bool_dtype(raw):
        parsed = pd.DatetimeIndex(pd.to_datetime(raw, unit="s", errors="coerce"))
    else:
        parsed = _parse_text_times(raw.where(~missing), columns)
    if parsed.tz is None:
        local_ok = ~parsed.isna()
        parsed = parsed.tz_localize(zone, ambiguous="NaT", nonexistent="NaT")
        shifted = local_ok & parsed.isna()
    else:
        shifted = np.zeros(len(parsed), dtype=bool)
    parsed = parsed.tz_convert("UTC")
    problems: dict[int, str] = {}
    for pos in np.flatnonzero(parsed.isna()):
        if missing[pos]:
            problems[int(pos)] = "missing timestamp"
        elif shifted[pos]:
            problems[int(pos)] = f"ambiguous or nonexistent local time {raw.iat[pos]!r} in {zone}"
        else:
            problems[int(pos)] = f"unparseable timestamp {raw.iat[pos]!r}"
    return parsed, problems


def _parse_text_times(raw: pd.Series, columns: ReplayColumns) -> pd.DatetimeIndex:
    text = raw.astype("string").str.strip()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "could not infer format" → per-element parse
        try:
            return pd.DatetimeIndex(pd.to_datetime(text, format=columns.timestamp_format,
                                                   dayfirst=columns.dayfirst, errors="coerce"))
        except (ValueError, TypeError):  # e.g. offsets mixed with naive times: go one by one
            return pd.DatetimeIndex([_one_time(v, columns) for v in text], dtype="datetime64[ns, UTC]")


def _one_time(value: Any, columns: ReplayColumns) -> pd.Timestamp:
    if value is pd.NA or value is None:
        return pd.NaT
    try:
        ts = pd.Timestamp(pd.to_datetime(value, format=columns.timestamp_format, dayfirst=columns.dayfirst))
    except (ValueError, TypeError):
        return pd.NaT
    if ts.tzinfo is None:
        try:
            ts = ts.tz_localize(columns.timezone, ambiguous="raise", nonexistent="raise")
        except Exception:  # noqa: BLE001 - ambiguous/nonexistent local time
            return pd.NaT
    return ts.tz_convert("UTC")


def _names(series: pd.Series) -> list[str | None]:
    """Identifier cells as clean strings (7.0 → "7"), None when empty."""
    out: list[str | None] = []
    for value in series.tolist():
        if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
            out.append(None)
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        text = str(value).strip()
        out.append(text or None)
    return out


def _label_key(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    text = str(value).strip().lower()
    try:  # "-1.0" written by a float-typed export
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def _verdicts(series: pd.Series, columns: ReplayColumns) -> tuple[list[bool | None], dict[int, str]]:
    """Per row: True = pass, False = fail, None = no label; plus the invalid labels by position."""
    out: list[bool | None] = []
    problems: dict[int, str] = {}
    expected = sorted(set(columns.labels))
    for pos, value in enumerate(series.tolist()):
        if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)) or (
                isinstance(value, str) and not value.strip()):
            out.append(None)
            continue
        verdict = columns.labels.get(_label_key(value))
        if verdict is None:
            problems[pos] = f"invalid label {value!r} (expected one of {expected})"
        out.append(None if verdict is None else verdict == "pass")
    return out, problems


def _numbers(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Float values (NaN = empty) and the mask of cells that are text, not numbers."""
    if pd.api.types.is_numeric_dtype(series):
        return series.to_numpy(dtype=np.float64, na_value=np.nan), np.zeros(len(series), dtype=bool)
    text = series.astype("string").str.strip()
    values = pd.to_numeric(text, errors="coerce")
    empty = text.isna() | (text == "")
    non_numeric = (values.isna() & ~empty).to_numpy(dtype=bool)
    return values.to_numpy(dtype=np.float64, na_value=np.nan), non_numeric


def _sensor_columns(frame: pd.DataFrame, columns: ReplayColumns, where: str) -> tuple[list[str], list[str]]:
    role_cols = set(columns.roles().values())
    if isinstance(columns.sensors, list):
        chosen = list(columns.sensors)
        ignored = [str(c) for c in frame.columns if c not in role_cols and c not in set(chosen)]
    else:
        chosen, ignored = [], []
        for col in frame.columns:
            if col in role_cols:
                continue
            (chosen if _mostly_numeric(frame[col]) else ignored).append(col)
    if not chosen:
        raise ReplayTableError(where, None, "no sensor columns (none mapped and no other numeric column)")
    for col in chosen:
        if not 1 <= len(str(col)) <= _NAME_MAX:
            raise ReplayTableError(where, str(col), f"sensor name must be 1..{_NAME_MAX} characters")
    return [str(c) for c in chosen], [str(c) for c in ignored]


def _mostly_numeric(series: pd.Series) -> bool:
    if pd.api.types.is_datetime64_any_dtype(series):
        return False
    if pd.api.types.is_numeric_dtype(series):
        return True
    values, non_numeric = _numbers(series)
    numeric = int((~np.isnan(values)).sum())
    return numeric > 0 and numeric >= int(non_numeric.sum())


# ------------------------------------------------------------------------- pacing


def paced(events: Iterable[tuple[datetime, E]], speed: float, *,
          clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> Iterator[tuple[datetime, E]]:
    """Yield events so that simulated time runs at ``speed``× wall time (0 or inf: no waiting).

    Each event's due time is computed from the first event's anchor, not from
    the previous event, so oversleeping or a slow consumer never accumulates
    drift. Events whose time is already past are yielded at once.
    """
    if math.isnan(speed) or speed < 0:
        raise ValueError(f"speed must be >= 0 (0 or inf = as fast as possible), got {speed}")
    if speed == 0 or math.isinf(speed):
        yield from events
        return
    anchor: tuple[datetime, float] | None = None
    for ts, event in events:
        if anchor is None:
            anchor = (ts, clock())
        else:
            due = anchor[1] + (ts - anchor[0]).total_seconds() / speed
            wait = due - clock()
            if wait > 0:
                sleep(wait)
        yield ts, event
