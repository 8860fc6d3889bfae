"""The real ``fabloop ingest`` command and reads of the event store it fills."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

from sqlalchemy import func, select

from fabloop.adapters.store import SensorReadingRow, TestResultRow, make_engine
from fabloop.core.simulate import SimulationConfig, ToolSpec, simulate
from tests.helpers.stack import REPO, Broker, RunningStack


def start_ingest(
    stack: RunningStack, broker: Broker, db: str, *extra: str, max_idle: float = 3
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fabloop.cli", "ingest", "--bootstrap-servers", broker.bootstrap,
         "--database-url", db, "--max-idle", str(max_idle), *extra],
        env={**os.environ, **stack.env}, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 180) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def query(db: str, stmt: Any) -> list[Any]:
    async def run() -> list[Any]:
        engine = make_engine(db)
        try:
            async with engine.connect() as conn:
                return list((await conn.execute(stmt)).all())
        finally:
            await engine.dispose()

    return asyncio.run(run())


def stored_ids(db: str) -> list[str]:
    rows = query(db, select(SensorReadingRow.event_id)) + query(db, select(TestResultRow.event_id))
    return [r[0] for r in rows]


def wait_for_rows(db: str, at_least: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # Both tables: a backlog is consumed test results first (small), readings last.
            n = (query(db, select(func.count()).select_from(SensorReadingRow))[0][0]
                 + query(db, select(func.count()).select_from(TestResultRow))[0][0])
            if n >= at_least:
                return n
        except Exception:  # noqa: BLE001 - tables not created yet
            pass
        time.sleep(0.3)
    raise TimeoutError(f"fewer than {at_least} events stored after {timeout}s")


def sim(prefix: str, wafers: int, seed: int = 3) -> list[Any]:
    tools = [ToolSpec(name=f"{prefix}-{i}", chambers=["A", "B"]) for i in (1, 2, 3)]
    return list(simulate(SimulationConfig(seed=seed, wafers=wafers, n_sensors=30, tools=tools, pm_every_wafers=None)))
