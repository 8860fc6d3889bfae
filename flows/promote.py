"""Human-approved promotion: a challenger becomes champion only by a named person's decision.

``promote`` is started (a run of its deployment, linked to the retraining by the
decision page) by the retraining gate once the challenger version carries the
``challenger`` alias. It lays out the decision (metrics table, reasons, links) as a
Markdown artifact and as the description of the Resume form, then *suspends*: the
run waits in Prefect (Paused, named Suspended) and its process ends, so a pending
promotion holds no worker and survives worker and server restarts. Someone resumes
it from the Prefect UI or with ``fabloop approve`` / ``fabloop reject``; a worker
then runs the flow again from the top, and the flow acts on the answer. Every
outcome is written to the version's tags, the approvals table and a
``fabloop.model.*`` Prefect event:

- approved: ``champion`` moves to the challenger, the replaced champion keeps ``previous``;
- rejected (comment required) or timed out: the champion is untouched;
- refused (approver not on the policy's allowlist, or a blank rejection): recorded,
  and the run suspends again for the rest of its timeout;
- superseded: a newer challenger of the same model started its own promotion.

Each execution decides from what the servers hold, never from memory: the
deadline is the run's ``decide-by:`` tag (written by the first execution, which
alone lays out the decision, tags the version pending, announces the wait and
schedules the ``promotion-timeout`` run at the deadline), and the answers are the
run's inputs under its suspension keys ``decision-1``, ``decision-2``…, replayed
in order; an answer already refused has its row (with its key) and is skipped. An
answer the server took after the deadline is not acted on: the run ends timed out
and records it as ignored.

``rollback`` moves ``champion`` back to ``previous``, audited the same way.

A decision that moves ``champion`` (approval, rollback) is recorded as *intended*
before any alias moves and marked *completed* after, so that every champion the
registry shows is explained by a row, even if the run dies in between; a later
promotion of the same version completes an intended approval it finds (after a
crash, the deployment's trigger starts that promotion again). Other outcomes are
recorded before the challenger alias is dropped.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from mlflow import MlflowClient
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext, get_run_context
from prefect.events import emit_event
from prefect.flow_runs import suspend_flow_run
from prefect.states import Completed, State
from prefect.utilities.urls import url_for
from sqlalchemy.ext.asyncio import AsyncEngine

from fabloop.adapters import registry
from fabloop.adapters.prefect_api import (
    OPEN_STATES,
    Answered,
    ApprovalInput,
    add_flow_run_tags,
    decision_facts,
    flow_run_tags,
    promotion_runs,
    schedule_timeout,
    wake_superseded,
)
from fabloop.blocks import DEFAULT, ApprovalPolicy, FabloopDatabase, MLflowServer, load_block
from fabloop.core.approval import (
    INTENDED,
    MOVES_CHAMPION,
    TIMED_OUT_REASON,
    ApprovalRecord,
    Decision,
    deadline_tag,
    decide_by,
    decision_markdown,
    is_intended,
    newest_above,
    refusal_reason,
    superseded_by,
    superseded_reason,
)
from fabloop.core.names import (
    CHAMPION,
    DECISION_KEY_PREFIX,
    MODEL_PROMOTED,
    MODEL_REJECTED,
    MODEL_ROLLED_BACK,
    MODEL_SUPERSEDED,
    PREVIOUS,
    PROMOTE_DEPLOYMENT,
    PROMOTION_TAG,
    PROMOTION_WAITING,
    ROLLBACK_TAG,
    SUPERSEDED_TAG_PREFIX,
    SYSTEM_APPROVER,
    artifact_key,
    model_resource,
    model_tag,
)
from fabloop.tasks.promotion import (
    champion_version,
    complete_decision,
    decision_links,
    drop_challenger_alias,
    promote_to_champion,
    record_decision,
    recorded_decisions,
    rollback_champion,
    tag_version,
)

RunLogger = logging.Logger | logging.LoggerAdapter[logging.Logger]

# A promotion whose process dies while it runs (worker killed mid-execution) is started
# again by the promote deployment's trigger; past this many crashes of one challenger
# it fails instead. A suspended promotion has no process to lose.
MAX_CRASHED_ATTEMPTS = 5


def _flow_run_id() -> str:
    context = get_run_context()
    assert isinstance(context, FlowRunContext) and context.flow_run is not None  # called by a flow, not a task
    return str(context.flow_run.id)


def _check_suspendable() -> None:
    """A clear error before anything is recorded: only a top-level run of a deployment can suspend.

    Prefect reschedules a resumed run through its deployment, and refuses to suspend a subflow.
    """
    context = get_run_context()
    assert isinstance(context, FlowRunContext) and context.flow_run is not None
    run = context.flow_run
    if run.deployment_id is None or run.parent_task_run_id is not None:
        raise RuntimeError(
            f"promote waits for its decision suspended, which needs a top-level run of the "
            f"{PROMOTE_DEPLOYMENT!r} deployment (start it from that deployment, with as_subflow=False)"
        )


@dataclass
class _Promotion:
    """One promotion run's context: what is decided, where it is recorded."""

    model: str
    version: str
    flow_run_id: str
    policy_name: str
    engine: AsyncEngine
    mlflow: MlflowClient
    champion: str | None
    log: RunLogger
    run_id: str | None = None  # the challenger's training run
    description: str = ""

    def record(
        self, decision: Decision, *, approver: str | None = None, comment: str | None = None,
        previous: str | None = None, detail: dict[str, Any] | None = None,
    ) -> ApprovalRecord:
        """Append the audit row of this run's decision."""
        return record_decision(self.engine, ApprovalRecord(
            model=self.model, version=self.version, decision=decision, approver=approver, comment=comment,
            flow_run_id=self.flow_run_id, previous_champion=previous, detail=detail or {},
        ))

    def finish(
        self, decision: Decision, *, state_name: str, message: str, approver: str | None = None,
        comment: str | None = None, previous: str | None = None, tags: dict[str, object] | None = None,
        event: str | None = None, detail: dict[str, Any] | None = None,
    ) -> State:
        """Write the audit row, then tag the version, emit the event, end the run with a named state."""
        rec = self.record(decision, approver=approver, comment=comment, previous=previous, detail=detail)
        return self.announce(rec, state_name=state_name, message=message, tags=tags, event=event)

    def announce(
        self, rec: ApprovalRecord, *, state_name: str, message: str, tags: dict[str, object] | None = None,
        event: str | None = None,
    ) -> State:
        """Tell the registry, the events API and the run page what was recorded; end the run in a named state."""
        decision, approver, comment = rec.decision, rec.approver, rec.comment
        tag_version(self.mlflow, self.model, self.version, {
            "decision": decision, "approver": approver, "comment": comment, "decided_at": rec.decided_at,
            "promotion_run": self.flow_run_id, **(tags or {}),
        })
        outcome = rec.model_dump(mode="json")
        if event:
            emit_event(event=event, resource=model_resource(self.model, self.version), payload=outcome)
        create_markdown_artifact(
            key=artifact_key("promotion", self.model),
            markdown=f"{self.description}\n### Outcome: {state_name}\n\n{message}\n",
            description=f"Promotion of {self.model} version {self.version}: {state_name.lower()}",
        )
        self.log.info("%s version %s: %s (%s)", self.model, self.version, state_name, message)
        return Completed(name=state_name, message=message, data=outcome)

    def superseded(self, newer: str, ignored: ApprovalInput | None = None) -> State:
        reason = superseded_reason(newer)
        detail: dict[str, Any] = {"superseded_by": newer}
        if ignored is not None and ignored.approver != SYSTEM_APPROVER:
            detail["ignored_input"] = ignored.model_dump()
        return self.finish("superseded", state_name="Superseded", message=reason, comment=reason,
                           tags={"superseded_by": newer}, event=MODEL_SUPERSEDED, detail=detail)

    def timed_out(self, timeout_seconds: int, ignored: Answered | None = None) -> State:
        detail: dict[str, Any] = {"outcome": "rejected", "reason": TIMED_OUT_REASON, "timeout_seconds": timeout_seconds}
        if ignored is not None and ignored.answer.approver != SYSTEM_APPROVER:
            # A decision the server took after the deadline: kept, never acted on.
            detail["ignored_input"] = ignored.answer.model_dump() | {"answered_at": ignored.at.isoformat(),
                                                                     "key": ignored.key}
        rec = self.record("timed_out", comment=TIMED_OUT_REASON, previous=self.champion, detail=detail)
        drop_challenger_alias(self.mlflow, self.model, self.version)
        return self.announce(rec, state_name="TimedOut", message=f"rejected: {TIMED_OUT_REASON}",
                             tags={"outcome": "rejected", "reason": TIMED_OUT_REASON}, event=MODEL_REJECTED)

    def refused(self, answered: Answered, reason: str) -> None:
        """Record a decision that cannot be acted on (once: its suspension key is in the row); the run waits on."""
        answer = answered.answer
        self.log.warning("decision refused, still waiting: %s", reason)
        record_decision(self.engine, ApprovalRecord(
            model=self.model, version=self.version, decision="refused", approver=answer.approver.strip(),
            comment=answer.comment.strip() or None, flow_run_id=self.flow_run_id, previous_champion=self.champion,
            detail={"reason": reason, "requested": answer.decision, "key": answered.key},
        ))

    def approved(self, approver: str, comment: str) -> State:
        """Record the approval as intended, move the aliases, then mark it completed."""
        # The champion as it is now, not as the decision page showed it.
        before = champion_version(self.mlflow, self.model)
        intent = self.record(
            "approved", approver=approver, comment=comment or None, previous=before,
            # The drift checks' reference follows the champion: its training run is named
            # here so that consumers of the event need no registry lookup.
            detail={"status": INTENDED, "champion": self.version, "previous": before,
                    "champion_run_id": self.run_id},
        )
        return self.complete_approval(intent)

    def complete_approval(self, intent: ApprovalRecord) -> State:
        """Move ``champion`` as ``intent`` says and mark it completed (also finishes an interrupted one)."""
        previous = promote_to_champion(self.mlflow, self.model, self.version, intent.previous_champion)
        rec = complete_decision(self.engine, intent, previous, {"previous": previous})
        return self.announce(
            rec, state_name="Approved", message=f"approved by {rec.approver}: version {self.version} is champion",
            tags={"previous_champion": previous}, event=MODEL_PROMOTED,
        )

    def rejected(self, approver: str, comment: str) -> State:
        rec = self.record("rejected", approver=approver, comment=comment, previous=self.champion,
                          detail={"outcome": "rejected", "reason": comment, "champion": self.champion})
        drop_challenger_alias(self.mlflow, self.model, self.version)
        return self.announce(rec, state_name="Rejected", message=f"rejected by {approver}: {comment}",
                             tags={"outcome": "rejected", "reason": comment}, event=MODEL_REJECTED)


def _supersede_older(p: _Promotion, wake_wait: float = 30.0) -> str | None:
    """End the model's other open promotions whose challenger is not newer than ours.

    Returns the version of a *newer* open promotion if there is one (then this run
    is the one superseded). An older run (suspended, or resumed and on its way to a
    worker) is marked with a ``superseded-by:N`` tag on its flow run, which it checks
    whenever it acts on an answer or is about to suspend, and then resumed so that it
    ends now rather than at its timeout.
    """
    others = [
        o for o in promotion_runs(p.model, states=OPEN_STATES)
        if o.flow_run_id != p.flow_run_id and o.superseded_by is None
    ]
    newer = newest_above(p.version, [o.version for o in others])
    if newer is not None:
        return newer
    for old in others:
        p.log.info("superseding the promotion of version %s (flow run %s)", old.version, old.flow_run_id)
        add_flow_run_tags(old.flow_run_id, [f"{SUPERSEDED_TAG_PREFIX}{p.version}"])
        if not wake_superseded(old.flow_run_id, p.version, wake_wait):
            p.log.warning("flow run %s did not suspend within %.0fs; it ends when it next checks its tags",
                          old.flow_run_id, wake_wait)
    return None


def _refused_keys(p: _Promotion) -> set[str]:
    """Suspension keys whose answer this run already refused (and recorded)."""
    return {str(r.detail["key"]) for r in recorded_decisions(p.engine, p.model)
            if r.flow_run_id == p.flow_run_id and r.decision == "refused" and "key" in r.detail}


def _decide(p: _Promotion, answered: Answered, deadline: datetime, timeout_seconds: int) -> State | None:
    """The outcome of one answer, or None when it was refused (or was a bare wake-up) and the run waits on."""
    answer = answered.answer
    if (newer := superseded_by(flow_run_tags(p.flow_run_id))) is not None:
        return p.superseded(newer, ignored=answer)
    # Late is judged by when the server took the answer, not when a worker got to it.
    # The timeout run's own answer says why it came, should clocks disagree.
    woken_at_deadline = answer.approver == SYSTEM_APPROVER and answer.comment == TIMED_OUT_REASON
    if answered.at >= deadline or woken_at_deadline:
        return p.timed_out(timeout_seconds, ignored=answered)
    approver, comment = answer.approver.strip(), answer.comment.strip()
    # Read the allowlist as it is now: a name added in the UI while this run
    # waited counts for the next decision.
    refused = refusal_reason(answer, load_block(ApprovalPolicy, p.policy_name).allows(approver), p.policy_name)
    if refused:
        p.refused(answered, refused)
        return None
    if answer.decision == "approve":
        return p.approved(approver, comment)
    return p.rejected(approver, comment)


def _await_decision(p: _Promotion, policy: ApprovalPolicy, deadline: datetime) -> State:
    """Act on the first answer that decides; otherwise suspend (the process ends) until the next one.

    The answers are replayed in the order of their keys on every execution; each
    either was refused already (skipped), or decides now. Only a key never used is
    suspended on, and only before the deadline.
    """
    form = ApprovalInput.with_initial_data(description=p.description)
    while True:
        facts = decision_facts(p.flow_run_id)
        refused = _refused_keys(p)
        n = 1
        while (key := f"{DECISION_KEY_PREFIX}{n}") in facts.used_keys:
            answered = facts.answers.get(key)
            outcome = None
            if answered is not None and key not in refused:
                outcome = _decide(p, answered, deadline, policy.timeout_seconds)
            if outcome is not None:
                return outcome
            n += 1
        if (newer := superseded_by(flow_run_tags(p.flow_run_id))) is not None:
            return p.superseded(newer)
        if datetime.now(UTC) >= deadline:
            return p.timed_out(policy.timeout_seconds)
        p.log.info("suspending until a decision (key %s, deadline %s UTC)", key, f"{deadline:%Y-%m-%d %H:%M:%S}")
        # Raises Pause: the run is Suspended and this process ends. It returns only if
        # the key was used meanwhile, and then the loop reads its answer back.
        suspend_flow_run(wait_for_input=form, key=key, timeout=None)


def _announce_waiting(p: _Promotion, deadline: datetime) -> None:
    """Tell whoever decides, through the notification automations (deployments/notifications.py).

    The payload is the whole message: where to decide (this run's page, where Resume
    is) and the decision page's evidence, so that no automation has to look it up.
    """
    emit_event(event=PROMOTION_WAITING, resource=model_resource(p.model, p.version), payload={
        "model": p.model, "version": p.version, "champion": p.champion, "policy": p.policy_name,
        "deadline": deadline.isoformat(), "decision_url": url_for("flow-run", obj_id=p.flow_run_id),
        "summary": p.description,
    })


def _open(model: str, version: str, policy_block: str, tracking_uri: str) -> _Promotion:
    """Tag this run as the model's promotion and read the registry; a clear error before anyone is asked."""
    _check_suspendable()
    run_id = _flow_run_id()
    add_flow_run_tags(run_id, [PROMOTION_TAG, model_tag(model)])
    mlflow = registry.client(tracking_uri)
    challenger = registry.get_version(mlflow, model, version)
    p = _Promotion(
        model=model, version=version, flow_run_id=run_id, policy_name=policy_block,
        engine=load_block(FabloopDatabase).get_engine(), mlflow=mlflow, champion=champion_version(mlflow, model),
        log=get_run_logger(), run_id=challenger.run_id or None,
    )
    crashed = [r for r in promotion_runs(model, states=("CRASHED",)) if r.version == version]
    if len(crashed) >= MAX_CRASHED_ATTEMPTS:
        # Failed, not Crashed: the deployment's restart trigger does not fire again.
        raise RuntimeError(f"the promotion of {model} version {version} crashed {len(crashed)} times; "
                           "not restarting it again (see those runs' logs)")
    return p


def _interrupted_approval(p: _Promotion) -> ApprovalRecord | None:
    """An approval of this challenger recorded as intended by a run that died before completing it.

    Only the model's latest champion move is completed: an intent that later decisions
    overtook stays as recorded.
    """
    moves = [r for r in recorded_decisions(p.engine, p.model) if r.decision in MOVES_CHAMPION]
    last = moves[-1] if moves else None
    if last is not None and last.decision == "approved" and last.version == p.version and is_intended(last):
        return last
    return None


def _deadline_from_now(policy: ApprovalPolicy) -> datetime:
    return (datetime.now(UTC) + timedelta(seconds=policy.timeout_seconds)).replace(microsecond=0)


def _lay_out(p: _Promotion, deadline: datetime) -> None:
    """Once per run: the deadline on the run, the decision page, the version marked pending, the timeout run
    and the announcement.

    A resumed run finds the ``decide-by:`` tag and lays out nothing again; a run that
    dies before it suspends is not resumed (it is Crashed, and its restart is a new run).
    """
    add_flow_run_tags(p.flow_run_id, [deadline_tag(deadline)])
    create_markdown_artifact(
        key=artifact_key("promotion", p.model), markdown=p.description,
        description=f"Promotion of {p.model} version {p.version}: waiting for a decision",
    )
    tag_version(p.mlflow, p.model, p.version, {"decision": "pending", "promotion_run": p.flow_run_id})
    timeout_run = schedule_timeout(p.flow_run_id, deadline, tags=[model_tag(p.model)])
    p.log.info("without a decision by %s UTC, flow run %s ends this promotion timed out",
               f"{deadline:%Y-%m-%d %H:%M:%S}", timeout_run)
    _announce_waiting(p, deadline)


@flow(name="promote", flow_run_name="promote-{model}-v{challenger_version}", persist_result=True)
def promote(
    model: str,
    challenger_version: str,
    reasons: list[str] | None = None,
    metrics: dict[str, dict[str, float]] | None = None,
    links: dict[str, str] | None = None,
    trigger: dict[str, Any] | None = None,
    policy_block: str = DEFAULT,
) -> dict[str, Any]:
    """Wait, suspended, for a named person to approve or reject ``challenger_version`` of ``model``.

    Must run from the ``promote`` deployment, as a top-level run (Prefect reschedules a
    resumed run through its deployment). Each resume runs this function again from the
    top; see the module docstring for what makes that safe.

    ``metrics`` has keys ``challenger`` and ``champion`` (same holdout, each metric with
    its ``_ci_low``/``_ci_high`` interval and ``n_fail``), and may have ``paired`` (the
    paired DeLong difference, its interval and p-value) and ``cv`` (time-series CV
    estimates); ``links`` may carry ``drift_report`` (the MLflow UI page that renders
    the report), ``drift_check_run`` (its Prefect flow run page), ``retraining_flow_run``,
    ``challenger_run``, ``champion_run``; ``trigger`` (window ids, drift check id, the gate's verdict…) is
    shown as evidence. Returns the audit record of the outcome; the run ends in a state
    named after it.
    """
    challenger_version = str(challenger_version)
    policy = load_block(ApprovalPolicy, policy_block)
    tracking_uri = load_block(MLflowServer).login()
    p = _open(model, challenger_version, policy_block, tracking_uri)
    if (intent := _interrupted_approval(p)) is not None:
        p.log.warning("completing decision #%s (approved by %s), interrupted before the aliases moved",
                      intent.id, intent.approver)
        return p.complete_approval(intent)  # type: ignore[return-value]  # Prefect ends the run in this state
    if p.champion == challenger_version:
        raise ValueError(f"challenger_version: version {challenger_version} of {model!r} is already the champion")
    shown = decision_links(p.mlflow, tracking_uri, model, challenger_version, p.champion, links or {})

    def describe(deadline: datetime) -> str:
        return decision_markdown(
            model=model, challenger=challenger_version, champion=p.champion, reasons=reasons or [],
            metrics=metrics or {}, links=shown, trigger=trigger or {}, policy_name=policy_block, deadline=deadline,
        )

    deadline = decide_by(flow_run_tags(p.flow_run_id))
    if deadline is None:  # the first execution: nothing was laid out yet
        p.description = describe(_deadline_from_now(policy))
        if (newer := _supersede_older(p)) is not None:
            return p.superseded(newer)  # type: ignore[return-value]  # Prefect ends the run in this state
        deadline = _deadline_from_now(policy)
        p.description = describe(deadline)
        _lay_out(p, deadline)
    else:
        p.description = describe(deadline)
    return _await_decision(p, policy, deadline)  # type: ignore[return-value]


def _refuse_rollback(
    engine: AsyncEngine, model: str, current: str | None, approver: str, comment: str, run_id: str, policy_block: str
) -> State:
    """Record a rollback asked for by someone not on the allowlist; the champion stays."""
    reason = f"{approver!r} is not on the approver allowlist of policy {policy_block!r}"
    rec = record_decision(engine, ApprovalRecord(
        model=model, version=current or "-", decision="refused", approver=approver, comment=comment,
        flow_run_id=run_id, previous_champion=current, detail={"reason": reason, "requested": "rollback"},
    ))
    get_run_logger().warning("rollback refused: %s", reason)
    return Completed(name="Refused", message=reason, data=rec.model_dump(mode="json"))


@flow(name="rollback", flow_run_name="rollback-{model}")
def rollback(model: str, approver: str, comment: str, policy_block: str = DEFAULT) -> dict[str, Any]:
    """Move ``champion`` back to the ``previous`` version, by a named person, with a reason."""
    log = get_run_logger()
    run_id = _flow_run_id()
    add_flow_run_tags(run_id, [ROLLBACK_TAG, model_tag(model)])
    approver, comment = approver.strip(), comment.strip()
    if not comment:
        raise ValueError("comment: a comment is required to roll back")
    policy = load_block(ApprovalPolicy, policy_block)
    engine = load_block(FabloopDatabase).get_engine()
    mlflow = registry.client(load_block(MLflowServer).login())
    current = champion_version(mlflow, model)
    if not policy.allows(approver):
        return _refuse_rollback(engine, model, current, approver, comment, run_id, policy_block)  # type: ignore[return-value]
    restored = registry.aliases(mlflow, model).get(PREVIOUS)
    if current is None or restored is None:
        raise registry.RegistryError(f"model {model!r} needs both {CHAMPION!r} and {PREVIOUS!r} to roll back")
    # Recorded as intended before any alias moves, completed after (see the module docstring).
    intent = record_decision(engine, ApprovalRecord(
        model=model, version=current, decision="rolled_back", approver=approver, comment=comment,
        flow_run_id=run_id, previous_champion=current,
        detail={"status": INTENDED, "champion": restored, "demoted": current},
    ))
    demoted, restored = rollback_champion(mlflow, model, (current, restored))
    rec = complete_decision(engine, intent, demoted)
    tag_version(mlflow, model, demoted, {
        "decision": "rolled_back", "approver": approver, "comment": comment, "decided_at": rec.decided_at,
        "rollback_run": run_id, "rolled_back_to": restored,
    })
    outcome = rec.model_dump(mode="json")
    emit_event(event=MODEL_ROLLED_BACK, resource=model_resource(model, restored), payload=outcome)
    message = f"rolled back by {approver}: version {restored} is champion again (was {demoted})"
    log.info(message)
    return Completed(name="RolledBack", message=message, data=outcome)  # type: ignore[return-value]


if __name__ == "__main__":
    promote(model=sys.argv[1], challenger_version=sys.argv[2])
