"""Start and stop the stack's background processes by pid, and only ours.

Each component runs in its own session (so its children share a process group)
with its output in ``<home>/logs/<name>.log`` and a pid file in
``<home>/run/<name>.json`` recording the pid *and* its start time: a pid that
has since been reused by another program is never signalled. The start time that
identifies it is counted from boot, not read off the wall clock: when the clock is
set (NTP stepping a VM's clock, say), every epoch start time psutil reports moves
with it, and a stack whose processes all still run would look gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil


class PortInUseError(RuntimeError):
    def __init__(self, component: str, host: str, port: int) -> None:
        self.component, self.host, self.port = component, host, port
        super().__init__(
            f"port {port} on {host} is already in use (wanted for {component}); "
            f"stop what holds it or choose another port (e.g. --{component}-port)"
        )


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (for tests and side-by-side stacks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def started_since_boot(pid: int) -> float | None:
    """When ``pid`` started, in seconds since boot (Linux's ``/proc/<pid>/stat``), or None.

    Unlike ``psutil.Process.create_time()`` (boot time + this, in epoch seconds) it
    never moves when the system clock is set.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses; starttime is field 22
    return int(stat.rsplit(b")", 1)[1].split()[19]) / _CLOCK_TICKS


@dataclass(frozen=True)
class PidRecord:
    name: str
    pid: int
    create_time: float  # epoch seconds, for people and for systems without /proc
    cmd: list[str]
    since_boot: float | None = None

    def process(self) -> psutil.Process | None:
        """The live process this record names, or None if it is gone or its pid reused."""
        try:
            proc = psutil.Process(self.pid)
            if not self._same_start(proc):
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.NoSuchProcess:
            return None

    def _same_start(self, proc: psutil.Process) -> bool:
        since_boot = started_since_boot(proc.pid)
        if self.since_boot is not None and since_boot is not None:
            return abs(since_boot - self.since_boot) < 1.5 / _CLOCK_TICKS
        # no /proc, or a record written before since_boot: the epoch start time, which a
        # clock step moves (the old records' exact match turns into a second's slack)
        return abs(proc.create_time() - self.create_time) < 1.0


class ProcessManager:
    """Pid files and logs for the components of one stack home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.run_dir = home / "run"
        self.log_dir = home / "logs"

    def pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def logfile(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def record(self, name: str) -> PidRecord | None:
        path = self.pidfile(name)
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return PidRecord(**data)

    def running(self, name: str) -> psutil.Process | None:
        rec = self.record(name)
        return rec.process() if rec else None

    def start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> PidRecord:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.logfile(name), "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        log.close()
        started = psutil.Process(proc.pid).create_time()
        rec = PidRecord(name=name, pid=proc.pid, create_time=started, cmd=cmd, since_boot=started_since_boot(proc.pid))
        self.pidfile(name).write_text(json.dumps(rec.__dict__))
        return rec

    def tree(self, name: str) -> list[psutil.Process]:
        proc = self.running(name)
        if proc is None:
            return []
        try:
            return [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, name: str, timeout: float = 20.0) -> list[int]:
        """SIGTERM the component and its children, SIGKILL what lingers; returns pids ended."""
        procs = self.tree(name)
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        self.pidfile(name).unlink(missing_ok=True)
        return [p.pid for p in procs]

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.logfile(name)
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_until(check: Callable[[], object], timeout: float, interval: float = 0.25, what: str = "condition") -> None:
    """Poll ``check()`` until it returns truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - health probes fail while starting
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s" + (f" (last error: {last_exc})" if last_exc else ""))


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without its Prefect settings (each stack has its own).

    Prefect's credentials are among them: a component that talks to Prefect gets the
    stack's in ``extra`` (``prefect_env``); the broker and MLflow get none.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(extra)
    return env
