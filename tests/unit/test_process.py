"""Pid records: a component still running is found after the clock is set; a reused pid is not.

Each test starts a real ``sleep`` through ``ProcessManager`` and ends it itself.
A clock step is the one thing faked: psutil's boot time (read from ``/proc/stat``,
which the kernel derives from the wall clock) is moved, as stepping the clock moves it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fabloop.infra.process import ProcessManager, started_since_boot

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[ProcessManager]:
    pm = ProcessManager(tmp_path)
    pm.start("sleeper", ["sleep", "60"], env=dict(os.environ))
    try:
        yield pm
    finally:
        pm.stop("sleeper", timeout=5)


def _step_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    real = psutil._pslinux.boot_time  # type: ignore[attr-defined]
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: real() + seconds)  # type: ignore[attr-defined]


def test_started_since_boot_agrees_with_psutil() -> None:
    me = psutil.Process()
    assert started_since_boot(me.pid) == pytest.approx(me.create_time() - psutil.boot_time(), abs=0.02)
    assert started_since_boot(2**22 + 7) is None  # above pid_max: no such process


@pytest.mark.parametrize("step", [1.0, -1.0, 3600.0])
def test_a_running_component_is_still_found_after_the_clock_is_set(
    sleeper: ProcessManager, monkeypatch: pytest.MonkeyPatch, step: float
) -> None:
    rec = sleeper.record("sleeper")
    assert rec is not None and rec.since_boot is not None
    _step_clock(monkeypatch, step)
    assert psutil.Process(rec.pid).create_time() == pytest.approx(rec.create_time + step, abs=0.02)
    proc = sleeper.running("sleeper")
    assert proc is not None and proc.pid == rec.pid
    assert [p.pid for p in sleeper.tree("sleeper")] == [rec.pid]


def test_a_pid_reused_by_another_process_is_not_ours(sleeper: ProcessManager) -> None:
    rec = sleeper.record("sleeper")
    assert rec is not None and rec.since_boot is not None
    # the same pid, started a second later: what a reused pid looks like
    reused = dataclasses.replace(rec, since_boot=rec.since_boot - 1.0, create_time=rec.create_time - 1.0)
    sleeper.pidfile("sleeper").write_text(json.dumps(dataclasses.asdict(reused)))
    assert sleeper.running("sleeper") is None
    sleeper.pidfile("sleeper").write_text(json.dumps(dataclasses.asdict(rec)))  # the fixture ends it


def test_a_record_written_before_since_boot_is_still_read(sleeper: ProcessManager) -> None:
    path = sleeper.pidfile("sleeper")
    data = json.loads(path.read_text())
    del data["since_boot"]
    path.write_text(json.dumps(data))
    proc = sleeper.running("sleeper")
    assert proc is not None and proc.pid == data["pid"]


def test_a_stopped_component_is_gone(sleeper: ProcessManager) -> None:
    rec = sleeper.record("sleeper")
    assert rec is not None
    assert sleeper.stop("sleeper", timeout=5) == [rec.pid]
    assert sleeper.running("sleeper") is None and sleeper.record("sleeper") is None
