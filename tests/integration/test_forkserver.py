"""The launcher and the fork server as real processes: streams, exit status and signals reach the engine.

A fork server of its own per test (preloading only Prefect's engine, so it starts in
seconds) and real launchers, as the worker starts them (``python -m
fabloop.infra.launcher``). The engines are Prefect's: one given a malformed flow-run
id fails at once; one pointed at an API that accepts connections and never answers
stays alive until it is signalled. The stack's own fork server runs every flow run
of the suite; tests/faults/test_component_outages.py kills a worker under a forked
retraining.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from fabloop.infra.launcher import SOCKET_VAR, ping
from tests.helpers.waiting import wait_for

pytestmark = [pytest.mark.integration]


@dataclass
class Server:
    socket: Path
    process: subprocess.Popen[bytes]

    def engines(self) -> dict[int, str]:
        answer = ping(str(self.socket))
        assert answer is not None, "the fork server does not answer"
        return {int(pid): run for pid, run in answer["engines"].items()}

    def forked(self) -> int:
        answer = ping(str(self.socket))
        assert answer is not None
        return int(answer["forked"])


@pytest.fixture
def code(tmp_path: Path) -> Path:
    """A folder of code the test's fork server watches, as the stack's watches fabloop's."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "module.py").write_text("VALUE = 1\n")
    return folder


@pytest.fixture
def server(tmp_path: Path, code: Path) -> Iterator[Server]:
    path = tmp_path / "fs" / "engine.sock"
    log = (tmp_path / "forkserver.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "fabloop.infra.forkserver", "--socket", str(path),
                             "--preload", "prefect.engine", "--watch", str(code)], stdout=log, stderr=subprocess.STDOUT)
    stopped_here = False
    try:
        wait_for("the fork server answering", lambda: ping(str(path)) is not None, timeout=60, interval=0.2)
        yield Server(path, proc)
    finally:
        if proc.poll() is None:
            proc.terminate()
            stopped_here = proc.wait(timeout=20) == 0
        log.close()
    if stopped_here:
        assert not path.exists(), "the fork server left its socket behind when stopped"


@pytest.fixture
def silent_api() -> Iterator[str]:
    """An API URL whose server accepts connections and never answers: an engine waits on it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/api"


def _launch(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "fabloop.infra.launcher", *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _engine_of(server: Server, flow_run_id: str) -> int:
    found: list[int] = []

    def forked() -> bool:
        found[:] = [pid for pid, run in server.engines().items() if run == flow_run_id]
        return bool(found)

    wait_for(f"an engine for {flow_run_id}", forked, timeout=20, interval=0.1)
    return found[0]


def test_without_a_fork_server_the_launcher_becomes_the_engine(tmp_path: Path) -> None:
    proc = _launch(["not-a-uuid"], {SOCKET_VAR: str(tmp_path / "nobody.sock")})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (out, err)
    assert b"Invalid flow run id" in err, err


def test_an_engine_forked_for_a_launcher_writes_to_its_streams_and_exits_as_it_does(server: Server) -> None:
    proc = _launch(["not-a-uuid"], {SOCKET_VAR: str(server.socket)})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, (out, err)
    assert b"Invalid flow run id. Received arguments:" in err and b"not-a-uuid" in err, err
    assert server.forked() == 1
    assert server.engines() == {}, "the ended engine is still counted"


def test_the_workers_sigterm_reaches_the_engine_and_the_launcher_ends_by_it(server: Server, silent_api: str) -> None:
    flow_run_id = str(uuid.uuid4())
    proc = _launch([], {SOCKET_VAR: str(server.socket), "PREFECT_API_URL": silent_api,
                        "PREFECT__FLOW_RUN_ID": flow_run_id})
    engine = _engine_of(server, flow_run_id)
    assert engine != proc.pid
    assert psutil.Process(engine).ppid() == server.process.pid
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM
    wait_for("the engine ended", lambda: not psutil.pid_exists(engine), timeout=10, interval=0.1)
    assert server.engines() == {}


def test_a_launcher_killed_outright_takes_its_engine_with_it(server: Server, silent_api: str) -> None:
    flow_run_id = str(uuid.uuid4())
    proc = _launch([], {SOCKET_VAR: str(server.socket), "PREFECT_API_URL": silent_api,
                        "PREFECT__FLOW_RUN_ID": flow_run_id})
    engine = _engine_of(server, flow_run_id)
    proc.kill()
    proc.wait(timeout=10)
    wait_for("the engine killed with its launcher", lambda: not psutil.pid_exists(engine), timeout=10, interval=0.1)
    assert server.engines() == {}
    assert server.process.poll() is None, "the fork server died with an engine"


def test_with_its_fork_server_killed_a_launcher_waits_for_its_engine_and_the_next_starts_cold(
    server: Server, silent_api: str, tmp_path: Path
) -> None:
    flow_run_id = str(uuid.uuid4())
    proc = _launch([], {SOCKET_VAR: str(server.socket), "PREFECT_API_URL": silent_api,
                        "PREFECT__FLOW_RUN_ID": flow_run_id})
    engine = _engine_of(server, flow_run_id)
    server.process.kill()
    server.process.wait(timeout=10)
    assert psutil.pid_exists(engine), "the engine died with the fork server"
    assert proc.poll() is None, "the launcher ended while its engine runs"
    proc.send_signal(signal.SIGTERM)  # still passed on to the orphaned engine
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and b"fork server lost" in err, err
    wait_for("the orphaned engine ended", lambda: not psutil.pid_exists(engine), timeout=10, interval=0.1)
    cold = _launch(["not-a-uuid"], {SOCKET_VAR: str(server.socket)})
    _, err = cold.communicate(timeout=120)
    assert cold.returncode == 1 and b"Invalid flow run id" in err, err


def test_after_its_code_changes_the_fork_server_starts_engines_cold_then_imports_the_new_code(
    server: Server, code: Path
) -> None:
    first = _launch(["not-a-uuid"], {SOCKET_VAR: str(server.socket)})
    first.communicate(timeout=60)
    assert server.forked() == 1
    before = ping(str(server.socket))
    assert before is not None
    time.sleep(0.05)  # a modification time the fork server's start cannot share
    (code / "module.py").write_text("VALUE = 2\n")
    stale = _launch(["not-a-uuid"], {SOCKET_VAR: str(server.socket)})
    _, err = stale.communicate(timeout=120)
    assert stale.returncode == 1 and b"changed since the fork server started" in err, err
    assert b"Invalid flow run id" in err, err  # the engine ran, in the launcher's own process

    def restarted() -> bool:  # the same process, started again: nothing forked yet
        answer = ping(str(server.socket))
        return answer is not None and answer["forked"] == 0

    wait_for("the fork server started again", restarted, timeout=60, interval=0.2)
    assert ping(str(server.socket))["pid"] == before["pid"] == server.process.pid  # type: ignore[index]
    again = _launch(["not-a-uuid"], {SOCKET_VAR: str(server.socket)})
    _, err = again.communicate(timeout=60)
    assert again.returncode == 1 and b"changed since" not in err, err
    assert server.forked() == 1
