"""What the stack-driving benchmarks share: a timeline on stderr, polling, the real CLI, event-store reads.

Each benchmark is a script (``.venv/bin/python benchmarks/NAME.py``), so this module is
imported from the script's own folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fabloop.adapters.store import engine_for, run_sync

REPO = Path(__file__).resolve().parents[1]
T0 = time.monotonic()


def say(text: str) -> None:
    """One timeline line on stderr: stdout ends with the benchmark's JSON line."""
    print(f"{time.monotonic() - T0:7.1f}s  {text}", file=sys.stderr, flush=True)


def wait(what: str, check: Callable[[], Any], timeout: float, interval: float = 2.0) -> Any:
    """Poll ``check`` until it returns something truthy; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def cli(home: Path, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The real ``fabloop`` command line against the stack at ``home``."""
    env = {**os.environ, "FABLOOP_HOME": str(home), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "fabloop.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"fabloop {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return proc


def db_query(url: str, stmt: Any) -> list[Any]:
    """Rows of ``stmt`` from the event store at ``url``."""
    async def go() -> list[Any]:
        async with engine_for(url) as engine, engine.connect() as conn:
            return list((await conn.execute(stmt)).all())

    return run_sync(go())
