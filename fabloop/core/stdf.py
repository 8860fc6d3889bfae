"""STDF V4 tester files → ``TestResult`` events.

A tester writes one STDF file per lot (or sub-lot): a FAR, a MIR, then for each
wafer a WIR … WRR bracket holding, per part, a PIR … PRR bracket with the part's
PTRs. This module turns that into one per-part event per PRR and one wafer-level
event per WRR. Decoding is delegated to pystdf; what pystdf does not do is
notice damage — it stops quietly at a cut record and emits the partial fields —
so every file is first walked record by record (REC_LEN) and must end exactly at
a record boundary with its MRR. Either the whole file becomes events, or
:class:`StdfError` names the file and the byte offset of the bad record.

Conventions (documented here because STDF leaves them open):

* ``program`` is ``"<JOB_NAM>@<JOB_REV>"`` (just ``JOB_NAM`` without a revision).
* ``stage`` is ``"wafer_sort"`` inside a WIR/WRR bracket, else MIR ``TEST_COD``
  or ``"final_test"``.
* ``wafer`` is the WIR/WRR ``WAFER_ID``, prefixed with ``"<LOT_ID>-"`` unless it
  already starts with the lot id, so it is globally unique; without a wafer id
  it is ``"<LOT_ID>-W<n>"`` (n = wafer ordinal in the file); parts outside any
  wafer use ``"<LOT_ID>-<SBLOT_ID>"`` or ``LOT_ID``.
* Times are STDF U4 epoch seconds read as UTC (0 = missing). A part carries no
  time of its own, so part events take the wafer's WIR ``START_T`` (else MIR
  ``START_T``); wafer events take WRR ``FINISH_T`` (else MRR ``FINISH_T``).
* A part passed when PRR ``PART_FLG`` bit 3 is 0. When bit 4 says the flag is
  invalid, the part passed iff none of its PTRs failed (counted in the summary).
* Wafer yield: ``yield_pct = good / parts * 100`` from WRR ``GOOD_CNT`` /
  ``PART_CNT`` when both are present; testers often write GOOD_CNT as missing
  (4294967295, as in the Galaxy demo files), and then both counts come from the
  wafer's PRRs (a retest that supersedes an earlier part replaces it). The wafer
  event ``passed`` is ``yield_pct >= min_yield_pct``.
* ``event_id`` is uuid5 over the unpacked file's sha256 and the record index, so
  re-publishing the same file (plain or gzipped) yields the same ids.
"""

from __future__ import annotations

import hashlib
import io
import math
import struct
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from pystdf import V4
from pystdf.IO import Parser

from fabloop.core.schemas import TestResult

__all__ = [
    "DEFAULT_MIN_YIELD_PCT",
    "StdfError",
    "StdfSummary",
    "WaferSummary",
    "read_stdf",
    "stdf_events",
]

DEFAULT_MIN_YIELD_PCT = 80.0
_EVENT_NAMESPACE = uuid.UUID("6f1c55d2-5a40-4c1e-9a7e-3d3f1b2c8e01")
_MISSING_U4 = 0xFFFFFFFF
_MISSING_BIN = 65535
_MISSING_COORD = -32768
_NAME_MAX = 128
_HEADER = 4
_FAR = (0, 10)
_MRR = (1, 20)
_RECORD_NAMES = {(r.typ, r.sub): type(r).__name__.upper() for r in V4.records}
# Only the records we use are decoded; the rest are skipped by length, so a
# damaged GDR or DTR (pystdf mis-decodes some Vn fields) cannot sink a lot.
_DECODED = (V4.far, V4.mir, V4.wir, V4.wrr, V4.pir, V4.prr, V4.ptr, V4.mrr)


class StdfError(ValueError):
    """A file that is not a complete, decodable STDF V4 stream."""

    def __init__(self, path: str | Path, byte_offset: int, reason: str) -> None:
        self.path = str(path)
        self.byte_offset = byte_offset
        self.reason = reason
        super().__init__(f"{self.path}: byte offset {byte_offset}: {reason}")


class WaferSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    wafer: str
    parts: int
    good: int
    yield_pct: float | None
    counts_from: str  # "WRR" or "PRR"


class StdfSummary(BaseModel):
    """What one STDF file held, plus the events built from it (in file order)."""

    model_config = ConfigDict(frozen=True)

    path: str
    sha256: str  # of the unpacked STDF bytes
    unpacked_bytes: int
    endian: str  # "big" or "little", from FAR CPU_TYPE
    lot: str
    program: str
    part_type: str | None
    tester_type: str | None
    node: str | None
    started: datetime | None
    finished: datetime | None
    record_counts: dict[str, int]
    wafers: list[WaferSummary]
    parts: int
    parametrics: int  # PTRs attached to a part
    orphan_ptrs: int  # PTRs with no open PIR on their head/site
    parts_without_pass_flag: int  # PRR PART_FLG bit 4 set
    events: list[TestResult]


def stdf_events(path: str | Path, *, min_yield_pct: float = DEFAULT_MIN_YIELD_PCT) -> list[TestResult]:
    """All ``TestResult`` events of one STDF file, in file order."""
    return read_stdf(path, min_yield_pct=min_yield_pct).events


def read_stdf(path: str | Path, *, min_yield_pct: float = DEFAULT_MIN_YIELD_PCT) -> StdfSummary:
    """Parse a whole ``.stdf`` / ``.stdf.gz`` file; raise :class:`StdfError` if damaged."""
    if not 0 <= min_yield_pct <= 100:
        raise ValueError(f"min_yield_pct must be within 0..100, got {min_yield_pct}")
    path = Path(path)
    data, gzipped, gzip_problem = _load(path)
    try:
        if gzip_problem is not None and len(data) < _HEADER + 2:
            raise StdfError(path, 0, f"{gzip_problem}; it unpacks to only {len(data)} bytes")
        endian = _check_far(path, data)
        counts, problem = _walk(data, endian)
        if gzip_problem is not None:
            at, why = problem or (len(data), "")
            raise StdfError(path, at, f"{gzip_problem}; the unpacked stream stops after {len(data)} bytes"
                            + (f" ({why})" if why else ""))
        if problem is not None:
            raise StdfError(path, *problem)
        sink = _decode(path, data)
        return _build(path, data, endian, counts, sink, min_yield_pct)
    except StdfError as err:
        if gzipped:  # offsets count bytes of the unpacked STDF stream, not of the .gz file
            raise StdfError(path, err.byte_offset, f"{err.reason} [offset in the unpacked stream]") from None
        raise


# --------------------------------------------------------------------------- bytes


def _load(path: Path) -> tuple[bytes, bool, str | None]:
    """Read the file, unpacking gzip by its magic bytes; keep what a cut gzip still gives."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StdfError(path, 0, f"cannot read file: {exc.strerror or exc}") from None
    if raw[:2] != b"\x1f\x8b":
        return raw, False, None
    out = bytearray()
    rest = raw
    while rest:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out += inflater.decompress(rest)
        except zlib.error as exc:
            return bytes(out), True, f"corrupt gzip data ({exc})"
        if not inflater.eof:
            return bytes(out), True, "gzip stream is truncated"
        rest = inflater.unused_data.lstrip(b"\x00")  # concatenated members / padding
    return bytes(out), True, None


def _check_far(path: Path, data: bytes) -> str:
    """The first record must be a V4 FAR; its CPU_TYPE decides the byte order (as in pystdf)."""
    if len(data) < _HEADER + 2 or (data[2], data[3]) != _FAR:
        raise StdfError(path, 0, "not an STDF file: the first record is not a FAR (REC_TYP 0, REC_SUB 10)")
    endian = "<" if data[4] == 2 else ">"
    (rec_len,) = struct.unpack_from(endian + "H", data, 0)
    if rec_len != 2:
        raise StdfError(path, 0, f"FAR REC_LEN is {rec_len}, expected 2 for CPU_TYPE {data[4]}")
    if data[5] != 4:
        raise StdfError(path, 5, f"unsupported STDF version {data[5]} (only V4 is read)")
    return endian


def _walk(data: bytes, endian: str) -> tuple[Counter[tuple[int, int]], tuple[int, str] | None]:
    """Check every record header against the file length; pystdf would silently stop."""
    counts: Counter[tuple[int, int]] = Counter()
    header = struct.Struct(endian + "HBB")
    size = len(data)
    offset = 0
    last: tuple[int, int] | None = None
    while offset < size:
        if size - offset < _HEADER:
            return counts, (offset, f"truncated record header: {size - offset} of {_HEADER} bytes present")
        rec_len, typ, sub = header.unpack_from(data, offset)
        end = offset + _HEADER + rec_len
        if end > size:
            name = _RECORD_NAMES.get((typ, sub), f"REC_TYP {typ}/REC_SUB {sub}")
            return counts, (
                offset,
                f"truncated {name} record: REC_LEN says {rec_len} bytes, only {size - offset - _HEADER} present",
            )
        counts[(typ, sub)] += 1
        last = (typ, sub)
        offset = end
    if last != _MRR:
        return counts, (size, "file does not end with an MRR record (truncated at a record boundary?)")
    return counts, None


# ------------------------------------------------------------------------- decoding


@dataclass
class _Ptr:
    test_num: int
    name: str
    units: str | None
    value: float | None
    passed: bool | None


@dataclass
class _Wafer:
    ordinal: int
    head: int
    wir_offset: int = 0
    wafer_id: str | None = None
    start: datetime | None = None
    finish: datetime | None = None
    part_cnt: int | None = None
    good_cnt: int | None = None
    wrr_index: int | None = None
    wrr_offset: int = 0
    parts: list[_Part] = field(default_factory=list)


@dataclass
class _Part:
    wafer: _Wafer | None
    ptrs: list[_Ptr] = field(default_factory=list)
    prr: dict[str, Any] | None = None
    prr_index: int = 0
    prr_offset: int = 0
    passed: bool = False


class _Sink:
    """pystdf sink: pairs PIR/PTR/PRR by head+site and WIR/WRR by head, in one pass."""

    def __init__(self) -> None:
        self.index = -1
        self.offset = 0
        self.mir: dict[str, Any] | None = None
        self.mir_offset = 0
        self.mrr: dict[str, Any] | None = None
        self.wafers: list[_Wafer] = []
        self.parts: list[_Part] = []
        self.orphan_ptrs = 0
        self._open_wafer: dict[int, _Wafer] = {}
        self._open_part: dict[tuple[int, int], _Part] = {}
        self._test_defaults: dict[int, tuple[str | None, str | None]] = {}

    def after_header(self, parser: Parser, header: Any) -> None:
        self.index += 1
        self.offset = parser.inp.tell() - _HEADER

    def after_send(self, parser: Parser, data: tuple[Any, list[Any]]) -> None:
        rec_type, values = data
        handler = getattr(self, "_" + type(rec_type).__name__.lower(), None)
        if handler is not None:
            handler(dict(zip(rec_type.fieldNames, values, strict=False)))  # a short record leaves fields unset

    def _mir(self, r: dict[str, Any]) -> None:
        self.mir, self.mir_offset = r, self.offset

    def _mrr(self, r: dict[str, Any]) -> None:
        self.mrr = r

    def _wir(self, r: dict[str, Any]) -> None:
        wafer = _Wafer(ordinal=len(self.wafers) + 1, head=r["HEAD_NUM"], wafer_id=_text(r["WAFER_ID"]),
                       start=_time(r["START_T"]), wir_offset=self.offset)
        self.wafers.append(wafer)
        self._open_wafer[wafer.head] = wafer

    def _wrr(self, r: dict[str, Any]) -> None:
        wafer = self._open_wafer.pop(r["HEAD_NUM"], None)
        if wafer is None:  # WRR without WIR: the wafer still happened
            wafer = _Wafer(ordinal=len(self.wafers) + 1, head=r["HEAD_NUM"])
            self.wafers.append(wafer)
        wafer.wafer_id = wafer.wafer_id or _text(r["WAFER_ID"])
        wafer.finish = _time(r["FINISH_T"])
        wafer.part_cnt = _count(r["PART_CNT"])
        wafer.good_cnt = _count(r["GOOD_CNT"])
        wafer.wrr_index, wafer.wrr_offset = self.index, self.offset

    def _pir(self, r: dict[str, Any]) -> None:
        self._open_part[(r["HEAD_NUM"], r["SITE_NUM"])] = _Part(wafer=self._open_wafer.get(r["HEAD_NUM"]))

    def _ptr(self, r: dict[str, Any]) -> None:
        part = self._open_part.get((r["HEAD_NUM"], r["SITE_NUM"]))
        if part is None:
            self.orphan_ptrs += 1
            return
        part.ptrs.append(self._parametric(r))

    def _prr(self, r: dict[str, Any]) -> None:
        part = self._open_part.pop((r["HEAD_NUM"], r["SITE_NUM"]), None)
        if part is None:  # PRR without PIR: keep the part result, it has no PTRs
            part = _Part(wafer=self._open_wafer.get(r["HEAD_NUM"]))
        part.prr, part.prr_index, part.prr_offset = r, self.index, self.offset
        self.parts.append(part)
        if part.wafer is not None:
            part.wafer.parts.append(part)

    def _parametric(self, r: dict[str, Any]) -> _Ptr:
        """Apply the spec's PTR defaults: the first PTR of a TEST_NUM sets text and units."""
        test_num = r["TEST_NUM"]
        text, units = _text(r["TEST_TXT"]), r["UNITS"]
        if test_num not in self._test_defaults:
            self._test_defaults[test_num] = (text, _text(units))
        default_text, default_units = self._test_defaults[test_num]
        if units is None or units == "":
            units = default_units
        elif units == "\x00":  # spec: a single NUL overrides the default with "no value"
            units = None
        flags = r["TEST_FLG"] or 0
        result = r["RESULT"]
        valid = not flags & 0b0001_0010 and result is not None and math.isfinite(result)
        passed = None if flags & 0b0101_0000 else not flags & 0b1000_0000
        name = (text or default_text or f"test_{test_num}")[:_NAME_MAX]
        return _Ptr(test_num, name, _text(units), float(result) if valid else None, passed)


def _decode(path: Path, data: bytes) -> _Sink:
    """Run pystdf over checked bytes (it picks the byte order from FAR CPU_TYPE itself)."""
    sink = _Sink()
    parser = Parser(recTypes=_DECODED, inp=io.BytesIO(data))
    parser.addSink(sink)
    try:
        parser.parse()
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad record
        raise StdfError(path, sink.offset, f"cannot decode record #{sink.index}: {type(exc).__name__}: {exc}") from None
    return sink


# ---------------------------------------------------------------------- events


def _build(path: Path, data: bytes, endian: str, counts: Counter[tuple[int, int]], sink: _Sink,
           min_yield_pct: float) -> StdfSummary:
    mir = sink.mir
    if mir is None:
        raise StdfError(path, 0, "no MIR record")
    lot = _text(mir["LOT_ID"])
    job = _text(mir["JOB_NAM"])
    if lot is None:
        raise StdfError(path, sink.mir_offset, "MIR LOT_ID is empty")
    if job is None:
        raise StdfError(path, sink.mir_offset, "MIR JOB_NAM is empty")
    rev = _text(mir["JOB_REV"])
    program = f"{job}@{rev}" if rev else job
    started = _time(mir["START_T"])
    finished = _time(sink.mrr["FINISH_T"]) if sink.mrr else None
    digest = hashlib.sha256(data).hexdigest()
    loose_wafer = "-".join(p for p in (lot, _text(mir["SBLOT_ID"])) if p)
    loose_stage = _text(mir["TEST_COD"]) or "final_test"

    def wafer_name(w: _Wafer) -> str:
        wid = w.wafer_id or f"W{w.ordinal}"
        return wid if wid.startswith(lot) else f"{lot}-{wid}"

    def event_id(record_index: int) -> str:
        return str(uuid.uuid5(_EVENT_NAMESPACE, f"{digest}:{record_index}"))

    built: list[tuple[int, TestResult]] = []
    unflagged = 0
    for part in sink.parts:
        prr = part.prr
        assert prr is not None
        flags = prr["PART_FLG"] or 0
        if flags & 0b1_0000:
            unflagged += 1
            passed = not any(p.passed is False for p in part.ptrs)
        else:
            passed = not flags & 0b1000
        wafer = part.wafer
        ts = (wafer.start if wafer else None) or started or (wafer.finish if wafer else None) or finished
        if ts is None:
            raise StdfError(path, part.prr_offset, "no timestamp for the part (MIR START_T and WIR START_T are 0)")
        soft = prr["SOFT_BIN"]
        fields = dict(
            event_id=event_id(part.prr_index), ts=ts, lot=lot,
            wafer=wafer_name(wafer) if wafer else loose_wafer, program=program,
            stage="wafer_sort" if wafer else loose_stage, passed=passed, part_id=_part_id(prr, part),
            hard_bin=prr["HARD_BIN"], soft_bin=None if soft in (None, _MISSING_BIN) else soft,
            parametrics=[{"name": p.name, "value": p.value, "units": p.units, "test_num": p.test_num,
                          "passed": p.passed} for p in part.ptrs],
        )
        built.append((part.prr_index, _event(path, part.prr_offset, "PRR", fields)))
        part.passed = passed

    wafers: list[WaferSummary] = []
    for wafer in sink.wafers:
        if wafer.wrr_index is None:
            raise StdfError(path, wafer.wir_offset, f"wafer {wafer_name(wafer)!r} has a WIR but no WRR")
        parts, good, source = _wafer_counts(wafer)
        if good > parts:
            raise StdfError(path, wafer.wrr_offset, f"WRR GOOD_CNT {good} exceeds PART_CNT {parts}")
        yield_pct = good / parts * 100 if parts else None
        name = wafer_name(wafer)
        ts = wafer.finish or finished or wafer.start or started
        if ts is None:
            raise StdfError(path, wafer.wrr_offset, "no timestamp for the wafer (WRR/MRR/WIR/MIR times are 0)")
        fields = dict(
            event_id=event_id(wafer.wrr_index), ts=ts, lot=lot, wafer=name, program=program, stage="wafer_sort",
            passed=yield_pct is not None and yield_pct >= min_yield_pct, yield_pct=yield_pct,
        )
        built.append((wafer.wrr_index, _event(path, wafer.wrr_offset, "WRR", fields)))
        wafers.append(WaferSummary(wafer=name, parts=parts, good=good, yield_pct=yield_pct, counts_from=source))

    built.sort(key=lambda pair: pair[0])
    return StdfSummary(
        path=str(path), sha256=digest, unpacked_bytes=len(data), endian="little" if endian == "<" else "big",
        lot=lot, program=program, part_type=_text(mir["PART_TYP"]), tester_type=_text(mir["TSTR_TYP"]),
        node=_text(mir["NODE_NAM"]), started=started, finished=finished,
        record_counts={_RECORD_NAMES.get(k, f"{k[0]}/{k[1]}"): v for k, v in sorted(counts.items())},
        wafers=wafers, parts=len(sink.parts), parametrics=sum(len(p.ptrs) for p in sink.parts),
        orphan_ptrs=sink.orphan_ptrs, parts_without_pass_flag=unflagged, events=[e for _, e in built],
    )


def _wafer_counts(wafer: _Wafer) -> tuple[int, int, str]:
    """(parts, good, source): WRR counts if present, else the wafer's PRRs with retests resolved."""
    if wafer.part_cnt is not None and wafer.good_cnt is not None:
        return wafer.part_cnt, wafer.good_cnt, "WRR"
    alive: dict[int, bool] = {}
    by_id: dict[str, int] = {}
    by_xy: dict[tuple[int, int], int] = {}
    for i, part in enumerate(wafer.parts):
        prr = part.prr
        assert prr is not None
        flags = prr["PART_FLG"] or 0
        pid, xy = _text(prr["PART_ID"]), (prr["X_COORD"], prr["Y_COORD"])
        if flags & 0b01 and pid in by_id:  # bit 0: supersedes the part with this PART_ID
            alive.pop(by_id[pid], None)
        elif flags & 0b10 and xy in by_xy:  # bit 1: supersedes the part at this X/Y
            alive.pop(by_xy[xy], None)
        alive[i] = part.passed
        if pid:
            by_id[pid] = i
        by_xy[xy] = i
    return len(alive), sum(alive.values()), "PRR"


def _event(path: Path, offset: int, record: str, fields: dict[str, Any]) -> TestResult:
    try:
        return TestResult(**fields)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        raise StdfError(path, offset, f"{record} gives an invalid event field '{where}': {err['msg']}") from None


def _part_id(prr: dict[str, Any], part: _Part) -> str:
    pid = _text(prr["PART_ID"])
    if pid:
        return pid[:_NAME_MAX]
    x, y = prr["X_COORD"], prr["Y_COORD"]
    if x not in (None, _MISSING_COORD) and y not in (None, _MISSING_COORD):
        return f"x{x}y{y}"
    return f"rec{part.prr_index}"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip().strip("\x00").strip()
    return text or None


def _time(epoch: int | None) -> datetime | None:
    return datetime.fromtimestamp(epoch, UTC) if epoch else None


def _count(value: int | None) -> int | None:
    return None if value is None or value == _MISSING_U4 else value

