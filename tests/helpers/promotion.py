"""Shared by the promotion tests: tiny real models, suspended ``promote`` runs, queries.

Everything talks to the session's real stack: models are logged to and registered
in its MLflow server, ``promote`` runs as a real run of its deployment, executed by
the stack's worker, and suspends on the real Prefect server (no process while it
waits); outcomes are read back from the registry, the approvals table and the
Prefect events API.

The ``launcher`` fixture (tests/conftest.py) hands out the session's launcher.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any

import psutil

from tests.helpers import prefect_api
from tests.helpers.prefect_api import FINAL, wait_final
from tests.helpers.stack import RunningStack

METRICS = {
    "champion": {"roc_auc": 0.8123, "pr_auc": 0.4410, "recall_at_op": 0.7000},
    "challenger": {"roc_auc": 0.8617, "pr_auc": 0.5032, "recall_at_op": 0.7500},
}


def unique_model(prefix: str) -> str:
    return f"test-{prefix}-{uuid.uuid4().hex[:8]}"


def log_tiny_models(tracking_uri: str, count: int) -> list[str]:
    """Log ``count`` small fitted LogisticRegression models; returns their model URIs."""
    import mlflow
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("fabloop-test-promotion")
    rng = np.random.default_rng(11)
    uris = []
    for i in range(count):
        x = rng.normal(size=(200, 4))
        y = (x[:, 0] + 0.5 * i * x[:, 1] + rng.normal(size=200) > 0).astype(int)
        with mlflow.start_run(run_name=f"tiny-{i}"):
            mlflow.log_metric("roc_auc", 0.8 + i / 100)
            info = mlflow.sklearn.log_model(
                LogisticRegression().fit(x, y), name="model", pip_requirements=["scikit-learn"]
            )
        uris.append(info.model_uri)
    return uris


@cache
def tiny_model_uris(tracking_uri: str) -> list[str]:
    """Three tiny models per stack, logged once per test session and registered by each test."""
    return log_tiny_models(tracking_uri, 3)


def register(tracking_uri: str, model: str, uris: list[str], aliases: dict[str, int] | None = None) -> list[str]:
    """Register each logged model as a version of ``model``; ``aliases`` maps alias -> index of a version."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.create_registered_model(model)
    versions = []
    for uri in uris:
        logged = client.get_logged_model(uri.removeprefix("models:/"))
        mv = client.create_model_version(
            model, logged.artifact_location, run_id=logged.source_run_id, model_id=logged.model_id
        )
        versions.append(str(mv.version))
    for alias_name, index in (aliases or {}).items():
        client.set_registered_model_alias(model, alias_name, versions[index])
    return versions


def save_policy(name: str, approvers: list[str], timeout_seconds: int = 600, poll_seconds: int = 1) -> str:
    from fabloop.blocks import ApprovalPolicy

    ApprovalPolicy(approvers=approvers, timeout_seconds=timeout_seconds, poll_seconds=poll_seconds).save(
        name, overwrite=True
    )
    return name


class PromotionLauncher:
    """Starts ``promote`` flow runs of the stack's ``promote`` deployment, as a retraining does.

    Only a top-level run of a deployment can suspend; the worker runs each one (and
    runs it again after every resume), so a promotion here is what production runs.
    """

    def __init__(self, stack: RunningStack) -> None:
        self.stack = stack
        self.started: list[str] = []

    def output(self, flow_run_id: str | None = None) -> str:
        """The Prefect logs of the runs started here (of one run if given): for failure messages."""
        ids = [flow_run_id] if flow_run_id else self.started[-5:]
        if not ids:
            return ""
        body = {"logs": {"flow_run_id": {"any_": ids}}, "sort": "TIMESTAMP_ASC", "limit": 200}
        logs = prefect_api.api(self.stack, "POST", "/logs/filter", body) or []
        return "\n".join(f"{log['timestamp']} {log['message']}" for log in logs)[-6000:]

    def start(self, model: str, version: str, policy: str, **params: Any) -> PromotionRun:
        """Start ``promote`` for ``model`` version ``version`` (does not wait for it to suspend)."""
        args = {
            "model": model, "challenger_version": version, "policy_block": policy,
            "reasons": ["feature drift on 12 of 40 sensors (share 0.30 > 0.25)"],
            "metrics": METRICS,
            "links": {"drift_report": "http://127.0.0.1:1/reports/drift-42.html"},
            "trigger": {"window_ids": [41, 42], "drift_check_id": 42},
            **params,
        }
        flow_run_id = start_deployment_run(self.stack, args)
        self.started.append(flow_run_id)
        return PromotionRun(model=model, version=version, launcher=self, flow_run_id=flow_run_id)


@dataclass
class PromotionRun:
    """One ``promote`` flow run started by the launcher."""

    model: str
    version: str
    launcher: PromotionLauncher
    flow_run_id: str = ""
    started: datetime = field(default_factory=lambda: datetime.now(UTC))

    def output(self) -> str:
        return self.launcher.output(self.flow_run_id or None)


def session_launcher(stack: RunningStack) -> PromotionLauncher:
    """A launcher on the session's stack (its deployments must be applied: the ``deployments`` fixture)."""
    return PromotionLauncher(stack)


def _runs(stack: RunningStack, model: str) -> list[dict[str, Any]]:
    body = {"flow_runs": {"tags": {"all_": ["fabloop.promotion", f"model:{model}"]}}, "sort": "START_TIME_DESC"}
    return prefect_api.api(stack, "POST", "/flow_runs/filter", body)


def run_process(run: dict[str, Any]) -> int:
    """The process the worker last started for ``run`` (Prefect records it as its infrastructure pid)."""
    raw = str(run.get("infrastructure_pid") or "")
    digits = raw.rsplit(":", 1)[-1]
    assert digits.isdigit(), f"the run names no process: {raw!r}"
    return int(digits)


def runs_flow_run(proc: psutil.Process | int, flow_run_id: str) -> bool:
    """Whether ``proc`` (a process or a pid) still runs ``flow_run_id``: never a pid since reused.

    A process that has exited (or exits while it is read) runs nothing.
    """
    try:
        if isinstance(proc, int):
            proc = psutil.Process(proc)
        return proc.environ().get("PREFECT__FLOW_RUN_ID") == flow_run_id
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def wait_paused(
    stack: RunningStack, run: PromotionRun, timeout: float = 90, after_state: str | None = None,
    interval: float = 0.3,
) -> dict[str, Any]:
    """Block until ``run`` is suspended (in a new suspension if ``after_state`` names the previous one).

    Suspended, never merely paused: Prefect's state type PAUSED named ``Suspended``, the
    state whose run holds no process.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fr = prefect_api.flow_run(stack, run.flow_run_id)
        state = fr["state"] or {}
        if state.get("type") == "PAUSED" and state.get("id") != after_state:
            assert state.get("name") == "Suspended", f"paused, not suspended: {state}"
            assert state["state_details"].get("pause_reschedule") is True, state
            return fr
        if state.get("type") in FINAL:
            raise AssertionError(f"promote ended before suspending: {state}\n{run.output()}")
        time.sleep(interval)
    raise AssertionError(f"promote did not suspend within {timeout}s:\n{run.output()}")


def wait_completed(stack: RunningStack, run: PromotionRun, timeout: float = 60) -> dict[str, Any]:
    """The run's final state (Completed, named after the outcome)."""
    try:
        final = wait_final(stack, run.flow_run_id, timeout, interval=0.3)
    except AssertionError as exc:
        raise AssertionError(f"promote did not finish within {timeout}s: {exc}\n{run.output()}") from None
    state = final["state"]
    assert state["type"] == "COMPLETED", f"{state}\n{run.output()}"
    return state


def resume(stack: RunningStack, flow_run_id: str, run_input: dict[str, Any]) -> dict[str, Any]:
    """What the Prefect UI's Resume form posts."""
    return prefect_api.api(stack, "POST", f"/flow_runs/{flow_run_id}/resume", {"run_input": run_input})


def events(
    stack: RunningStack, name: str, model: str, since: datetime, expect: int = 1, timeout: float = 20
) -> list[dict[str, Any]]:
    """Prefect events ``name`` about ``fabloop.model.<model>`` since ``since`` (waits for ``expect``)."""
    body = {
        "filter": {
            "occurred": {"since": since.isoformat()},
            "event": {"name": [name]},
            "resource": {"id": [f"fabloop.model.{model}"]},
        },
        "limit": 50,
    }
    deadline = time.monotonic() + timeout
    while True:
        found = prefect_api.api(stack, "POST", "/events/filter", body)["events"]
        if len(found) >= expect or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def approvals(stack: RunningStack, model: str) -> list[Any]:
    from fabloop.adapters.store import decisions, engine_for, run_sync

    async def read() -> list[Any]:
        async with engine_for(stack.ep.database_url) as engine:
            return await decisions(engine, model)

    return run_sync(read())


def version_tags(stack: RunningStack, model: str, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    uri = stack.ep.mlflow_tracking_uri
    return dict(MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(model, version).tags)


def alias(stack: RunningStack, model: str, name: str) -> str | None:
    from fabloop.adapters.registry import aliases, client

    return aliases(client(stack.ep.mlflow_tracking_uri), model).get(name)


def paused_run(stack: RunningStack, model: str, version: str, timeout: float = 90,
               skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The first ``promote`` run of ``model`` ``version`` (other than ``skip``) that is suspended."""
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        for fr in _runs(stack, model):
            if str(fr["parameters"].get("challenger_version")) != version or fr["id"] in skip:
                continue
            seen[fr["id"]] = (fr["state"] or {}).get("name")
            if (fr["state"] or {}).get("type") == "PAUSED":
                return fr
        time.sleep(0.5)
    raise AssertionError(f"no suspended promotion of {model} v{version} within {timeout}s (runs: {seen})")


def start_deployment_run(stack: RunningStack, parameters: dict[str, Any]) -> str:
    """A ``promote`` run of the deployment, as the retraining flow starts one: the worker runs it."""
    from tests.helpers.prefect_api import api, deployment_id

    run = api(stack, "POST", f"/deployments/{deployment_id(stack, 'promote', 'promote')}/create_flow_run",
              {"parameters": parameters})
    return str(run["id"])


def record_intent(stack: RunningStack, model: str, version: str, approver: str, replaced: str | None,
                  flow_run_id: str = "crashed-run") -> Any:
    """An approval recorded as intended by a run that died before it moved any alias."""
    from fabloop.adapters.store import engine_for, record_decision, run_sync
    from fabloop.core.approval import INTENDED, ApprovalRecord

    async def write() -> Any:
        async with engine_for(stack.ep.database_url) as engine:
            return await record_decision(engine, ApprovalRecord(
                model=model, version=version, decision="approved", approver=approver, previous_champion=replaced,
                flow_run_id=flow_run_id, detail={"status": INTENDED, "champion": version, "previous": replaced},
            ))

    return run_sync(write())
