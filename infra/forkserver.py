"""The stack's fork server: flow-run engines forked from a process that has imported them already.

Every run of Prefect's process worker is a new Python process, and importing Prefect,
pandas, Evidently, MLflow, LightGBM and Optuna costs seconds before a flow's first
line: a drift check or a retraining would wait on its imports each time. This server
imports them once (``PRELOAD``) and then, for each ``fabloop.infra.launcher`` that
connects, forks a child that takes over the launcher's standard streams, working
directory, environment and arguments and runs ``prefect.engine`` as the launcher
would have. Each run still has a process of its own (its memory is returned when it
ends); only the imports are shared, copy-on-write.

The worker, its deployments, triggers and the UI are Prefect's own: the launcher is
the flow run's ``command`` job variable (prefect.yaml) and the run's process for the
worker. The server stays single-threaded (fork of a threaded process is unsafe) and
talks to nobody but launchers of the same user, on a Unix socket in a private
directory.

    python -m fabloop.infra.forkserver --socket PATH
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import os
import runpy
import selectors
import signal
import socket
import struct
import sys
import sysconfig
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fabloop.infra.launcher import ENGINE_MODULE, STREAMS, ProtocolError, recv_message, send_message

PRELOAD = (
    ENGINE_MODULE,
    "prefect.flow_engine",
    "prefect.deployments.steps",
    "fabloop.flows.drift_check",
    "fabloop.flows.retrain",
    "fabloop.flows.promote",
    "fabloop.flows.promotion_timeout",
    "fabloop.flows.ingest",
    # What the flows import inside their bodies.
    "fabloop.core.calibration",
    "fabloop.core.stats",
    "fabloop.core.training",
    "fabloop.core.tuning",
    "evidently",
    "evidently.presets",
    "evidently.legacy.calculations.stattests",
    "lightgbm",
    "optuna",
    "mlflow.lightgbm",
    "mlflow.pyfunc",
    "sklearn.metrics",
    "scipy.stats",
    "matplotlib.figure",
    "orjson",
)
"""Modules imported before the first fork: the flows and what their bodies import."""

_POLL_SECONDS = 0.1
_PACKAGE_DIR = Path(__file__).resolve().parents[1] / "fabloop"
_REQUEST_TIMEOUT = 5.0


@dataclass
class EngineRequest:
    """What a launcher hands over: its arguments, working directory, environment and streams."""

    argv: list[str]
    cwd: str
    env: dict[str, str]
    fds: list[int] = field(default_factory=list)


@dataclass
class Engine:
    """A forked engine's launcher connection (told the exit status) and the flow run it runs."""

    launcher: socket.socket
    flow_run_id: str


def preload(modules: Sequence[str] = PRELOAD) -> list[str]:
    """Import ``modules``; returns those that could not be imported (named in the log, not fatal)."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            print(f"fork server: not preloaded {name}: {exc}", file=sys.stderr, flush=True)
            missing.append(name)
    return missing


def watched_dirs() -> list[Path]:
    """What the preloaded code comes from: fabloop's package (its folders included) and the installed libraries."""
    return [_PACKAGE_DIR, Path(sysconfig.get_paths()["purelib"])]


def code_fingerprint(dirs: Sequence[Path]) -> tuple[int, int]:
    """The newest modification time and the number of Python files under ``dirs`` and of the dirs themselves.

    A library installed or removed changes its parent folder; an edited module, its file.
    """
    newest, count = 0, 0
    for root in dirs:
        if not root.exists():
            continue
        newest = max(newest, root.stat().st_mtime_ns)
        if root.name in ("site-packages", "dist-packages"):
            continue  # its own modification time says a library came or went; its files are too many to stat
        for folder, _subdirs, files in os.walk(root, followlinks=True):
            for name in files:
                if name.endswith(".py"):
                    newest = max(newest, os.stat(os.path.join(folder, name)).st_mtime_ns)
                    count += 1
    return newest, count


def private_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, in a directory only this user can enter."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    path.chmod(0o600)
    listener.listen(64)
    listener.setblocking(False)
    return listener


def _same_user(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def _refuse(conn: socket.socket, fds: Sequence[int], answer: dict[str, str]) -> None:
    """Fork nothing: let the passed streams go and tell the launcher why (it starts the engine itself)."""
    _close_all(fds)
    with conn:
        send_message(conn, answer)


class ForkServer:
    """Accepts launchers, forks one engine per request, and tells each launcher how its engine ended."""

    def __init__(self, listener: socket.socket, missing: list[str], watched: Sequence[Path] = ()) -> None:
        self.listener = listener
        self.missing = missing
        self.watched = list(watched)
        self.fingerprint = code_fingerprint(self.watched)
        self.stale = False
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ)
        self.engines: dict[int, Engine] = {}  # by pid
        self.forked = 0
        self.stopping = False

    def serve(self) -> EngineRequest | None:
        """Serve until stopped or stale and idle (None); in a forked child, return that child's request instead."""
        while not self.stopping and not (self.stale and not self.engines):
            for key, _ in self.selector.select(timeout=_POLL_SECONDS):
                if key.fileobj is self.listener:
                    request = self._accept()
                    if request is not None:
                        return request  # this is the forked child
                else:
                    self._launcher_readable(key.data)
            self._reap()
        return None

    def _accept(self) -> EngineRequest | None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return None
        conn.settimeout(_REQUEST_TIMEOUT)
        try:
            if not _same_user(conn):
                conn.close()
                return None
            message, fds = recv_message(conn, max_fds=len(STREAMS))
        except (OSError, ProtocolError, ValueError) as exc:
            print(f"fork server: dropped a request ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
            conn.close()
            return None
        if message.get("ping"):
            with conn:
                send_message(conn, {"pid": os.getpid(), "forked": self.forked, "missing": self.missing,
                                    "engines": {str(pid): e.flow_run_id for pid, e in self.engines.items()}})
            return None
        if len(fds) != len(STREAMS):
            _refuse(conn, fds, {"error": f"expected {len(STREAMS)} standard streams, got {len(fds)}"})
            return None
        if self.stale or code_fingerprint(self.watched) != self.fingerprint:
            # An engine forked now would run the code as it was at this server's start.
            self.stale = True
            _refuse(conn, fds, {"cold": "fabloop's code or libraries changed since the fork server started"})
            return None
        request = EngineRequest(argv=[str(a) for a in message.get("argv", [])], cwd=str(message["cwd"]),
                                env={str(k): str(v) for k, v in message["env"].items()}, fds=fds)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._close_in_child(conn)
            return request
        _close_all(fds)  # the child has them now
        conn.settimeout(None)
        try:
            send_message(conn, {"pid": pid})
        except OSError:
            os.kill(pid, signal.SIGKILL)  # its launcher is gone already: nobody would wait for it
        self.forked += 1
        self.engines[pid] = Engine(conn, request.env.get("PREFECT__FLOW_RUN_ID", ""))
        self.selector.register(conn, selectors.EVENT_READ, pid)
        return None

    def _close_in_child(self, conn: socket.socket) -> None:
        self.selector.close()
        self.listener.close()
        conn.close()
        for other in self.engines.values():
            other.launcher.close()
        self.engines.clear()

    def _launcher_readable(self, pid: int) -> None:
        """A launcher sends nothing after its request: readable means it is gone, and its engine goes too."""
        engine = self.engines.get(pid)
        if engine is None:
            return
        try:
            data = engine.launcher.recv(1)
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(engine.launcher)
            engine.launcher.close()
            del self.engines[pid]
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            else:
                print(f"fork server: launcher of engine {pid} is gone; killed the engine", file=sys.stderr,
                      flush=True)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            engine = self.engines.pop(pid, None)
            if engine is None:
                continue
            self.selector.unregister(engine.launcher)
            with engine.launcher, contextlib.suppress(OSError):  # a launcher killed meanwhile has no one to tell
                send_message(engine.launcher, {"exit": os.waitstatus_to_exitcode(status)})

    def stop(self, *_: object) -> None:
        self.stopping = True


def become_engine(request: EngineRequest) -> None:
    """In the forked child: take over the launcher's streams, place and environment, then run the engine."""
    for target, fd in zip(STREAMS, request.fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.env)
    # Prefect read its settings from the server's environment at import; the run's
    # own (its deployment's env, PREFECT__FLOW_RUN_ID, the control channel) win now.
    import prefect.context

    prefect.context.refresh_global_settings_context()
    gc.enable()
    engine = importlib.util.find_spec(ENGINE_MODULE)
    assert engine is not None and engine.origin is not None
    sys.argv = [engine.origin, *request.argv]
    runpy.run_path(engine.origin, run_name="__main__")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fabloop.infra.forkserver", description=__doc__.split("\n")[0])
    parser.add_argument("--socket", required=True, type=Path, help="where to listen (a Unix socket path)")
    parser.add_argument("--preload", action="append", metavar="MODULE",
                        help="a module to import before the first fork (repeatable; default: PRELOAD)")
    parser.add_argument("--watch", action="append", type=Path, metavar="DIR",
                        help="a folder whose code the engines run (repeatable; default: fabloop's and the libraries')")
    args = parser.parse_args(argv)
    modules = tuple(args.preload or PRELOAD)
    # Copy-on-write sharing survives only if the collector leaves the preloaded objects alone.
    gc.disable()
    started = time.monotonic()
    missing = preload(modules)
    gc.freeze()
    threads = len(os.listdir("/proc/self/task")) if Path("/proc/self/task").exists() else threading.active_count()
    listener = private_socket(args.socket)
    server = ForkServer(listener, missing, args.watch or watched_dirs())
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    print(f"fork server: {len(modules) - len(missing)} modules preloaded in {time.monotonic() - started:.1f} s "
          f"({threads} threads); listening on {args.socket}", file=sys.stderr, flush=True)
    request = server.serve()
    if request is not None:
        become_engine(request)
        return
    listener.close()
    args.socket.unlink(missing_ok=True)
    if server.stale and not server.stopping:
        # Its engines have ended: start again, same pid, importing the code as it is now.
        print("fork server: code changed; starting again to import it", file=sys.stderr, flush=True)
        os.execv(sys.executable, [sys.executable, "-m", "fabloop.infra.forkserver", *(argv or sys.argv[1:])])


if __name__ == "__main__":
    main()
