"""One drift check per window, on SQLite and PostgreSQL: the insert-first claim, and the sweep's choice.

Window events arrive at least once (and the ingestor's sweep announces a window
again when its check does not show up), so several checks may be handed one
window at once. These tests race the claims from several processes against the
real event store, and read back what the sweep would announce.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from fabloop.adapters import store
from fabloop.adapters.store import DriftCheckRow, FeatureDriftRow, IngestStore, WindowRow, make_engine, migrate
from fabloop.core.drift import FeatureDrift
from fabloop.core.scopes import ModelCatalogValue
from tests.helpers.ingest import query
from tests.helpers.stack import REPO

pytestmark = pytest.mark.integration

_CLAIMER = """
import asyncio, sys
from pathlib import Path
from fabloop.adapters.store import claim_window, make_engine

url, window_id, go, name, n = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])

async def main():
    engine = make_engine(url, pooled=True)
    try:
        async with engine.connect():
            pass  # connected before the start line
        print("ready", flush=True)
        while not go.exists():
            await asyncio.sleep(0.005)
        runs = [f"{name}-{i}" for i in range(n)]
        claims = await asyncio.gather(*(claim_window(engine, window_id, run) for run in runs))
        for run, c in zip(runs, claims):
            print("duplicate" if c.duplicate else "won", c.check_id, c.flow_run_id, run, flush=True)
    finally:
        await engine.dispose()

asyncio.run(main())
"""


def _window(url: str, model: str, status: str = "closed", **fields: object) -> int:
    fields.setdefault("closed_at", store.utcnow() if status == "closed" else None)

    async def run() -> int:
        engine = make_engine(url)
        try:
            async with store.sessionmaker(engine)() as session, session.begin():
                row = WindowRow(model=model, scope={"tool": model}, status=status, wafer_count=20, offsets={},
                                **fields)
                session.add(row)
                await session.flush()
                return row.id
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _verdict(claim: store.Claim, flow_run_id: str | None) -> DriftCheckRow:
    return DriftCheckRow(id=claim.check_id, window_id=claim.window_id, model=claim.model, flow_run_id=flow_run_id,
                         checked_at=store.utcnow(), status="ok", drifted=False, performance_breach=False,
                         share=0.0, reason="no drift", detail={})


def test_concurrent_checks_of_one_window_record_one_check(database_url: str, tmp_path: Path) -> None:
    migrate(database_url)
    window_id = _window(database_url, f"claim-{uuid.uuid4().hex[:6]}")
    processes, per_process, go = 2, 8, tmp_path / "go"
    racers = [
        subprocess.Popen([sys.executable, "-c", _CLAIMER, database_url, str(window_id), str(go), f"run{p}",
                          str(per_process)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for p in range(processes)
    ]
    for p in racers:  # every racer is connected and waiting
        assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
    go.touch()
    lines: list[list[str]] = []
    for p in racers:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        lines += [line.split() for line in out.splitlines()]
    assert Counter(outcome for outcome, *_ in lines) == {"won": 1, "duplicate": processes * per_process - 1}
    ((_, check_id, winner, _),) = [line for line in lines if line[0] == "won"]
    assert {(c, holder) for _, c, holder, _ in lines} == {(check_id, winner)}, "every check found the one claim"

    async def record() -> None:
        engine = make_engine(database_url)
        try:
            claim = store.Claim(int(check_id), window_id, "m", False, store.CLAIMED, winner)
            loser = next(run for outcome, _, _, run in lines if outcome == "duplicate")
            with pytest.raises(store.ClaimLost):  # a loser that records anyway changes nothing
                await store.record_check(engine, _verdict(claim, loser))
            features = [FeatureDrift(feature="s001", status="ok", column_type="num", stattest="psi", score=0.01,
                                     threshold=0.1, drifted=False, n_reference=200, n_current=20)]
            assert await store.record_check(engine, _verdict(claim, winner), features) == int(check_id)
            with pytest.raises(store.ClaimLost):  # a verdict is recorded once
                await store.record_check(engine, _verdict(claim, winner))
            again = await store.claim_window(engine, window_id, winner)  # the winner's run, retried
            assert again.duplicate and again.status == "ok"
        finally:
            await engine.dispose()

    asyncio.run(record())
    rows = query(database_url, select(DriftCheckRow.id, DriftCheckRow.status, DriftCheckRow.flow_run_id)
                 .where(DriftCheckRow.window_id == window_id))
    assert [tuple(r) for r in rows] == [(int(check_id), "ok", winner)]
    features = query(database_url, select(FeatureDriftRow.feature).where(FeatureDriftRow.check_id == int(check_id)))
    assert [f for (f,) in features] == ["s001"]


def test_an_open_window_is_refused_and_a_claim_is_taken_over_once(database_url: str) -> None:
    migrate(database_url)
    model = f"claim-{uuid.uuid4().hex[:6]}"
    open_id, closed_id = _window(database_url, model, status="open"), _window(database_url, model)

    async def run() -> None:
        engine = make_engine(database_url)
        try:
            with pytest.raises(store.WindowNotClosed, match=rf"window {open_id} of {model} is 'open', not closed"):
                await store.claim_window(engine, open_id, "run-a")
            with pytest.raises(store.WindowNotClosed, match="window 999999 is not in the event store"):
                await store.claim_window(engine, 999_999, "run-a")
            first = await store.claim_window(engine, closed_id, "run-a")
            assert not first.duplicate
            # The same run (a flow retry) gets its claim back; another run finds it taken.
            assert (await store.claim_window(engine, closed_id, "run-a")) == first
            held = await store.claim_window(engine, closed_id, "run-b")
            assert held.duplicate and held.flow_run_id == "run-a" and held.check_id == first.check_id
            assert held.claimed_at is not None and abs(held.claimed_at - store.utcnow()) < timedelta(minutes=1)
            # run-a ended without a verdict: run-b and run-c both take over; one of them gets it.
            taken = await asyncio.gather(store.take_over_claim(engine, held, "run-b"),
                                         store.take_over_claim(engine, held, "run-c"))
            (winner,) = [t for t in taken if t is not None]
            assert winner.check_id == first.check_id and not winner.duplicate
            with pytest.raises(store.ClaimLost):
                await store.record_check(engine, _verdict(first, "run-a"))
            await store.record_check(engine, _verdict(winner, winner.flow_run_id))
        finally:
            await engine.dispose()

    asyncio.run(run())
    assert query(database_url, select(WindowRow.status).where(WindowRow.id == open_id)) == [("open",)]
    rows = query(database_url, select(DriftCheckRow.window_id, DriftCheckRow.status))
    assert [tuple(r) for r in rows if r[0] in (open_id, closed_id)] == [(closed_id, "ok")]


def test_the_sweep_announces_the_unannounced_and_the_unjudged_but_never_a_set_up_window(database_url: str) -> None:
    migrate(database_url)
    model = f"sweep-{uuid.uuid4().hex[:6]}"
    now, long_ago = store.utcnow(), store.utcnow() - timedelta(minutes=10)
    unannounced = _window(database_url, model)
    fresh = _window(database_url, model, announced=True, announced_at=now)
    unjudged = _window(database_url, model, announced=True, announced_at=long_ago)
    judged = _window(database_url, model, announced=True, announced_at=long_ago)
    stale_claim = _window(database_url, model, announced=True, announced_at=long_ago)
    live_claim = _window(database_url, model, announced=True, announced_at=long_ago)
    set_up = _window(database_url, model, announced=True, announced_at=None)
    too_old = _window(database_url, model, announced=True, announced_at=long_ago)
    # Announced again 8 minutes ago, after waiting 22 minutes since it closed: it waits 22 more.
    backing_off = _window(database_url, model, announced=True, announced_at=now - timedelta(minutes=8),
                          closed_at=now - timedelta(minutes=30))
    still_open = _window(database_url, model, status="open")

    async def run() -> list[int]:
        engine = make_engine(database_url)
        try:
            for window_id in (judged, stale_claim, live_claim):
                claim = await store.claim_window(engine, window_id, f"run-{window_id}")
                if window_id == judged:
                    await store.record_check(engine, _verdict(claim, claim.flow_run_id))
            async with engine.begin() as conn:
                await conn.execute(update(DriftCheckRow).where(DriftCheckRow.window_id == stale_claim)
                                   .values(checked_at=long_ago))
                await conn.execute(update(WindowRow).where(WindowRow.id == too_old)
                                   .values(closed_at=now - timedelta(days=2)))
            due = await IngestStore(engine, ModelCatalogValue()).windows_to_announce(
                timedelta(minutes=5), timedelta(days=1))
            return [w.id for w in due if w.model == model]
        finally:
            await engine.dispose()

    due = asyncio.run(run())
    assert due == [unannounced, unjudged, stale_claim]
    assert not {fresh, judged, live_claim, set_up, too_old, backing_off, still_open} & set(due)
