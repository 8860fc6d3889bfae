"""``fabloop approvals / approve / reject / rollback``: human decisions from the terminal.

``approve`` and ``reject`` resume the model's paused ``promote`` run with exactly
the input the Prefect UI's Resume form sends, so the flow (not this command)
checks the allowlist and records the decision; the command then waits for the
outcome and reports it, including a refusal.
"""

# Prefect, MLflow, httpx and the store are imported inside the commands, after ``connect``
# has pointed this process at the stack: they take seconds to load, which ``--help`` skips.

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table

from fabloop.cli._common import HomeOpt, connect, console, fail
from fabloop.core.approval import ApprovalRecord, PendingPromotion
from fabloop.core.names import CHAMPION, PREVIOUS
from fabloop.infra.settings import StackEndpoints

ApproverOpt = Annotated[str, typer.Option("--as", help="Your name, as on the approver allowlist.", show_default=False)]
WaitOpt = Annotated[float, typer.Option(help="Seconds to wait for the outcome (0: do not wait).")]


def _pending(ep: StackEndpoints, model: str | None) -> list[PendingPromotion]:
    """Pending promotions from the Prefect API, or a clear error if it cannot be reached."""
    import httpx

    from fabloop.adapters.prefect_api import pending_promotions

    try:
        return pending_promotions(model)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the Prefect API at {ep.prefect_api_url} ({exc}); is the stack up? (`fabloop status`)")
        raise typer.Exit(1) from None


def _decisions(ep: StackEndpoints, model: str, flow_run_id: str) -> list[ApprovalRecord]:
    """The audit rows of one promotion run, from the event store."""
    from fabloop.adapters.store import decisions, engine_for, run_sync

    async def read() -> list[ApprovalRecord]:
        async with engine_for(ep.database_url) as engine:
            return await decisions(engine, model, flow_run_id)

    return run_sync(read())


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit} {(s % size) // subsize}{sub}"
    return f"{s}s"


def run_url(ep: StackEndpoints, flow_run_id: str) -> str:
    return f"{ep.prefect_ui_url}/runs/flow-run/{flow_run_id}"


def approvals(
    model: Annotated[str | None, typer.Argument(help="Only this model.")] = None,
    home: HomeOpt = None,
) -> None:
    """List promotions waiting for a decision, with their age and links."""
    ep = connect(home)
    from fabloop.adapters.registry import version_url

    pending = _pending(ep, model)
    if not pending:
        console.print(f"no pending promotion{f' for {model}' if model else ''}", markup=False)
        return
    # ``fabloop up`` keeps the MLflowServer block on the stack's address; reading the
    # endpoints avoids a block load (seconds of plugin discovery) in a listing.
    tracking_uri = ep.mlflow_tracking_uri
    now = datetime.now(UTC)
    table = Table(title="pending promotions")
    for col in ("model", "version", "waiting", "times out in", "flow run"):
        table.add_column(col)
    for p in pending:
        left = (p.times_out - now).total_seconds() if p.times_out else None
        table.add_row(p.model, p.version, _age(p.age_seconds(now)), _age(left), p.flow_run_name)
    console.print(table)
    # Links on their own lines, never folded, so that they stay clickable and copyable.
    for p in pending:
        console.print(f"{p.model} v{p.version}", style="bold", markup=False, highlight=False)
        console.print(f"  decide:  {run_url(ep, p.flow_run_id)}", soft_wrap=True, markup=False, highlight=False)
        console.print(f"  model:   {version_url(tracking_uri, p.model, p.version)}", soft_wrap=True,
                      markup=False, highlight=False)


def _decide(
    model: str, decision: Literal["approve", "reject"], approver: str, comment: str, home: Path | None, wait: float
) -> None:
    ep = connect(home)
    from fabloop.adapters.prefect_api import ResumeRefused, resume_promotion, wait_for_outcome

    if not approver.strip():
        fail("--as: give your name")
        raise typer.Exit(2)
    pending = _pending(ep, model)
    if not pending:
        others = sorted({p.model for p in _pending(ep, None)})
        hint = f" (pending: {', '.join(others)})" if others else ""
        fail(f"no pending promotion for {model}{hint}")
        raise typer.Exit(1)
    target = pending[0]
    if len(pending) > 1:
        console.print(f"{len(pending)} promotions wait for {model}; deciding the newest (version {target.version})",
                      markup=False)
    try:
        left = resume_promotion(target.flow_run_id, decision, approver, comment)
    except ResumeRefused as exc:
        fail(exc)
        raise typer.Exit(1) from None
    console.print(f"{decision} sent for {model} version {target.version} as {approver}: "
                  f"{run_url(ep, target.flow_run_id)}", markup=False, highlight=False)
    if wait <= 0:
        return
    state = wait_for_outcome(target.flow_run_id, left, wait)
    if state is None:
        console.print(f"the run has not acted on it within {wait:.0f}s; follow it in the Prefect UI", markup=False)
        return
    if state.is_paused():
        refused = [d for d in _decisions(ep, model, target.flow_run_id) if d.decision == "refused"]
        reason = refused[-1].detail.get("reason", "refused") if refused else "refused"
        fail(f"refused: {reason}; the promotion of {model} version {target.version} is still waiting")
        raise typer.Exit(1)
    console.print(f"{model} version {target.version}: {state.name}: {state.message}", markup=False, highlight=False)
    if not state.is_completed():
        raise typer.Exit(1)


def approve(
    model: Annotated[str, typer.Argument(help="Registered model name, e.g. yield-ETCH-02.")],
    approver: ApproverOpt,
    comment: Annotated[str, typer.Option(help="Why (optional when approving).")] = "",
    wait: WaitOpt = 60.0,
    home: HomeOpt = None,
) -> None:
    """Approve the model's pending challenger: it becomes champion."""
    _decide(model, "approve", approver, comment, home, wait)


def reject(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    approver: ApproverOpt,
    comment: Annotated[str, typer.Option(help="Why the challenger is rejected (required).", show_default=False)],
    wait: WaitOpt = 60.0,
    home: HomeOpt = None,
) -> None:
    """Reject the model's pending challenger: the champion stays."""
    if not comment.strip():
        fail("--comment: a comment is required to reject")
        raise typer.Exit(2)
    _decide(model, "reject", approver, comment, home, wait)


def rollback(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    approver: ApproverOpt,
    comment: Annotated[str, typer.Option(help="Why the champion is rolled back (required).", show_default=False)],
    policy: Annotated[str, typer.Option(help="ApprovalPolicy block whose allowlist applies.")] = "default",
    home: HomeOpt = None,
) -> None:
    """Move the alias champion back to the previous version (audited, as a flow run)."""
    if not comment.strip():
        fail("--comment: a comment is required to roll back")
        raise typer.Exit(2)
    ep = connect(home)
    from fabloop.adapters import registry
    from fabloop.flows.promote import rollback as rollback_flow

    mlflow = registry.client(ep.mlflow_tracking_uri)
    champion = registry.alias_version(mlflow, model, CHAMPION)
    previous = registry.alias_version(mlflow, model, PREVIOUS)
    if champion is None or previous is None:
        missing = CHAMPION if champion is None else PREVIOUS
        fail(f"model {model} has no version with alias {missing!r}: nothing to roll back")
        raise typer.Exit(1)
    outcome = rollback_flow(model=model, approver=approver, comment=comment, policy_block=policy)
    if outcome["decision"] == "refused":
        fail(f"refused: {outcome['detail']['reason']}")
        raise typer.Exit(1)
    console.print(f"{model}: champion is version {outcome['detail']['champion']} again "
                  f"(was {outcome['detail']['demoted']}); rolled back by {approver}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``approvals``, ``approve``, ``reject`` and ``rollback`` to the ``fabloop`` app."""
    app.command("approvals")(approvals)
    app.command("approve")(approve)
    app.command("reject")(reject)
    app.command("rollback")(rollback)
