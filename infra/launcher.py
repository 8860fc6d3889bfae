"""One flow run's process: its engine forked by the stack's fork server, else ``python -m prefect.engine``.

The process worker runs ``python -m fabloop.infra.launcher`` as each flow run's
command (prefect.yaml). When ``FABLOOP_FORKSERVER_SOCKET`` names a fork server that
answers (``fabloop.infra.forkserver``), the launcher hands it this process's standard
streams, working directory, environment and arguments; the server forks an engine
that has Prefect, the flows and their libraries imported already. The launcher stays
the run's process for the worker (its infrastructure pid): it passes the worker's
signals on to the engine and exits as the engine exited; killed outright, its engine
is killed with it. Without a fork server it becomes the usual engine process.

Standard library only, and nothing of fabloop imported: it must start in milliseconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

SOCKET_VAR = "FABLOOP_FORKSERVER_SOCKET"
"""The fork server's Unix socket, set in the worker's environment (and so in every flow run's)."""

ENGINE_MODULE = "prefect.engine"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STREAMS = (0, 1, 2)

_HEADER = struct.Struct("!I")
_MAX_MESSAGE = 8 * 1024 * 1024


class ProtocolError(RuntimeError):
    """The other end closed or sent something that is not a message."""


def send_message(sock: socket.socket, payload: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """One length-prefixed JSON message, with ``fds`` passed alongside (SCM_RIGHTS)."""
    body = json.dumps(payload).encode()
    data = _HEADER.pack(len(body)) + body
    sent = socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def recv_message(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
    """One message and the descriptors that came with it; ``ProtocolError`` at end of stream."""
    if max_fds:
        data, fds, _, _ = socket.recv_fds(sock, 65536, max_fds)
    else:
        data, fds = sock.recv(65536), []
    if not data:
        raise ProtocolError("connection closed")
    while len(data) < _HEADER.size:
        data += _recv_more(sock)
    (size,) = _HEADER.unpack_from(data)
    if size > _MAX_MESSAGE:
        raise ProtocolError("message too large")
    while len(data) < _HEADER.size + size:
        data += _recv_more(sock)
    payload = json.loads(data[_HEADER.size:_HEADER.size + size])
    if not isinstance(payload, dict):
        raise ProtocolError("message is not an object")
    return payload, list(fds)


def _recv_more(sock: socket.socket) -> bytes:
    more = sock.recv(65536)
    if not more:
        raise ProtocolError("connection closed mid-message")
    return more


def connect(path: str, timeout: float = 2.0) -> socket.socket | None:
    """A connection to the fork server at ``path``, or None if none listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


def ping(path: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """The fork server's answer to a ping (its pid and what it has imported), or None."""
    sock = connect(path, timeout)
    if sock is None:
        return None
    with sock:
        try:
            send_message(sock, {"ping": True})
            return recv_message(sock)[0]
        except (OSError, ProtocolError, ValueError):
            return None


def _exec_engine(args: Sequence[str]) -> NoReturn:
    os.execv(sys.executable, [sys.executable, "-m", ENGINE_MODULE, *args])


def _start_here(sock: socket.socket, args: Sequence[str], why: str) -> NoReturn:
    print(f"fabloop launcher: {why}; starting the engine in this process", file=sys.stderr, flush=True)
    sock.close()
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    _exec_engine(args)


def _exit_like(code: int) -> int:
    """Exit with ``code``; a negative code is the signal that ended the engine, raised again here."""
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        time.sleep(1)  # the signal ends us; this line is not reached for a deadly one
        return 128 - code
    return code


def _wait_orphan(pid: int) -> int:
    """The server went away before the engine ended: wait for the engine by its pid."""
    print(f"fabloop launcher: fork server lost; waiting for engine pid {pid}", file=sys.stderr, flush=True)
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"fabloop launcher: engine pid {pid} ended; its exit status is unknown", file=sys.stderr,
                  flush=True)
            return 1
        time.sleep(0.5)


def run(args: Sequence[str]) -> int:
    """Run the engine for ``args`` in a forked process if a fork server answers, else exec it here."""
    path = os.environ.get(SOCKET_VAR)
    sock = connect(path) if path else None
    if sock is None:
        _exec_engine(args)
    engine_pid: list[int] = []
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if engine_pid:
            os.kill(engine_pid[0], signum)
        else:
            pending.append(signum)

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    try:
        send_message(sock, {"argv": list(args), "cwd": os.getcwd(), "env": dict(os.environ)}, STREAMS)
        started, _ = recv_message(sock)
    except (OSError, ProtocolError) as exc:
        # Nothing was forked (or the server cannot say it was): the engine starts here instead.
        _start_here(sock, args, f"fork server at {path} did not start the engine ({exc})")
    if "cold" in started or "error" in started:
        _start_here(sock, args, started.get("cold") or f"fork server refused: {started['error']}")
    engine_pid.append(int(started["pid"]))
    for early in pending:
        os.kill(engine_pid[0], early)
    sock.settimeout(None)
    try:
        ended, _ = recv_message(sock)
    except (OSError, ProtocolError):
        return _wait_orphan(engine_pid[0])
    return _exit_like(int(ended["exit"]))


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
