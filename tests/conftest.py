"""Fixtures that start the real components on free loopback ports.

Nothing here is faked: ``stack`` runs ``fabloop up`` (broker, Prefect server and
worker, MLflow server) in a temporary FABLOOP_HOME; ``broker`` is a private Tansu
broker per test, so tests that consume from the beginning of a topic see only
their own messages; ``database_url`` is SQLite or a throwaway PostgreSQL cluster.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# Keep the test process's own Prefect state out of the user's ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="fabloop-test-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest

from fabloop.adapters.kafka import broker_healthy, ensure_topics
from fabloop.core.schemas import TOPICS
from fabloop.infra.mlflow_auth import client_env
from fabloop.infra.process import ProcessManager, free_port, wait_until
from fabloop.infra.stack import broker_command
from tests.helpers import mainjob
from tests.helpers.drift import WINDOW_TRIGGER, set_automation
from tests.helpers.promotion import PromotionLauncher, session_launcher
from tests.helpers.stack import Broker, RunningStack, fabloop, start_stack


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The main job's tests run last: the job itself runs beside the rest of the suite (see below)."""
    items.sort(key=lambda item: item.path.is_relative_to(mainjob.E2E_DIR))  # stable: the order stays otherwise


# True when the main job waits for the session's stack to be up before it starts its own.
MAINJOB_AFTER_STACK = pytest.StashKey[bool]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the main job on its own stack as soon as its tests are selected (tests.helpers.mainjob).

    If the session also starts its own stack, the job starts once that stack is up: two
    ``fabloop up`` at the same moment double the start's CPU on a 2-core machine, and
    on a slow one neither stack came up within its limits.
    """
    if session.config.option.collectonly:
        return
    if not any(item.path.is_relative_to(mainjob.E2E_DIR) for item in session.items):
        return
    after_stack = any("stack" in item.fixturenames for item in session.items
                      if not item.path.is_relative_to(mainjob.E2E_DIR))
    session.config.stash[MAINJOB_AFTER_STACK] = after_stack
    if not after_stack:
        mainjob.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Whatever happened to its tests, the main job and its stack end with the session."""
    job = mainjob.running()
    if job is not None:
        job.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[RunningStack]:
    home = tmp_path_factory.mktemp("fabloop-home")
    try:
        running = start_stack(home)
    finally:
        if pytestconfig.stash.get(MAINJOB_AFTER_STACK, False):
            mainjob.start()  # up or not, the main job's tests must have their job
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from fabloop.infra.settings import CLIENT_MAX_RETRIES

    # The embedded MLflow refuses anonymous requests: the tests' MLflow clients (and
    # the processes they start) work as the stack's service account, as fabloop does.
    # The test process is a client of the stack like any other (its in-process flows too).
    client = {PREFECT_API_URL: running.ep.prefect_api_url, PREFECT_CLIENT_MAX_RETRIES: CLIENT_MAX_RETRIES}
    try:
        with pytest.MonkeyPatch.context() as env, temporary_settings(updates=client):
            for name, value in client_env(running.ep).items():
                env.setenv(name, value)
            yield running
    finally:
        fabloop("down", env=running.env, check=False)


@pytest.fixture(scope="session")
def deployments(stack: RunningStack) -> None:
    """prefect.yaml applied to the session's stack, once (``fabloop deploy`` costs tens of seconds).

    Its window trigger is then switched off: a test that wants closed windows checked by
    the deployment switches it on for its own span (``tests.helpers.drift.window_trigger``).
    """
    fabloop("deploy", env=stack.env)
    set_automation(stack, WINDOW_TRIGGER, enabled=False)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A private Kafka-compatible broker with the fabloop topics (3 partitions each)."""
    port = free_port()
    pm = ProcessManager(tmp_path / "broker")
    pm.start("kafka", broker_command("127.0.0.1", port), env=dict(os.environ))
    b = Broker(f"127.0.0.1:{port}")
    wait_until(lambda: broker_healthy(b.conf), 30, what="broker")
    ensure_topics(b.conf, 3, TOPICS)
    yield b
    pm.stop("kafka")


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from fabloop.infra.postgres import PostgresCluster, server_bin_dir

    if server_bin_dir() is None:
        pytest.skip("PostgreSQL server binaries not installed (scripts/system-deps.sh installs them as root)")
    cluster = PostgresCluster.start(free_port())
    yield cluster.url
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The event store on both supported backends: same code path, same assertions."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
        return
    base = request.getfixturevalue("postgres")
    # A fresh database per test so that tests never see each other's events.
    import asyncio

    import asyncpg

    name = f"t{os.getpid()}_{time.monotonic_ns()}"
    port = int(base.rsplit(":", 1)[1].split("/")[0])

    async def create() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="fabloop", database="fabloop")
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()

    asyncio.run(create())
    yield base.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def launcher(stack: RunningStack, deployments: None) -> PromotionLauncher:
    """Starts ``promote`` runs of the session stack's deployment; its worker runs them (tests.helpers.promotion)."""
    return session_launcher(stack)
