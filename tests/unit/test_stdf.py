"""STDF V4 → TestResult: synthetic files for the rules, real Galaxy demo files for counts."""

from __future__ import annotations

import gzip
import io
import struct
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pystdf.IO import Parser

from fabloop.core.schemas import TestResult, parse_event
from fabloop.core.stdf import StdfError, read_stdf, stdf_events

STDF_DIR = Path(__file__).parents[2].parent / "shared" / "data" / "stdf"
T0 = 1_000_000_000  # 2001-09-09T01:46:40Z
MISSING_U4 = 0xFFFFFFFF


# ----------------------------------------------------------------- a tiny STDF writer


class StdfWriter:
    """Builds V4 records; ``offsets`` remembers where each record starts."""

    def __init__(self, endian: str = ">") -> None:
        self.e = endian
        self.buf = bytearray()
        self.offsets: list[int] = []

    def record(self, typ: int, sub: int, body: bytes) -> StdfWriter:
        self.offsets.append(len(self.buf))
        self.buf += struct.pack(self.e + "HBB", len(body), typ, sub) + body
        return self

    def pack(self, fmt: str, *values: object) -> bytes:
        return struct.pack(self.e + fmt, *values)

    @staticmethod
    def cn(text: str | bytes) -> bytes:
        raw = text.encode() if isinstance(text, str) else text
        return bytes([len(raw)]) + raw

    def far(self) -> StdfWriter:
        return self.record(0, 10, bytes([2 if self.e == "<" else 1, 4]))

    def mir(self, lot: str | bytes = "LOT9", job: str = "prog", rev: str = "3", start: int = T0) -> StdfWriter:
        body = self.pack("IIB", start - 60, start, 1) + b"P  " + self.pack("H", 65535) + b" "
        body += b"".join(self.cn(s) for s in (lot, "PART", "node", "TST", job, rev, "", "", "", "", "FT1"))
        return self.record(1, 10, body)

    def wir(self, wafer: str, start: int = T0 + 10, head: int = 1) -> StdfWriter:
        return self.record(2, 10, self.pack("BBI", head, 255, start) + self.cn(wafer))

    def wrr(self, wafer: str, parts: int, good: int, finish: int = T0 + 500, head: int = 1) -> StdfWriter:
        body = self.pack("BBIIIIII", head, 255, finish, parts, 0, MISSING_U4, good, MISSING_U4)
        return self.record(2, 20, body + self.cn(wafer))

    def pir(self, site: int, head: int = 1) -> StdfWriter:
        return self.record(5, 10, bytes([head, site]))

    def ptr(self, site: int, test: int, result: float, text: str | None = None, units: str | None = None,
            flags: int = 0, head: int = 1) -> StdfWriter:
        body = self.pack("IBBBBf", test, head, site, flags, 0, result)
        if text is not None or units is not None:
            body += self.cn(text or "") + self.cn("")
        if units is not None:
            body += bytes([0x0E]) + self.pack("bbbff", 0, 0, 0, -1.0, 1.0) + self.cn(units)
        return self.record(15, 10, body)

    def prr(self, site: int, part_id: str, hard: int, soft: int, flags: int = 0, xy: tuple[int, int] = (0, 0),
            head: int = 1) -> StdfWriter:
        body = self.pack("BBBHHHhhI", head, site, flags, 1, hard, soft, xy[0], xy[1], 0) + self.cn(part_id)
        return self.record(5, 20, body)

    def mrr(self, finish: int = T0 + 600) -> StdfWriter:
        return self.record(1, 20, self.pack("I", finish))

    def write(self, path: Path) -> Path:
        path.write_bytes(bytes(self.buf))
        return path


def two_site_wafer(endian: str = ">", good_cnt: int = 1, wafer: str = "LOT9-01") -> StdfWriter:
    """Sites 0 and 1 tested in parallel; later PTRs omit TEST_TXT and UNITS."""
    w = StdfWriter(endian).far().mir().wir(wafer)
    w.pir(0).pir(1)
    w.ptr(0, 100, 0.5, "Vth <> pin1", "V")
    w.ptr(1, 100, 0.7)  # text and units come from the first PTR of test 100
    w.ptr(0, 200, 9.0, "Ileak", "A", flags=0x80)  # failed
    w.ptr(1, 200, 0.0, flags=0x02)  # result not valid
    w.prr(1, "p2", hard=1, soft=1)
    w.prr(0, "p1", hard=5, soft=65535, flags=0x08)
    return w.wrr(wafer, parts=2, good=good_cnt).mrr()


# --------------------------------------------------------------------- synthetic files


@pytest.mark.parametrize("endian", [">", "<"])
def test_parts_and_wafer_become_events(tmp_path: Path, endian: str) -> None:
    summary = read_stdf(two_site_wafer(endian).write(tmp_path / "w.stdf"))

    assert summary.endian == ("big" if endian == ">" else "little")
    p2, p1, wafer = summary.events
    assert [e.part_id for e in summary.events] == ["p2", "p1", None]
    assert (p2.passed, p2.hard_bin, p2.soft_bin) == (True, 1, 1)
    assert (p1.passed, p1.hard_bin, p1.soft_bin) == (False, 5, None)
    assert [(m.name, m.units, m.test_num, m.passed) for m in p2.parametrics] == [
        ("Vth <> pin1", "V", 100, True),
        ("Ileak", "A", 200, True),
    ]
    assert p2.parametrics[0].value == pytest.approx(0.7)
    assert p2.parametrics[1].value is None  # TEST_FLG bit 1: result invalid
    assert p1.parametrics[1].passed is False and p1.parametrics[1].value == pytest.approx(9.0)
    for e in summary.events:
        assert (e.lot, e.wafer, e.program, e.stage) == ("LOT9", "LOT9-01", "prog@3", "wafer_sort")
    assert p1.ts == datetime.fromtimestamp(T0 + 10, UTC)  # WIR START_T
    assert wafer.ts == datetime.fromtimestamp(T0 + 500, UTC)  # WRR FINISH_T
    assert wafer.yield_pct == 50.0 and wafer.passed is False
    assert summary.wafers[0].counts_from == "WRR"
    assert summary.parametrics == 4 and summary.orphan_ptrs == 0


def test_wafer_pass_uses_the_yield_threshold(tmp_path: Path) -> None:
    path = two_site_wafer(good_cnt=2).write(tmp_path / "w.stdf")
    assert stdf_events(path, min_yield_pct=100)[-1].passed is True
    path = two_site_wafer(good_cnt=1).write(tmp_path / "w.stdf")
    assert stdf_events(path, min_yield_pct=50)[-1].passed is True
    assert stdf_events(path, min_yield_pct=50.1)[-1].passed is False


def test_missing_good_count_falls_back_to_parts_with_retests_resolved(tmp_path: Path) -> None:
    w = StdfWriter().far().mir().wir("07")
    w.pir(0).prr(0, "a", hard=5, soft=5, flags=0x08, xy=(1, 1))
    w.pir(0).prr(0, "b", hard=1, soft=1, xy=(2, 1))
    w.pir(0).prr(0, "a", hard=1, soft=1, flags=0x01, xy=(1, 1))  # retest of "a" by PART_ID, now passes
    w.wrr("07", parts=3, good=MISSING_U4).mrr()
    summary = read_stdf(w.write(tmp_path / "w.stdf"))

    assert summary.wafers[0].model_dump() == {
        "wafer": "LOT9-07", "parts": 2, "good": 2, "yield_pct": 100.0, "counts_from": "PRR"}
    assert len(summary.events) == 4  # every PRR is still an event
    assert {e.wafer for e in summary.events} == {"LOT9-07"}  # lot prefixed for global uniqueness


def test_parts_outside_a_wafer_are_final_test(tmp_path: Path) -> None:
    w = StdfWriter().far().mir().pir(0).ptr(0, 1, 1.0, "t", "V").prr(0, "u1", hard=1, soft=1).mrr()
    (event,) = stdf_events(w.write(tmp_path / "ft.stdf"))
    assert (event.stage, event.wafer, event.ts) == ("FT1", "LOT9", datetime.fromtimestamp(T0, UTC))


def test_event_ids_are_deterministic_per_content(tmp_path: Path) -> None:
    writer = two_site_wafer()
    plain = writer.write(tmp_path / "a.stdf")
    packed = tmp_path / "a.stdf.gz"
    packed.write_bytes(gzip.compress(bytes(writer.buf)))
    other = two_site_wafer(wafer="LOT9-02").write(tmp_path / "b.stdf")

    ids = [e.event_id for e in stdf_events(plain)]
    assert len(set(ids)) == len(ids)
    assert [e.event_id for e in stdf_events(plain)] == ids
    assert [e.event_id for e in stdf_events(packed)] == ids
    assert not set(ids) & {e.event_id for e in stdf_events(other)}


def test_events_survive_the_wire(tmp_path: Path) -> None:
    for event in stdf_events(two_site_wafer().write(tmp_path / "w.stdf")):
        assert parse_event(event.to_json()) == event


# --------------------------------------------------------------------- damaged files


def test_pystdf_alone_does_not_report_a_cut_record() -> None:
    """Why stdf.py walks REC_LEN itself: pystdf emits the partial record and stops quietly."""
    data = bytes(two_site_wafer().buf)
    seen: list[str] = []

    class Sink:
        def after_send(self, _: object, rec: tuple[object, list[object]]) -> None:
            seen.append(type(rec[0]).__name__)

    parser = Parser(inp=io.BytesIO(data[: len(data) - 3]))
    parser.addSink(Sink())
    parser.parse()  # no exception
    assert seen[-1] == "Mrr"  # ... even though the MRR lost 3 of its 4 bytes


def test_cut_mid_record_names_the_record_offset(tmp_path: Path) -> None:
    w = two_site_wafer()
    start_of_ptr = w.offsets[6]  # third PTR
    path = tmp_path / "cut.stdf"
    path.write_bytes(bytes(w.buf[: start_of_ptr + 7]))
    with pytest.raises(StdfError) as err:
        read_stdf(path)
    assert err.value.byte_offset == start_of_ptr
    assert str(path) in str(err.value) and f"byte offset {start_of_ptr}" in str(err.value)
    assert "truncated PTR record" in err.value.reason


def test_cut_mid_header_names_the_header_offset(tmp_path: Path) -> None:
    w = two_site_wafer()
    start = w.offsets[-1]
    path = tmp_path / "cut.stdf"
    path.write_bytes(bytes(w.buf[: start + 2]))
    with pytest.raises(StdfError, match="truncated record header: 2 of 4 bytes") as err:
        read_stdf(path)
    assert err.value.byte_offset == start


def test_cut_on_a_record_boundary_is_caught_by_the_missing_mrr(tmp_path: Path) -> None:
    w = two_site_wafer()
    path = tmp_path / "cut.stdf"
    path.write_bytes(bytes(w.buf[: w.offsets[-1]]))
    with pytest.raises(StdfError, match="does not end with an MRR") as err:
        read_stdf(path)
    assert err.value.byte_offset == w.offsets[-1]


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, this is not STDF at all\n", bytes(range(7, 255)) * 20],
    ids=["empty", "text", "binary"],
)
def test_garbage_is_refused_at_offset_zero(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.stdf"
    path.write_bytes(content)
    with pytest.raises(StdfError, match="not an STDF file") as err:
        read_stdf(path)
    assert err.value.byte_offset == 0 and err.value.path == str(path)


def test_undecodable_record_is_named(tmp_path: Path) -> None:
    w = StdfWriter().far().mir(lot=b"LOT\xff").mrr()
    with pytest.raises(StdfError, match="cannot decode record #1") as err:
        read_stdf(w.write(tmp_path / "bad.stdf"))
    assert err.value.byte_offset == w.offsets[1]


def test_truncated_gzip_is_refused(tmp_path: Path) -> None:
    packed = gzip.compress(bytes(two_site_wafer().buf))
    path = tmp_path / "cut.stdf.gz"
    path.write_bytes(packed[: len(packed) - 12])
    with pytest.raises(StdfError, match="gzip stream is truncated"):
        read_stdf(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(StdfError, match="nope.stdf"):
        read_stdf(tmp_path / "nope.stdf")


# ------------------------------------------------------------------- real tester files


def _real(name: str) -> Path:
    path = STDF_DIR / name
    if not path.exists():
        pytest.skip(f"../shared/data/stdf not present: {path} is missing")
    return path


@pytest.fixture(scope="module")
def lot2() -> tuple[object, float]:
    path = _real("lot2.stdf.gz")
    start = time.perf_counter()
    summary = read_stdf(path)
    return summary, time.perf_counter() - start


@pytest.mark.parametrize(
    ("name", "wafer", "parts", "ptrs", "bin1", "start", "finish"),
    [
        ("lot2.stdf.gz", "GAL-LOT-02", 1569, 52_403, 1389, "2001-06-05T20:50", "2001-06-05T22:10"),
        ("lot3.stdf.gz", "GAL-LOT-03", 1619, 54_123, 1378, "2001-06-06T01:13", "2001-06-06T02:48"),
    ],
)
def test_real_files_match_the_readme(name: str, wafer: str, parts: int, ptrs: int, bin1: int,
                                     start: str, finish: str, lot2: tuple[object, float]) -> None:
    summary = lot2[0] if name == "lot2.stdf.gz" else read_stdf(_real(name))
    per_part = [e for e in summary.events if e.part_id is not None]
    per_wafer = [e for e in summary.events if e.part_id is None]

    assert summary.record_counts["PRR"] == summary.record_counts["PIR"] == parts
    assert len(per_part) == parts and len(per_wafer) == summary.record_counts["WRR"] == 1
    assert sum(len(e.parametrics) for e in per_part) == summary.record_counts["PTR"] == ptrs
    assert sum(e.hard_bin == 1 for e in per_part) == bin1
    assert sum(e.passed for e in per_part) == bin1  # PART_FLG bit 3 agrees with bin 1 here
    assert {e.wafer for e in summary.events} == {wafer}
    assert {(e.lot, e.program, e.stage) for e in summary.events} == {("GAL-LOT", "mobile-05@16", "wafer_sort")}
    assert per_wafer[0].yield_pct == pytest.approx(bin1 / parts * 100)
    assert summary.endian == "big" and summary.tester_type == "A530"
    assert summary.started.isoformat().startswith(start) and summary.finished.isoformat().startswith(finish)
    assert per_wafer[0].ts == summary.finished and summary.events[-1] is per_wafer[0]
    named = {m.test_num: m.name for e in per_part for m in e.parametrics}
    assert all(not name.startswith("test_") for name in named.values())  # every TEST_TXT carried
    assert all(isinstance(e, TestResult) for e in summary.events)


def test_real_file_parses_quickly(lot2: tuple[object, float]) -> None:
    summary, seconds = lot2
    assert summary.unpacked_bytes == 4_418_001
    assert seconds < 10, f"lot2 (4.4 MB) took {seconds:.1f} s"


def test_real_file_cut_mid_record(tmp_path: Path) -> None:
    data = gzip.decompress(_real("lot2.stdf.gz").read_bytes())
    cut = 2_000_003
    path = tmp_path / "lot2_cut.stdf"
    path.write_bytes(data[:cut])
    with pytest.raises(StdfError) as err:
        read_stdf(path)
    offset = err.value.byte_offset
    (rec_len,) = struct.unpack_from(">H", data, offset)
    assert offset <= cut < offset + 4 + rec_len  # the named record is the one the cut went through
    assert str(path) in str(err.value)

    path_gz = tmp_path / "lot2_cut.stdf.gz"
    path_gz.write_bytes(gzip.compress(data[: offset + 2]))  # now cut inside that record's header
    with pytest.raises(StdfError, match="truncated record header") as err:
        read_stdf(path_gz)
    assert err.value.byte_offset == offset
