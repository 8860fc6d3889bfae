"""Human-approved promotion: a challenger becomes champion only by a named person's decision.

``promote`` is started (as a subflow) by the retraining gate once the challenger
version carries the ``challenger`` alias. It lays out the decision (metrics table,
reasons, links) as a Markdown artifact and as the description of the Resume form,
then pauses until someone resumes it from the Prefect UI or with ``fabloop approve``
/ ``fabloop reject``. Every outcome is written to the version's tags, the
approvals table and a ``fabloop.model.*`` Prefect event:

- approved: ``champion`` moves to the challenger, the replaced champion keeps ``previous``;
- rejected (comment required) or timed out: the champion is untouched;
- refused (approver not on the policy's allowlist, or a blank rejection): recorded,
  and the run keeps waiting for the rest of its timeout;
- superseded: a newer challenger of the same model started its own promotion.

``rollback`` moves ``champion`` back to ``previous``, audited the same way.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from prefect.events import emit_event
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.states import Completed, State

from fabloop.blocks import DEFAULT, ApprovalPolicy, FabloopDatabase, MLflowServer
from fabloop.adapters import registry
from fabloop.adapters.prefect_api import (
    ApprovalInput,
    ResumeRefused,
    add_flow_run_tags,
    flow_run_tags,
    promotion_runs,
    resume_promotion,
)
from fabloop.adapters.store.approvals import record_decision
from fabloop.core.approval import ApprovalRecord, Decision, decision_markdown, refusal_reason, superseded_by
from fabloop.core.names import PROMOTION_TAG, SUPERSEDED_TAG_PREFIX, SYSTEM_APPROVER, model_resource, model_tag

if TYPE_CHECKING:
    from mlflow import MlflowClient

PROMOTED = "fabloop.model.promoted"
REJECTED = "fabloop.model.rejected"
SUPERSEDED = "fabloop.model.superseded"
ROLLED_BACK = "fabloop.model.rolled_back"
TIMED_OUT_REASON = "approval timed out"
ROLLBACK_TAG = "fabloop.rollback"


def _version_key(version: str) -> int:
    return int(version) if str(version).isdigit() else -1


def _artifact_key(model: str) -> str:
    return "promotion-" + re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")


@dataclass
class _Promotion:
    """One promotion run's context: what is decided, where it is recorded."""

    model: str
    version: str
    flow_run_id: str
    policy_name: str
    database_url: str
    mlflow: MlflowClient
    champion: str | None
    run_id: str | None = None  # the challenger's training run
    description: str = ""
    log: Any = field(default=None)

    def finish(
        self, decision: Decision, *, state_name: str, message: str, approver: str | None = None,
        comment: str | None = None, previous: str | None = None, tags: dict[str, object] | None = None,
        event: str | None = None, detail: dict[str, Any] | None = None,
    ) -> State:
        """Tag the version, write the audit row, emit the event, end the run with a named state."""
        rec = record_decision(self.database_url, ApprovalRecord(
            model=self.model, version=self.version, decision=decision, approver=approver, comment=comment,
            flow_run_id=self.flow_run_id, previous_champion=previous, detail=detail or {},
        ))
        registry.set_tags(self.mlflow, self.model, self.version, {
            "decision": decision, "approver": approver, "comment": comment, "decided_at": rec.decided_at,
            "promotion_run": self.flow_run_id, **(tags or {}),
        })
        outcome = rec.model_dump(mode="json")
        if event:
            emit_event(event=event, resource=model_resource(self.model, self.version), payload=outcome)
        create_markdown_artifact(
            key=_artifact_key(self.model),
            markdown=f"{self.description}\n### Outcome: {state_name}\n\n{message}\n",
            description=f"Promotion of {self.model} version {self.version}: {state_name.lower()}",
        )
        self.log.info("%s version %s: %s (%s)", self.model, self.version, state_name, message)
        return Completed(name=state_name, message=message, data=outcome)

    def superseded(self, newer: str, ignored: ApprovalInput | None = None) -> State:
        reason = f"superseded by version {newer}"
        detail: dict[str, Any] = {"superseded_by": newer}
        if ignored is not None and ignored.approver != SYSTEM_APPROVER:
            detail["ignored_input"] = ignored.model_dump()
        return self.finish("superseded", state_name="Superseded", message=reason, comment=reason,
                           tags={"superseded_by": newer}, event=SUPERSEDED, detail=detail)


def _supersede_older(p: _Promotion, wake_wait: float = 30.0) -> str | None:
    """End the model's other open promotions whose challenger is not newer than ours.

    Returns the version of a *newer* open promotion if there is one (then this run
    is the one superseded). An older run is marked with a ``superseded-by:N`` tag on
    its flow run, which it checks whenever it wakes or is about to wait, and then
    resumed so that it wakes now rather than at its timeout.
    """
    others = [
        o for o in promotion_runs(p.model, states=("PENDING", "RUNNING", "PAUSED"))
        if o.flow_run_id != p.flow_run_id and o.superseded_by is None
    ]
    newer = [o.version for o in others if _version_key(o.version) > _version_key(p.version)]
    if newer:
        return max(newer, key=_version_key)
    for old in others:
        p.log.info("superseding the promotion of version %s (flow run %s)", old.version, old.flow_run_id)
        add_flow_run_tags(old.flow_run_id, [f"{SUPERSEDED_TAG_PREFIX}{p.version}"])
        _wake(old.flow_run_id, p.version, wake_wait, p.log)
    return None


def _wake(flow_run_id: str, version: str, wait: float, log: Any) -> None:
    """Resume a superseded run once it is paused (it may still be preparing its form)."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + wait
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(flow_run_id).state
            if state is None or state.is_final():
                return
            if state.is_paused():
                try:
                    resume_promotion(flow_run_id, "reject", SYSTEM_APPROVER, f"superseded by version {version}")
                    return
                except ResumeRefused:
                    pass  # resumed by someone else meanwhile: it will see its tag when it wakes
            if time.monotonic() > deadline:
                log.warning("flow run %s did not pause within %.0fs; it ends when it next checks its tags",
                            flow_run_id, wait)
                return
            time.sleep(1.0)


def _reclaim_expired_pause(flow_run_id: str) -> None:
    """Take the run back from its expired pause so that it can record the timeout and complete.

    The server refuses every transition out of an expired pause (it turns them into
    Failed), which would make an ordinary outcome look like a crash to the parent
    retraining run; the forced Running state is what a resume would have set.
    """
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Running(message=TIMED_OUT_REASON), force=True)


def _links(p: _Promotion, tracking_uri: str, given: dict[str, str]) -> dict[str, str]:
    """Model version pages and training runs of both versions; links given by the caller win."""
    out: dict[str, str] = {}
    versions = {"challenger": p.version} | ({"champion": p.champion} if p.champion else {})
    for role, version in versions.items():
        out[f"{role}_version"] = registry.version_url(tracking_uri, p.model, version)
        info = registry.describe(p.mlflow, p.model, version)
        if info.run_id and info.experiment_id:
            out[f"{role}_run"] = registry.run_url(tracking_uri, info.experiment_id, info.run_id)
    return out | {k: v for k, v in given.items() if v}


@flow(name="promote", flow_run_name="promote-{model}-v{challenger_version}")
def promote(
    model: str,
    challenger_version: str,
    reasons: list[str] | None = None,
    metrics: dict[str, dict[str, float]] | None = None,
    links: dict[str, str] | None = None,
    trigger: dict[str, Any] | None = None,
    policy_block: str = DEFAULT,
) -> dict[str, Any]:
    """Wait for a named person to approve or reject ``challenger_version`` of ``model``.

    ``metrics`` has keys ``challenger`` and ``champion`` (same holdout); ``links`` may
    carry ``drift_report``, ``drift_check_run``, ``challenger_run``, ``champion_run``;
    ``trigger`` (window ids, drift check id…) is shown as evidence. Returns the audit
    record of the outcome; the run ends in a state named after it.
    """
    log = get_run_logger()
    run_id = str(get_run_context().flow_run.id)
    challenger_version = str(challenger_version)
    policy = ApprovalPolicy.load(policy_block)
    tracking_uri = MLflowServer.load(DEFAULT).tracking_uri
    add_flow_run_tags(run_id, [PROMOTION_TAG, model_tag(model)])
    mlflow = registry.client(tracking_uri)
    challenger = registry.get_version(mlflow, model, challenger_version)  # a clear error before anyone is asked
    p = _Promotion(
        model=model, version=challenger_version, flow_run_id=run_id, policy_name=policy_block,
        database_url=FabloopDatabase.load(DEFAULT).sqlalchemy_url(), mlflow=mlflow,
        champion=registry.alias_version(mlflow, model, registry.CHAMPION), run_id=challenger.run_id or None, log=log,
    )
    if p.champion == challenger_version:
        raise ValueError(f"challenger_version: version {challenger_version} of {model!r} is already the champion")

    deadline = datetime.now(UTC) + timedelta(seconds=policy.timeout_seconds)
    p.description = decision_markdown(
        model=model, challenger=challenger_version, champion=p.champion, reasons=reasons or [],
        metrics=metrics or {}, links=_links(p, tracking_uri, links or {}), trigger=trigger or {},
        policy_name=policy_block, deadline=deadline,
    )
    newer = _supersede_older(p)
    if newer is not None:
        return p.superseded(newer)
    create_markdown_artifact(
        key=_artifact_key(model), markdown=p.description,
        description=f"Promotion of {model} version {challenger_version}: waiting for a decision",
    )
    registry.set_tags(mlflow, model, challenger_version, {"decision": "pending", "promotion_run": run_id})
    form = ApprovalInput.with_initial_data(description=p.description)
    ends = time.monotonic() + policy.timeout_seconds

    while True:
        if (newer := superseded_by(flow_run_tags(run_id))) is not None:
            return p.superseded(newer)
        remaining = ends - time.monotonic()
        if remaining < 1:
            registry.drop_alias_if_on(mlflow, model, registry.CHALLENGER, challenger_version)
            return p.finish(
                "timed_out", state_name="TimedOut", message=f"rejected: {TIMED_OUT_REASON}", comment=TIMED_OUT_REASON,
                tags={"outcome": "rejected", "reason": TIMED_OUT_REASON}, event=REJECTED,
                detail={"outcome": "rejected", "reason": TIMED_OUT_REASON, "timeout_seconds": policy.timeout_seconds},
            )
        try:
            answer = pause_flow_run(
                wait_for_input=form, timeout=math.ceil(remaining),
                poll_interval=max(1, min(policy.poll_seconds, math.ceil(remaining))),
            )
        except FlowPauseTimeout:
            _reclaim_expired_pause(run_id)
            continue
        if (newer := superseded_by(flow_run_tags(run_id))) is not None:
            return p.superseded(newer, ignored=answer)
        approver, comment = answer.approver.strip(), answer.comment.strip()
        # Read the allowlist as it is now: a name added in the UI while this run
        # waited counts for the next decision.
        refused = refusal_reason(answer, ApprovalPolicy.load(policy_block).allows(approver), policy_block)
        if refused:
            log.warning("decision refused, still waiting: %s", refused)
            record_decision(p.database_url, ApprovalRecord(
                model=model, version=challenger_version, decision="refused", approver=approver, comment=comment or None,
                flow_run_id=run_id, previous_champion=p.champion,
                detail={"reason": refused, "requested": answer.decision},
            ))
            continue
        if answer.decision == "approve":
            previous = registry.promote_to_champion(mlflow, model, challenger_version)
            return p.finish(
                "approved", state_name="Approved", message=f"approved by {approver}: version {challenger_version} is champion",
                approver=approver, comment=comment or None, previous=previous,
                tags={"previous_champion": previous}, event=PROMOTED,
                # The drift checks' reference follows the champion: its training run is named
                # here so that consumers of the event need no registry lookup.
                detail={"champion": challenger_version, "previous": previous, "champion_run_id": p.run_id},
            )
        registry.drop_alias_if_on(mlflow, model, registry.CHALLENGER, challenger_version)
        return p.finish(
            "rejected", state_name="Rejected", message=f"rejected by {approver}: {comment}", approver=approver,
            comment=comment, previous=p.champion, tags={"outcome": "rejected", "reason": comment}, event=REJECTED,
            detail={"outcome": "rejected", "reason": comment, "champion": p.champion},
        )


@flow(name="rollback", flow_run_name="rollback-{model}")
def rollback(model: str, approver: str, comment: str, policy_block: str = DEFAULT) -> dict[str, Any]:
    """Move ``champion`` back to the ``previous`` version, by a named person, with a reason."""
    log = get_run_logger()
    run_id = str(get_run_context().flow_run.id)
    add_flow_run_tags(run_id, [ROLLBACK_TAG, model_tag(model)])
    approver, comment = approver.strip(), comment.strip()
    if not comment:
        raise ValueError("comment: a comment is required to roll back")
    policy = ApprovalPolicy.load(policy_block)
    database_url = FabloopDatabase.load(DEFAULT).sqlalchemy_url()
    mlflow = registry.client(MLflowServer.load(DEFAULT).tracking_uri)
    current = registry.alias_version(mlflow, model, registry.CHAMPION)
    if not policy.allows(approver):
        reason = f"{approver!r} is not on the approver allowlist of policy {policy_block!r}"
        rec = record_decision(database_url, ApprovalRecord(
            model=model, version=current or "-", decision="refused", approver=approver, comment=comment,
            flow_run_id=run_id, previous_champion=current, detail={"reason": reason, "requested": "rollback"},
        ))
        log.warning("rollback refused: %s", reason)
        return Completed(name="Refused", message=reason, data=rec.model_dump(mode="json"))
    demoted, restored = registry.rollback_champion(mlflow, model)
    rec = record_decision(database_url, ApprovalRecord(
        model=model, version=demoted, decision="rolled_back", approver=approver, comment=comment,
        flow_run_id=run_id, previous_champion=demoted, detail={"champion": restored, "demoted": demoted},
    ))
    registry.set_tags(mlflow, model, demoted, {
        "decision": "rolled_back", "approver": approver, "comment": comment, "decided_at": rec.decided_at,
        "rollback_run": run_id, "rolled_back_to": restored,
    })
    outcome = rec.model_dump(mode="json")
    emit_event(event=ROLLED_BACK, resource=model_resource(model, restored), payload=outcome)
    message = f"rolled back by {approver}: version {restored} is champion again (was {demoted})"
    log.info(message)
    return Completed(name="RolledBack", message=message, data=outcome)


if __name__ == "__main__":
    import sys

    promote(model=sys.argv[1], challenger_version=sys.argv[2])
