"""Reads of the real Prefect server's REST API (what the UI shows), shared by the tests."""

from __future__ import annotations

import functools
import time
from datetime import datetime
from typing import Any

from prefect.client.base import PrefectHttpxSyncClient

from tests.helpers.stack import RunningStack

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def api(stack: RunningStack, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One call to the stack's Prefect API through Prefect's own HTTP client.

    The embedded server answers 503 while its SQLite database is locked by another
    write; like every Prefect client of the stack, the tests retry that
    (``PREFECT_CLIENT_MAX_RETRIES``, with back-off) instead of failing on it.
    """
    resp = _client(stack.ep.prefect_api_url, stack.prefect_auth).request(method, path, json=body)
    return resp.json() if resp.content else None


@functools.lru_cache(maxsize=8)
def _client(base_url: str, auth: tuple[str, str] | None) -> PrefectHttpxSyncClient:
    """One client per stack for the whole session: each new client builds an SSL context
    (reading the CA bundle), and tests that poll a state several times a second would
    spend much of a core on that beside the stack they test."""
    return PrefectHttpxSyncClient(base_url=base_url, timeout=20, auth=auth)


def flow_run(stack: RunningStack, flow_run_id: str) -> dict[str, Any]:
    return api(stack, "GET", f"/flow_runs/{flow_run_id}")


def deployment_id(stack: RunningStack, flow: str, name: str) -> str:
    return api(stack, "GET", f"/deployments/name/{flow}/{name}")["id"]


def runs_of_flow(stack: RunningStack, flow_name: str, since: datetime) -> list[dict[str, Any]]:
    """Every run of flow ``flow_name`` created since ``since`` (deployment runs and in-process ones)."""
    body = {"flows": {"name": {"any_": [flow_name]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 200}
    runs = api(stack, "POST", "/flow_runs/filter", body)
    return [r for r in runs if datetime.fromisoformat(r["created"]) >= since]


def parent_flow_run_id(stack: RunningStack, run: dict[str, Any]) -> str | None:
    """The flow run that started ``run`` as a subflow (through its parent task run)."""
    if not run.get("parent_task_run_id"):
        return None
    return api(stack, "GET", f"/task_runs/{run['parent_task_run_id']}")["flow_run_id"]


def artifacts_of(stack: RunningStack, flow_run_id: str) -> list[dict[str, Any]]:
    return api(stack, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})


def wait_final(stack: RunningStack, flow_run_id: str, timeout: float, interval: float = 2.0) -> dict[str, Any]:
    """The flow run once its state is final; AssertionError naming its state after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        run = flow_run(stack, flow_run_id)
        if run["state_type"] in FINAL:
            return run
        if time.monotonic() > deadline:
            raise AssertionError(
                f"flow run {run['name']} ({flow_run_id}) still {run['state_name']} after {timeout:.0f}s"
            )
        time.sleep(interval)


