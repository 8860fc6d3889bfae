"""``fabloop approvals / approve / reject / rollback / audit``: human decisions from the terminal.

``approve`` and ``reject`` resume the suspended ``promote`` run of the version the
engineer names (``--version``: the one they reviewed, never just the newest) with
exactly the input the Prefect UI's Resume form sends, so the flow (not this
command) checks the allowlist and records the decision. A suspended run has no
process: once resumed it waits for a worker to start it again, and the command
waits for the outcome and reports it. Any outcome other than the one asked for
(refused, superseded meanwhile, timed out) exits 1.

``audit`` reads the decisions back: a model's alias history, or (``--verify``)
every model's aliases in the registry compared with the decisions that should
explain them.
"""

# Prefect, MLflow, httpx and the store are imported inside the commands, after ``connect``
# has pointed this process at the stack: they take seconds to load, which ``--help`` skips.

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from fabloop.cli._common import HomeOpt, connect, console, credential_refused, fail
from fabloop.core.approval import AliasVerdict, ApprovalRecord, PendingPromotion, alias_history, is_intended
from fabloop.core.names import CHAMPION, MODEL_CHAMPION_UNEXPLAINED, PREVIOUS
from fabloop.infra.settings import StackEndpoints

ApproverOpt = Annotated[str, typer.Option("--as", help="Your name, as on the approver allowlist.", show_default=False)]
WaitOpt = Annotated[float, typer.Option(
    help="Seconds to wait for the outcome: a worker must start the resumed run first (0: do not wait).",
)]
VersionOpt = Annotated[str, typer.Option(
    "--version", help="The challenger version you reviewed; refused unless it is the one waiting.", show_default=False,
)]
# The state a promotion ends in when the decision asked for was acted on.
_ACTED_ON = {"approve": "Approved", "reject": "Rejected"}


def _pending(ep: StackEndpoints, model: str | None) -> list[PendingPromotion]:
    """Pending promotions from the Prefect API, or a clear error if it cannot be reached."""
    import httpx

    from fabloop.adapters.prefect_api import pending_promotions

    try:
        return pending_promotions(model)
    except httpx.HTTPError as exc:
        fail(credential_refused(exc) or
             f"cannot reach the Prefect API at {ep.prefect_api_url} ({exc}); is the stack up? (`fabloop status`)")
        raise typer.Exit(1) from None


def _decisions(ep: StackEndpoints, model: str | None, flow_run_id: str | None = None) -> list[ApprovalRecord]:
    """The audit rows of a model (of every model if None; of one promotion run if given), from the event store."""
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
        # Past its deadline, a promotion waits only for its timeout run (a worker must be running).
        due = "overdue" if left is not None and left < 0 else _age(left)
        table.add_row(p.model, p.version, _age(p.age_seconds(now)), due, p.flow_run_name)
    console.print(table)
    # Links on their own lines, never folded, so that they stay clickable and copyable.
    for p in pending:
        console.print(f"{p.model} v{p.version}", style="bold", markup=False, highlight=False)
        console.print(f"  decide:  {run_url(ep, p.flow_run_id)}", soft_wrap=True, markup=False, highlight=False)
        console.print(f"  model:   {version_url(tracking_uri, p.model, p.version)}", soft_wrap=True,
                      markup=False, highlight=False)


def _decide(
    model: str, version: str, decision: Literal["approve", "reject"], approver: str, comment: str,
    home: Path | None, wait: float,
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
    target = next((p for p in pending if p.version == version.strip()), None)
    if target is None:
        waiting = ", ".join(sorted({p.version for p in pending}))
        fail(f"version {version} of {model} is not the pending one (waiting for a decision: version {waiting}); "
             "review that version before deciding")
        raise typer.Exit(1)
    try:
        left = resume_promotion(target.flow_run_id, decision, approver, comment)
    except ResumeRefused as exc:
        fail(exc)
        raise typer.Exit(1) from None
    console.print(f"{decision} sent for {model} version {target.version} as {approver}: "
                  f"{run_url(ep, target.flow_run_id)}", markup=False, highlight=False)
    if wait <= 0:
        return
    console.print("resumed; waiting for a worker to run the promotion and act on it", markup=False)

    def progress(state: Any) -> None:
        if state.is_running():
            console.print("a worker is acting on it", markup=False)

    state = wait_for_outcome(target.flow_run_id, left, wait, on_state=progress)
    if state is None:
        console.print(f"the run has not acted on it within {wait:.0f}s (is a worker running? `fabloop status`); "
                      "the decision is kept and acted on when a worker starts the run; follow it in the Prefect UI",
                      markup=False)
        return
    if state.is_paused():
        refused = [d for d in _decisions(ep, model, target.flow_run_id) if d.decision == "refused"]
        reason = refused[-1].detail.get("reason", "refused") if refused else "refused"
        fail(f"refused: {reason}; the promotion of {model} version {target.version} is still waiting")
        raise typer.Exit(1)
    console.print(f"{model} version {target.version}: {state.name}: {state.message}", markup=False, highlight=False)
    if not state.is_completed() or state.name != _ACTED_ON[decision]:
        fail(f"your {decision} was not acted on: the promotion ended {state.name}")
        raise typer.Exit(1)


def approve(
    model: Annotated[str, typer.Argument(help="Registered model name, e.g. yield-ETCH-02.")],
    version: VersionOpt,
    approver: ApproverOpt,
    comment: Annotated[str, typer.Option(help="Why (optional when approving).")] = "",
    wait: WaitOpt = 180.0,
    home: HomeOpt = None,
) -> None:
    """Approve the model's pending challenger VERSION: it becomes champion."""
    _decide(model, version, "approve", approver, comment, home, wait)


def reject(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    approver: ApproverOpt,
    comment: Annotated[str, typer.Option(help="Why the challenger is rejected (required).", show_default=False)],
    version: VersionOpt,
    wait: WaitOpt = 180.0,
    home: HomeOpt = None,
) -> None:
    """Reject the model's pending challenger VERSION: the champion stays."""
    if not comment.strip():
        fail("--comment: a comment is required to reject")
        raise typer.Exit(2)
    _decide(model, version, "reject", approver, comment, home, wait)


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


def _print_history(ep: StackEndpoints, model: str) -> None:
    records = _decisions(ep, model)
    if not records:
        console.print(f"no recorded decision for {model}", markup=False)
        return
    table = Table(title=f"decisions and champion of {model}")
    for col in ("#", "decided (UTC)", "decision", "version", "by", "champion after", "replaced", "comment"):
        table.add_column(col)
    for rec, champion in alias_history(records):
        decision = rec.decision + (" (intended, not completed)" if is_intended(rec) else "")
        when = f"{rec.decided_at:%Y-%m-%d %H:%M:%S}" if rec.decided_at else "-"
        replaced = rec.previous_champion if rec.decision in ("approved", "rolled_back") else None
        table.add_row(str(rec.id), when, decision, rec.version, rec.approver or "-", champion or "-",
                      replaced or "-", (rec.comment or "")[:60])
    console.print(table)


def _verify(ep: StackEndpoints, model: str | None) -> list[AliasVerdict]:
    """Every model's (or one model's) registry aliases against its recorded decisions."""
    from fabloop.adapters import registry
    from fabloop.core.approval import verify_aliases

    mlflow = registry.client(ep.mlflow_tracking_uri)
    named = registry.all_aliases(mlflow)
    records = _decisions(ep, model)
    models = [model] if model else sorted(set(named) | {r.model for r in records})
    return [verify_aliases(m, named.get(m, {}), [r for r in records if r.model == m]) for m in models]


def audit(
    model: Annotated[str | None, typer.Argument(help="Registered model name (every model with --verify).")] = None,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Compare the registry's aliases with the recorded decisions; exit 1 if any is unexplained.",
    )] = False,
    home: HomeOpt = None,
) -> None:
    """Print a model's alias history from the decisions, or verify that decisions explain every champion."""
    if not verify:
        if model is None:
            fail("give a MODEL, or --verify to check every model")
            raise typer.Exit(2)
        _print_history(connect(home), model)
        return
    ep = connect(home)
    verdicts = _verify(ep, model)
    unexplained = [v for v in verdicts if not v.explained]
    for v in verdicts:
        if v.explained:
            line = f"ok           {v.model}: champion {v.champion or '-'}"
            line += f" (decision #{v.decision_id})" if v.decision_id else ""
            console.print(line + (f"; {v.note}" if v.note else ""), markup=False, highlight=False)
        else:
            console.print(f"UNEXPLAINED  {v.model}: {v.problem}", markup=False, highlight=False)
    if unexplained:
        from fabloop.adapters.prefect_api import emit_and_flush
        from fabloop.core.names import model_resource

        for v in unexplained:
            emit_and_flush(MODEL_CHAMPION_UNEXPLAINED, model_resource(v.model, v.champion),
                           v.model_dump(mode="json"))
        fail(f"{len(unexplained)} of {len(verdicts)} models have a champion no recorded decision explains "
             f"(event {MODEL_CHAMPION_UNEXPLAINED} emitted for each)")
        raise typer.Exit(1)
    console.print(f"every champion is explained by a recorded decision ({len(verdicts)} models)", markup=False)


def register(app: typer.Typer) -> None:
    """Add ``approvals``, ``approve``, ``reject``, ``rollback`` and ``audit`` to the ``fabloop`` app."""
    app.command("approvals")(approvals)
    app.command("approve")(approve)
    app.command("reject")(reject)
    app.command("rollback")(rollback)
    app.command("audit")(audit)
