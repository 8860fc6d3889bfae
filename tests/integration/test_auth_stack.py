"""``fabloop up --auth``: the embedded Prefect server checks basic auth, and every client fabloop
starts or is carries the stack's credential: health checks, the worker and its flow runs,
``prefect deploy``, the CLI's decisions. A request without it, or with a wrong one, is refused.

One stack of its own (the session's stack runs without auth), taken down at the end.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from fabloop.infra.bootstrap import prefect_api
from fabloop.infra.mlflow_auth import client_env
from fabloop.infra.prefect_auth import CLIENT_VAR, SERVER_VAR, auth_file
from fabloop.mainjob import _ensure_ingest_running
from tests.helpers import prefect_api as api
from tests.helpers.ingest import wait_for_rows
from tests.helpers.promotion import register, save_policy, start_deployment_run, tiny_model_uris, unique_model
from tests.helpers.stack import RunningStack, fabloop, registry_alias, stack_processes, start_stack
from tests.helpers.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def auth_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    home = tmp_path_factory.mktemp("fabloop-auth-home")
    running = start_stack(home, partitions=1, auth=True)
    # This module's MLflow clients work as this stack's service account; the session's
    # account (if the session stack is up) is put back afterwards.
    try:
        with pytest.MonkeyPatch.context() as env:
            for name, value in client_env(running.ep).items():
                env.setenv(name, value)
            yield running
    finally:
        fabloop("down", env=running.env, check=False)


@pytest.fixture(scope="module")
def deployed(auth_stack: RunningStack) -> RunningStack:
    """``fabloop deploy`` with auth on (the CLI, as an engineer runs it)."""
    fabloop("deploy", env=auth_stack.env)
    return auth_stack


def _environ(home: Path, component: str) -> dict[str, str]:
    """The environment of the stack's ``component`` process (its pid as ``fabloop up`` recorded it)."""
    pid = json.loads((home / "run" / f"{component}.json").read_text())["pid"]
    return psutil.Process(pid).environ()


def test_only_the_stacks_credential_opens_the_api_and_it_stays_out_of_stack_json(auth_stack: RunningStack) -> None:
    ep = auth_stack.ep
    credential = auth_file(ep.home).read_text()
    assert stat.S_IMODE(auth_file(ep.home).stat().st_mode) == 0o600
    assert credential not in (ep.home / "stack.json").read_text()
    user, _, password = credential.partition(":")
    url = f"{ep.prefect_api_url}/flows/filter"
    assert httpx.post(url, json={}, timeout=10).status_code == 401
    assert httpx.post(url, json={}, auth=(user, password + "x"), timeout=10).status_code == 401
    assert httpx.post(url, json={}, auth=(user, password), timeout=10).status_code == 200
    # The server checks the credential, the worker (and so its flow runs) carries it; the
    # broker and MLflow never see it.
    assert _environ(ep.home, "prefect").get(SERVER_VAR) == credential
    assert _environ(ep.home, "worker").get(CLIENT_VAR) == credential
    for component in ("kafka", "mlflow"):
        leaked = {k for k in _environ(ep.home, component) if k.startswith("PREFECT_") and "AUTH" in k}
        assert not leaked, f"{component} got {leaked}"
    assert stack_processes(ep.home), "the stack's processes are not found by their home"


def test_status_deploy_a_worker_run_and_a_cli_decision_work_with_auth_on(deployed: RunningStack) -> None:
    auth_stack = deployed
    ep, env = auth_stack.ep, auth_stack.env
    status = fabloop("status", env=env)
    assert "basic auth on" in status.stdout
    names = {d["name"] for d in api.api(auth_stack, "POST", "/deployments/filter", {})}
    assert {"ingest", "drift-check", "retrain", "promote"} <= names

    # A promotion started from its deployment runs in a worker process, talks to the API
    # (blocks, pause, form) and waits; the engineer decides from the CLI.
    model = unique_model("auth")
    versions = register(ep.mlflow_tracking_uri, model, tiny_model_uris(ep.mlflow_tracking_uri)[:2],
                        aliases={"champion": 0, "challenger": 1})
    with prefect_api(ep):
        policy = save_policy(f"auth-{model}", approvers=["alice"])
    run_id = start_deployment_run(auth_stack, {
        "model": model, "challenger_version": versions[1], "policy_block": policy,
        "reasons": ["test"], "metrics": {}, "links": {}, "trigger": {},
    })
    wait_for("the promotion to pause", lambda: api.flow_run(auth_stack, run_id)["state_type"] == "PAUSED" or None,
             timeout=180)
    fabloop("approve", model, "--version", versions[1], "--as", "alice", "--comment", "with auth on", env=env)
    final = api.wait_final(auth_stack, run_id, timeout=120)
    assert final["state_type"] == "COMPLETED", final["state"]
    champion = registry_alias(ep, model, "champion")
    assert champion is not None and champion[0] == versions[1]

    # A client holding a wrong credential (here: the CLI, after the secrets file changed
    # under a running server) is refused, and says so instead of printing a traceback.
    real = auth_file(ep.home).read_text()
    try:
        auth_file(ep.home).write_text("fabloop:wrong")
        refused = fabloop("approvals", env=env, check=False)
    finally:
        auth_file(ep.home).write_text(real)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "refused this client's credential (401)" in refused.stdout, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr


def test_the_main_jobs_stream_steps_run_with_auth_on(deployed: RunningStack) -> None:
    """What ``fabloop run`` does before any decision: publish with the Kafka block (read from
    the API), start the ingest deployment, store events from a worker's flow run, close
    windows (events into Prefect's feed), and let the window trigger start drift checks
    that complete and ask for the first trainings."""
    auth_stack = deployed
    ep, env = auth_stack.ep, auth_stack.env
    since = datetime.now(UTC)
    published = fabloop("simulate", "--wafers", "650", "--sensors", "8", "--seed", "11", env=env)
    assert "published" in published.stdout and "(0 failed)" in published.stdout, published.stdout
    with prefect_api(ep):
        ingest_run = _ensure_ingest_running()
    # The simulator spreads 650 wafers over its tools: every tool's first 200-wafer window closes.
    assert wait_for_rows(ep.database_url, at_least=1300, timeout=240) >= 1300  # a reading and a result per wafer
    assert api.flow_run(auth_stack, ingest_run)["state_type"] == "RUNNING"

    def drift_checks_done() -> list[dict[str, Any]] | None:
        runs = api.runs_of_flow(auth_stack, "drift-check", since)
        done = [r for r in runs if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")]
        return done if done and len(done) == len(runs) else None

    checks = wait_for("the window trigger's drift checks to finish", drift_checks_done, timeout=300, interval=3)
    assert {r["state_type"] for r in checks} == {"COMPLETED"}, [(r["name"], r["state"]["message"]) for r in checks]
    # No champion yet: each check asked for a first training, started as a deployment run.
    wait_for("a first training to be started", lambda: api.runs_of_flow(auth_stack, "retrain", since) or None,
             timeout=120, interval=3)
