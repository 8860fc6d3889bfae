"""`fabloop up / status / down` against the real components."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from fabloop.adapters.kafka import topic_partitions
from fabloop.adapters.store import current_revision, schema_drift
from fabloop.infra.process import free_port
from fabloop.infra.settings import StackEndpoints
from tests.helpers.stack import RunningStack, fabloop

pytestmark = pytest.mark.integration


def test_up_brings_every_component_to_healthy(stack: RunningStack) -> None:
    assert stack.up_seconds < 90, f"fabloop up took {stack.up_seconds:.1f}s"
    ep = stack.ep
    assert httpx.get(f"{ep.prefect_api_url}/health", timeout=5).json() is True
    assert httpx.get(f"{ep.mlflow_tracking_uri}/health", timeout=5).text.strip() == "OK"
    for topic in ("fab.sensor.readings", "fab.test.results", "fab.deadletter"):
        assert topic_partitions(stack.kafka_conf, topic) == 3
    # A worker is polling the project's process work pool, so deployments can run.
    workers = httpx.post(f"{ep.prefect_api_url}/work_pools/{ep.work_pool}/workers/filter", json={}, timeout=5).json()
    assert any(w["status"] == "ONLINE" for w in workers)


def test_up_brings_the_event_store_to_the_newest_schema(stack: RunningStack) -> None:
    # Applied by `fabloop up` before the worker starts: no flow creates tables at run time.
    assert current_revision(stack.ep.database_url) is not None
    assert schema_drift(stack.ep.database_url) == []


def test_status_reports_each_component(stack: RunningStack) -> None:
    out = fabloop("status", env=stack.env).stdout
    for name in ("kafka", "prefect", "mlflow", "worker"):
        line = next(line for line in out.splitlines() if f" {name} " in line)
        assert "healthy" in line, out
    assert stack.ep.prefect_ui_url in out and stack.ep.mlflow_tracking_uri in out


def test_blocks_point_at_the_embedded_stack(stack: RunningStack) -> None:
    from fabloop.blocks import DEFAULT, FabloopDatabase, KafkaConnection, MLflowServer, ModelCatalog

    assert KafkaConnection.load(DEFAULT).bootstrap_servers == stack.ep.kafka_bootstrap_servers
    assert MLflowServer.load(DEFAULT).tracking_uri == stack.ep.mlflow_tracking_uri
    assert FabloopDatabase.load(DEFAULT).sqlalchemy_url() == stack.ep.database_url
    assert ModelCatalog.load(DEFAULT).models


def test_up_twice_is_harmless(stack: RunningStack) -> None:
    before = {s.split()[0]: s for s in fabloop("status", env=stack.env).stdout.splitlines() if "embedded" in s}
    out = fabloop("up", env=stack.env, timeout=120)
    assert "already running" in out.stdout or "healthy" in out.stdout
    after = {s.split()[0]: s for s in fabloop("status", env=stack.env).stdout.splitlines() if "embedded" in s}
    assert before == after  # same pids, nothing restarted


def test_port_in_use_gives_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        out = fabloop(
            "up", "--prefect-port", str(taken), "--mlflow-port", str(free_port()), "--kafka-port", str(free_port()),
            env={"FABLOOP_HOME": str(tmp_path / "home")}, check=False, timeout=60,
        )
    assert out.returncode != 0
    assert f"port {taken}" in out.stdout + out.stderr and "prefect" in out.stdout + out.stderr
    assert not list((tmp_path / "home" / "run").glob("*.json"))  # nothing was started


def test_stack_json_records_the_endpoints(stack: RunningStack) -> None:
    assert StackEndpoints.load(stack.ep.home) == stack.ep
