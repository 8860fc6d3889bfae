"""The main job (``fabloop up``, ``fabloop run``, ``fabloop down``) on its own stack, in the background.

The job is the README's command: minutes of streaming, first trainings, drift
checks and a retraining, most of it spent waiting on its own Prefect worker. The
suite starts it as soon as collection has selected its tests, so it runs beside
the rest of the suite instead of after it. When the job ends, a thread of the test
process reads what the job left in its stack (the MLflow registry, the event
store, the stack's processes), runs ``fabloop down`` and records what is still
alive, so the stack lives exactly as long as the job and its backlog. The tests
(tests/e2e) run last and assert on that record; nothing of the job is faked or
skipped: same command, same stack, same reads as a test that waited for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import select

from fabloop.adapters.store import ApprovalRow, DriftCheckRow
from fabloop.infra.process import free_port
from fabloop.infra.settings import StackEndpoints
from tests.helpers.ingest import query
from tests.helpers.stack import REPO, fabloop, registry_alias, stack_processes

E2E_DIR = Path(__file__).resolve().parents[1] / "e2e"
APPROVER = "alice"
TIMEOUT_S = 2700.0  # `up` (300 s) and `run` (2,400 s), as when the test ran them itself
# `up` then `run`, one shell: the job's own stack, on free loopback ports.
_SCRIPT = """
set -e
"$PY" -m fabloop.cli up --prefect-port "$P1" --mlflow-port "$P2" --kafka-port "$P3"
exec "$PY" -m fabloop.cli run --approve-as "$APPROVER"
"""


@dataclass
class Registry:
    """The drift model's aliases and the champion's lineage tags, as MLflow serves them."""

    champion: str
    previous: str | None
    champion_tags: dict[str, str]


@dataclass
class Down:
    """What ran for the stack before ``fabloop down``, and what was left after it."""

    before: list[str]
    alive_after_wait: list[int]
    left_after: list[int]
    exit_code: int
    output: str
    status_exit_code: int


@dataclass
class Record:
    """Everything the e2e tests assert on; ``error`` says why a part is missing."""

    output: str = ""
    exit_code: int | None = None
    seconds: float = 0.0
    result: dict[str, Any] | None = None
    registry: Registry | None = None
    check: Any = None
    approvals: list[Any] = field(default_factory=list)
    down: Down | None = None
    error: str = ""


class BackgroundMainJob:
    def __init__(self, base: Path) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.home = base / "home"
        self.log = base / "mainjob.log"
        self.started = time.monotonic()
        self.record = Record()
        env = {**os.environ, "FABLOOP_HOME": str(self.home), "COLUMNS": "200", "PY": sys.executable,
               "P1": str(free_port()), "P2": str(free_port()), "P3": str(free_port()), "APPROVER": APPROVER}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(["bash", "-c", _SCRIPT], env=env, cwd=REPO, stdout=out,
                                         stderr=subprocess.STDOUT)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="main-job", daemon=True)
        self._thread.start()

    @property
    def env(self) -> dict[str, str]:
        return {"FABLOOP_HOME": str(self.home)}

    def wait(self, timeout: float = TIMEOUT_S) -> Record:
        """The record, once the job has ended and its stack is down."""
        left = max(1.0, timeout + 120 - (time.monotonic() - self.started))
        if not self._done.wait(left):
            raise AssertionError(f"the main job did not finish within {timeout:.0f}s:\n{self._output()[-6000:]}")
        return self.record

    def stop(self) -> None:
        """End the job if it still runs, and take its stack down (idempotent)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self._done.wait(120)
        fabloop("down", env=self.env, check=False)

    def _output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _follow(self) -> None:
        rec = self.record
        try:
            try:
                rec.exit_code = self.proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rec.error = f"timed out after {TIMEOUT_S:.0f}s"
            rec.seconds = time.monotonic() - self.started
            rec.output = self._output()
            if rec.exit_code == 0:
                self._read_outcome()
        except Exception:  # noqa: BLE001 - recorded for the test to report, never lost in a thread
            rec.error += traceback.format_exc()
        finally:
            try:
                self._take_down()
            except Exception:  # noqa: BLE001 - as above
                rec.error += traceback.format_exc()
            self._done.set()

    def _read_outcome(self) -> None:
        from fabloop.core.names import CHAMPION, PREVIOUS

        rec = self.record
        ep = StackEndpoints.load(self.home)
        rec.result = result = json.loads((ep.home / "mainjob-result.json").read_text())
        model = result["model"]
        # As the job's own service account (not the session stack's, which this process's env holds).
        champion, previous = (registry_alias(ep, model, alias) for alias in (CHAMPION, PREVIOUS))
        if champion is None:
            raise AssertionError(f"{model} has no champion after the main job")
        rec.registry = Registry(champion[0], previous[0] if previous else None, champion[1])
        check_id = int(champion[1].get("fabloop.drift_check_id", "-1"))
        rows = query(ep.database_url, select(DriftCheckRow).where(DriftCheckRow.id == check_id))
        rec.check = rows[0] if rows else None
        rec.approvals = query(ep.database_url, select(ApprovalRow).where(ApprovalRow.model == model))

    def _take_down(self) -> None:
        """``fabloop down`` on the job's stack, with what ran before and what is left after."""
        ours = stack_processes(self.home)
        before = [" ".join(p.info["cmdline"] or []) for p in ours]
        out = fabloop("down", env=self.env, check=False)
        _, alive = psutil.wait_procs(ours, timeout=10)
        time.sleep(0.5)  # nothing respawns what down ended
        left = [p.pid for p in stack_processes(self.home)]
        status = fabloop("status", env=self.env, check=False)
        self.record.down = Down(before, [p.pid for p in alive], left, out.returncode, out.stdout + out.stderr,
                                status.returncode)


_RUNNING: BackgroundMainJob | None = None


def start() -> BackgroundMainJob:
    """Start the main job in a new temporary directory (once per session); the running one otherwise."""
    global _RUNNING
    if _RUNNING is None:
        _RUNNING = BackgroundMainJob(Path(tempfile.mkdtemp(prefix="fabloop-mainjob-")))
    return _RUNNING


def running() -> BackgroundMainJob | None:
    return _RUNNING
