"""Faults on real processes: stop, kill and restart a component of a running stack.

A fault test takes a component of the session's stack down (gracefully or with
SIGKILL), does its work while the component is gone, and brings it back with
``fabloop up``, which starts only what is not running and waits until it is
healthy. ``outage`` always brings the component back, even when the test fails,
so the tests after it find the stack whole.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import psutil

from fabloop.infra.process import ProcessManager
from tests.helpers.stack import RunningStack, fabloop

COMPONENTS = ("kafka", "prefect", "mlflow", "worker")


def stop(stack: RunningStack, name: str) -> list[int]:
    """SIGTERM the component (and its children), as an operator or a host shutdown would."""
    assert name in COMPONENTS, name
    pids = ProcessManager(stack.ep.home).stop(name)
    assert pids, f"{name} was not running"
    return pids


def kill(stack: RunningStack, name: str) -> list[int]:
    """SIGKILL the component and everything it started (flow-run processes included): a crash."""
    assert name in COMPONENTS, name
    procs = ProcessManager(stack.ep.home).tree(name)
    assert procs, f"{name} was not running"
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=10)
    return [p.pid for p in procs]


def restart(stack: RunningStack) -> None:
    """Start again whatever is not running (``fabloop up`` is idempotent) and wait until healthy."""
    fabloop("up", env=stack.env, timeout=240)


@contextlib.contextmanager
def outage(stack: RunningStack, name: str, *, hard: bool = False) -> Iterator[list[int]]:
    """``name`` is down inside the block (SIGKILL if ``hard``) and back up after it."""
    pids = kill(stack, name) if hard else stop(stack, name)
    try:
        yield pids
    finally:
        restart(stack)
