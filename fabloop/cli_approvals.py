"""``fabloop approvals / approve / reject / rollback``: human decisions from the terminal.

``approve`` and ``reject`` resume the model's paused ``promote`` run with exactly
the input the Prefect UI's Resume form sends, so the flow (not this command)
checks the allowlist and records the decision; the command then waits for the
outcome and reports it, including a refusal.

``fabloop.cli`` calls :func:`register` on its app. Nothing from ``fabloop.cli`` is
imported at module level: under ``python -m fabloop.cli`` that module is
``__main__``, and a second import of it would register on a different app.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer
from rich.console import Console
from rich.table import Table

from fabloop.infra.settings import StackEndpoints

HomeOpt = Annotated[Optional[Path], typer.Option("--home", envvar="FABLOOP_HOME", help="State directory of the stack.")]

ApproverOpt = Annotated[str, typer.Option("--as", help="Your name, as on the approver allowlist.", show_default=False)]
WaitOpt = Annotated[float, typer.Option(help="Seconds to wait for the outcome (0: do not wait).")]


def console() -> Console:
    from fabloop.cli import console as cli_console

    return cli_console


def fail(message: object) -> None:
    from fabloop.cli import fail as cli_fail

    cli_fail(message)


def _connect(home: Path | None) -> StackEndpoints:
    """Point this process's Prefect client at the stack before anything imports it."""
    from fabloop.cli import load_endpoints
    from fabloop.infra.stack import prefect_env

    ep = load_endpoints(home)
    os.environ.update(prefect_env(ep))
    return ep


def _tracking_uri(ep: StackEndpoints) -> str:
    # ``fabloop up`` keeps the MLflowServer block on the stack's address; reading the
    # endpoints avoids a block load (seconds of plugin discovery) in a listing.
    return ep.mlflow_tracking_uri


def _database_url(ep: StackEndpoints) -> str:
    return ep.database_url


def _pending(ep: StackEndpoints, model: str | None) -> list[Any]:
    """Pending promotions from the Prefect API, or a clear error if it cannot be reached."""
    import httpx

    from fabloop.adapters.prefect_api import pending_promotions

    try:
        return pending_promotions(model)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the Prefect API at {ep.prefect_api_url} ({exc}); is the stack up? (`fabloop status`)")
        raise typer.Exit(1) from None


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
    model: Annotated[Optional[str], typer.Argument(help="Only this model.")] = None,
    home: HomeOpt = None,
) -> None:
    """List promotions waiting for a decision, with their age and links."""
    ep = _connect(home)
    from fabloop.adapters.registry import version_url

    pending = _pending(ep, model)
    if not pending:
        console().print(f"no pending promotion{f' for {model}' if model else ''}", markup=False)
        return
    tracking_uri = _tracking_uri(ep)
    now = datetime.now(UTC)
    table = Table(title="pending promotions")
    for col in ("model", "version", "waiting", "times out in", "flow run"):
        table.add_column(col)
    for p in pending:
        left = (p.times_out - now).total_seconds() if p.times_out else None
        table.add_row(p.model, p.version, _age(p.age_seconds(now)), _age(left), p.flow_run_name)
    console().print(table)
    # Links on their own lines, never folded, so that they stay clickable and copyable.
    for p in pending:
        console().print(f"{p.model} v{p.version}", style="bold", markup=False, highlight=False)
        console().print(f"  decide:  {run_url(ep, p.flow_run_id)}", soft_wrap=True, markup=False, highlight=False)
        console().print(f"  model:   {version_url(tracking_uri, p.model, p.version)}", soft_wrap=True,
                        markup=False, highlight=False)


def _decide(
    model: str, decision: Literal["approve", "reject"], approver: str, comment: str, home: Path | None, wait: float
) -> None:
    ep = _connect(home)
    from fabloop.adapters.prefect_api import ResumeRefused, resume_promotion, wait_for_outcome
    from fabloop.adapters.store.approvals import decisions

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
        console().print(f"{len(pending)} promotions wait for {model}; deciding the newest (version {target.version})",
                      markup=False)
    try:
        left = resume_promotion(target.flow_run_id, decision, approver, comment)
    except ResumeRefused as exc:
        fail(exc)
        raise typer.Exit(1) from None
    console().print(f"{decision} sent for {model} version {target.version} as {approver}: "
                  f"{run_url(ep, target.flow_run_id)}", markup=False, highlight=False)
    if wait <= 0:
        return
    state = wait_for_outcome(target.flow_run_id, left, wait)
    if state is None:
        console().print(f"the run has not acted on it within {wait:.0f}s; follow it in the Prefect UI", markup=False)
        return
    if state.is_paused():
        refused = [d for d in decisions(_database_url(ep), model, target.flow_run_id) if d.decision == "refused"]
        reason = refused[-1].detail.get("reason", "refused") if refused else "refused"
        fail(f"refused: {reason}; the promotion of {model} version {target.version} is still waiting")
        raise typer.Exit(1)
    console().print(f"{model} version {target.version}: {state.name}: {state.message}", markup=False, highlight=False)
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
    ep = _connect(home)
    from fabloop.adapters import registry

    mlflow = registry.client(_tracking_uri(ep))
    champion = registry.alias_version(mlflow, model, registry.CHAMPION)
    previous = registry.alias_version(mlflow, model, registry.PREVIOUS)
    if champion is None or previous is None:
        missing = registry.CHAMPION if champion is None else registry.PREVIOUS
        fail(f"model {model} has no version with alias {missing!r}: nothing to roll back")
        raise typer.Exit(1)
    from fabloop.flows.promote import rollback as rollback_flow

    outcome = rollback_flow(model=model, approver=approver, comment=comment, policy_block=policy)
    if outcome["decision"] == "refused":
        fail(f"refused: {outcome['detail']['reason']}")
        raise typer.Exit(1)
    console().print(f"{model}: champion is version {outcome['detail']['champion']} again "
                  f"(was {outcome['detail']['demoted']}); rolled back by {approver}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``approvals``, ``approve``, ``reject`` and ``rollback`` to the ``fabloop`` app."""
    app.command("approvals")(approvals)
    app.command("approve")(approve)
    app.command("reject")(reject)
    app.command("rollback")(rollback)
