"""The main job: the whole loop on the embedded stack, from nothing to a paused promotion.

1. start the stack and register deployments, blocks and triggers;
2. publish a baseline stream (no drift) and start the ingest deployment;
3. **bootstrap, explicitly**: each model's first full window asks for a first
   training; the resulting challengers are approved as initial champions by the
   approver ``fabloop-bootstrap`` (recorded like any other decision);
4. publish the drift phase: a mean shift on one tool's chamber sensors;
5. wait for the drift check that breaches, its retraining and the challenger
   that is now paused for approval — then print the timeline and the two URLs
   that matter. ``--approve-as NAME`` finishes the loop unattended.

Re-running is harmless: the stack and deployments are reused, models that have a
champion are not bootstrapped again, and every run streams wafers of its own
(a new lot prefix and seed), so nothing collides with what earlier runs stored.
"""

from __future__ import annotations

import contextvars
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment
from rich.console import Console

from fabloop.adapters import registry
from fabloop.adapters.kafka import make_producer, publish_events
from fabloop.adapters.prefect_api import pending_promotions, resume_promotion, wait_for_outcome
from fabloop.adapters.store import LoopSummary, engine_for, loop_summary, run_sync
from fabloop.blocks import DEFAULT, ApprovalPolicy, load_block
from fabloop.core.approval import PendingPromotion
from fabloop.core.names import CHAMPION, INGEST_DEPLOYMENT
from fabloop.core.publishing import parse_drift_spec
from fabloop.core.simulate import SimulationConfig, simulate
from fabloop.deployments import deploy, deployment_name
from fabloop.infra.bootstrap import kafka_connection, prefect_api
from fabloop.infra.mlflow_auth import client_env
from fabloop.infra.settings import StackEndpoints, prefect_env
from fabloop.infra.stack import Stack

BOOTSTRAP_APPROVER = "fabloop-bootstrap"
TOOLS = ("ETCH-01", "ETCH-02", "ETCH-03")


@dataclass
class MainJobConfig:
    baseline_wafers: int = 3000
    drift_wafers: int = 900
    sensors: int = 40
    drift_tool: str = "ETCH-02"
    drift_sensors: int = 24
    drift_magnitude: float = 3.0
    approve_as: str | None = None
    timeout_s: float = 1500.0


@dataclass
class Timeline:
    t0: float = field(default_factory=time.monotonic)
    lines: list[tuple[float, str]] = field(default_factory=list)

    def mark(self, console: Console, text: str) -> None:
        t = time.monotonic() - self.t0
        self.lines.append((t, text))
        console.print(f"[dim]{t:6.1f}s[/dim]  {text}", highlight=False)


def _state_file(ep: StackEndpoints) -> Path:
    return ep.home / "mainjob.json"


def _next_run_number(ep: StackEndpoints) -> int:
    path = _state_file(ep)
    runs = json.loads(path.read_text()).get("runs", 0) if path.exists() else 0
    path.write_text(json.dumps({"runs": runs + 1}))
    return runs + 1


def _wait(what: str, check: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _ensure_ingest_running() -> str:
    with get_client(sync_client=True) as client:
        active = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name(INGEST_DEPLOYMENT)])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED]))),
        )
    if active:
        return str(active[0].id)
    started = run_deployment(INGEST_DEPLOYMENT, timeout=0)
    assert isinstance(started, FlowRun)  # typed maybe-a-coroutine; called from sync code it returns the run
    return str(started.id)


def _publish(ep: StackEndpoints, events: Iterator[Any]) -> int:
    # The stack's Kafka block: its security settings and credentials, as every fabloop client uses them.
    stats = publish_events(make_producer(kafka_connection(ep).producer_config()), events)
    if stats.failed:
        raise RuntimeError(f"{stats.failed} events could not be published")
    return stats.published


def _split_phase(events: Iterator[Any], first_wafer_of_phase2: str) -> tuple[list[Any], Iterator[Any]]:
    """Events up to the first sensor reading of the drift phase, and the rest (lazily)."""
    head: list[Any] = []
    for event in events:
        if getattr(event, "kind", "") == "sensor" and event.wafer == first_wafer_of_phase2:
            return head, chain([event], events)
        head.append(event)
    return head, iter(())


def _is_champion(tracking_uri: str, model: str, version: str) -> bool:
    return _champions(tracking_uri, [model])[model] == version


def _champions(tracking_uri: str, models: list[str]) -> dict[str, str | None]:
    client = registry.client(tracking_uri)
    out: dict[str, str | None] = {}
    for m in models:
        mv = registry.alias_version(client, m, CHAMPION)
        out[m] = mv.version if mv else None
    return out


def run_main_job(ep: StackEndpoints, cfg: MainJobConfig, console: Console) -> dict[str, Any]:
    tl = Timeline()
    # prefect.yaml is applied while the worker starts: deploying needs the server, not the worker.
    timings = Stack(ep).up(log=lambda m: console.print(f"  {m}", highlight=False),
                           while_worker_starts=partial(deploy, ep))
    tl.mark(console, f"stack healthy ({timings})")
    tl.mark(console, "deployments, triggers and blocks registered (prefect.yaml)")
    os.environ.update(prefect_env(ep))
    os.environ.update(client_env(ep))  # the registry reads below work as the service account
    # Prefect read its settings when this module imported it: point this process's
    # client at the stack explicitly rather than trusting the environment.
    with prefect_api(ep):
        return _loop(ep, cfg, console, tl)


def _loop(ep: StackEndpoints, cfg: MainJobConfig, console: Console, tl: Timeline) -> dict[str, Any]:
    _allow_approvers(tl, console, [BOOTSTRAP_APPROVER, *([cfg.approve_as] if cfg.approve_as else [])])
    run_no = _next_run_number(ep)
    models = [f"yield-{t}" for t in TOOLS]
    champions = _champions(ep.mlflow_tracking_uri, models)
    bootstrap = [m for m, v in champions.items() if v is None]
    baseline = cfg.baseline_wafers if bootstrap else max(cfg.baseline_wafers // 3, 300)
    total = baseline + cfg.drift_wafers
    drift = parse_drift_spec(f"mean_shift:{cfg.drift_tool}@{baseline}x{cfg.drift_magnitude}:{cfg.drift_sensors}")
    sim = SimulationConfig(
        seed=1000 + run_no, wafers=total, n_sensors=cfg.sensors, lot_prefix=f"R{run_no}L",
        start=datetime.now(UTC), drifts=[drift],
    )
    events = simulate(sim)
    lot, slot = divmod(baseline, sim.lot_size)
    first_drift_wafer = f"{sim.lot_prefix}{lot + 1:04d}-{slot + 1:02d}"
    phase1, phase2 = _split_phase(events, first_drift_wafer)
    n1 = _publish(ep, iter(phase1))
    tl.mark(console, f"baseline: {n1} events published ({baseline} wafers, {cfg.sensors} sensors, run {run_no})")
    ingest_run = _ensure_ingest_running()
    tl.mark(console, f"ingest flow running ({ep.prefect_ui_url}/runs/flow-run/{ingest_run})")

    if bootstrap:
        tl.mark(console, f"bootstrap: no champion yet for {', '.join(bootstrap)} — "
                         "first trainings follow their first windows")
        _bootstrap(ep, cfg, console, tl, bootstrap)
    else:
        tl.mark(console, f"champions already in place ({champions}); no bootstrap")

    drift_model = f"yield-{cfg.drift_tool}"
    champion_before = _champions(ep.mlflow_tracking_uri, [drift_model])[drift_model]
    n2 = _publish(ep, phase2)
    tl.mark(console, f"drift phase: {n2} events published — mean shift of {cfg.drift_magnitude}σ on "
                     f"{cfg.drift_sensors} sensors of {cfg.drift_tool} from wafer {first_drift_wafer}")

    def challenger_paused() -> Any:
        found = [p for p in pending_promotions(drift_model) if p.version != champion_before]
        return found[0] if found else None

    paused = _wait(f"a drift-triggered challenger of {drift_model} awaiting approval", challenger_paused, cfg.timeout_s)
    summary = _summarise(ep, drift_model, paused.version, paused.flow_run_id)
    tl.mark(console, f"drift checks: {summary['checks']} windows checked, {summary['breaches']} breach(es), "
                     f"{summary['suppressed']} suppressed trigger(s)")
    tl.mark(console, f"breach: {summary['breach_reason']}")
    tl.mark(console, f"retraining: challenger {drift_model} v{paused.version} — {summary['metrics_line']}")
    tl.mark(console, f"[bold]paused for approval[/bold]: {ep.prefect_ui_url}/runs/flow-run/{paused.flow_run_id}")
    tl.mark(console, f"model in MLflow: {registry.version_url(ep.mlflow_tracking_uri, drift_model, paused.version)}")
    result = {"model": drift_model, "version": paused.version, "promote_flow_run": paused.flow_run_id,
              "paused_run_url": f"{ep.prefect_ui_url}/runs/flow-run/{paused.flow_run_id}",
              "model_url": registry.version_url(ep.mlflow_tracking_uri, drift_model, paused.version),
              "seconds": round(time.monotonic() - tl.t0, 1), **summary}
    if cfg.approve_as:
        _decide(paused.flow_run_id, cfg.approve_as, "approved by fabloop run --approve-as")
        _wait(f"{drift_model} v{paused.version} as champion",
              partial(_is_champion, ep.mlflow_tracking_uri, drift_model, paused.version), 120, 1.0)
        tl.mark(console, f"approved by {cfg.approve_as}: {drift_model} v{paused.version} is champion")
        result["champion"] = paused.version
    else:
        console.print(f"\nApprove in the UI (Resume) or with: fabloop approve {drift_model} "
                      f"--version {paused.version} --as YOUR-NAME\n")
    return result


def _bootstrap(ep: StackEndpoints, cfg: MainJobConfig, console: Console, tl: Timeline, models: list[str]) -> None:
    """Approve each model's first challenger as initial champion as soon as it waits.

    The first trainings run side by side and finish in any order: each approval
    starts when its promotion is paused, rather than after the models before it.
    """
    deadline = time.monotonic() + cfg.timeout_s
    waiting = list(models)
    approvals: list[Future[None]] = []
    with ThreadPoolExecutor(max_workers=len(models), thread_name_prefix="bootstrap") as pool:
        while waiting:
            for done in (f for f in approvals if f.done()):
                done.result()  # a refused approval ends the bootstrap without waiting for the rest
            newest: dict[str, PendingPromotion] = {}
            for p in pending_promotions():  # newest first
                newest.setdefault(p.model, p)
            for model in [m for m in waiting if m in newest]:
                waiting.remove(model)
                # Each approval in its own thread, with this thread's Prefect settings (the stack's API).
                approve = partial(_approve_first_challenger, ep, console, tl, model, newest[model])
                approvals.append(pool.submit(contextvars.copy_context().run, approve))
            if waiting:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"timed out after {cfg.timeout_s:.0f}s waiting for the first challenger of "
                                       f"{', '.join(waiting)}")
                time.sleep(1.0)
        for f in approvals:
            f.result()


def _approve_first_challenger(ep: StackEndpoints, console: Console, tl: Timeline, model: str,
                              p: PendingPromotion) -> None:
    # Asked again right before approving: only a model the registry *answers* has no
    # champion is bootstrapped. An unreachable MLflow raises here (alias_version never
    # reads an outage as "no champion"), and the job stops without deciding anything.
    now_champion = _champions(ep.mlflow_tracking_uri, [model])[model]
    if now_champion is not None:
        tl.mark(console, f"bootstrap: {model} has champion v{now_champion} now; v{p.version} is left "
                         "for an engineer to decide")
        return
    _decide(p.flow_run_id, BOOTSTRAP_APPROVER, "bootstrap: initial champion approved by the main job (fabloop run)")
    _wait(f"{model} v{p.version} as champion", partial(_is_champion, ep.mlflow_tracking_uri, model, p.version),
          120, 1.0)
    tl.mark(console, f"bootstrap: {model} v{p.version} approved as initial champion by {BOOTSTRAP_APPROVER}")


def _allow_approvers(tl: Timeline, console: Console, names: list[str]) -> None:
    """The main job approves as these names: they must be on the approval allowlist."""
    policy = load_block(ApprovalPolicy)
    missing = [n for n in names if not policy.allows(n)]
    if missing:
        policy.approvers = [*policy.approvers, *missing]
        policy.save(DEFAULT, overwrite=True)
        tl.mark(console, f"approval allowlist: added {', '.join(missing)} (block 'fabloop approval policy'/default)")


def _decide(flow_run_id: str, approver: str, comment: str) -> None:
    """Resume a paused promotion with an approval, and fail loudly if it was refused."""
    left = resume_promotion(flow_run_id, "approve", approver, comment)
    state = wait_for_outcome(flow_run_id, left, timeout=120)
    if state is None or state.is_paused():
        raise RuntimeError(f"approval of flow run {flow_run_id} as {approver!r} was not accepted "
                           f"({state.message if state else 'no new state within 120 s'})")


def _summarise(ep: StackEndpoints, model: str, version: str, promote_run: str) -> dict[str, Any]:
    async def counts() -> LoopSummary:
        async with engine_for(ep.database_url) as engine:
            return await loop_summary(engine, model)

    summary = run_sync(counts())
    reason = summary.breach_reason or "?"
    client = registry.client(ep.mlflow_tracking_uri)
    mv = registry.get_version(client, model, version)
    if not mv.run_id:
        raise RuntimeError(f"{model} version {version} has no training run in MLflow")
    metrics = client.get_run(mv.run_id).data.metrics
    ch = metrics.get("holdout_roc_auc")
    champ = metrics.get("champion_holdout_roc_auc")
    line = f"holdout ROC-AUC {ch:.3f}" + (f" vs champion {champ:.3f} on the same wafers" if champ is not None else "")
    return {"checks": summary.checks, "breaches": summary.breaches, "suppressed": summary.suppressed,
            "breach_reason": reason[:300], "metrics_line": line, "challenger_auc": ch, "champion_auc": champ,
            "drift_check_id": mv.tags.get("fabloop.drift_check_id")}
