"""The retrain flow: event store → gated training set → Optuna/LightGBM → MLflow → gate.

Started by a drift check (as its child run), on a schedule, or by hand from the UI
with just a model name. Every step that can refuse does so loudly: a refused data
gate ends the run ``Completed`` in the state ``Refused`` (a decision, not a crash),
registers nothing, emits ``fabloop.retrain.rejected`` and publishes what to change
(the RetrainPolicy block's field, or the data); it counts toward the cooldown like
any retraining. A challenger that loses to the champion is registered but tagged
rejected, and production does not change. An unreachable MLflow, database or
Prefect fails the run (after the tasks' retries) and decides nothing.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from prefect import flow, get_run_logger
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.events import emit_event
from prefect.runtime import flow_run
from prefect.states import Completed, State
from prefect.utilities.urls import url_for
from sqlalchemy.ext.asyncio import AsyncEngine

from fabloop.adapters import registry, store
from fabloop.blocks import DEFAULT, FabloopDatabase, MLflowServer, ModelCatalog, RetrainPolicyBlock, load_block
from fabloop.core.names import CHALLENGER_REGISTERED, CHALLENGER_REJECTED, PROMOTE_DEPLOYMENT, model_resource
from fabloop.core.policies import RetrainPolicy
from fabloop.core.scopes import ModelCatalogValue
from fabloop.core.training import DataGateError, data_hash
from fabloop.core.validation import GateVerdict, judge_challenger
from fabloop.tasks.retraining import (
    Training,
    TrainingSet,
    challenger_links,
    data_gate,
    drift_evidence_links,
    find_scope,
    finish_trigger,
    gate_metrics,
    lineage_tags,
    load_training_set,
    publish_challenger,
    refuse,
    register_challenger,
    remedy_text,
    set_challenger_alias,
    tag_validation,
    train_challenger,
)

# The name of the Completed state of a retraining the data gate refused.
REFUSED = "Refused"


@flow(name="retrain", log_prints=True)
def retrain(
    model: str,
    reasons: list[str] | None = None,
    window_ids: list[int] | None = None,
    drift_check_id: int | None = None,
    trigger_id: int | None = None,
    policy_block: str = DEFAULT,
    catalog_block: str = DEFAULT,
    promotion: str = "deployment",
) -> dict[str, Any] | State[dict[str, Any]]:
    """Retrain ``model`` on its scope's labelled wafers and offer the result as challenger.

    ``promotion``: ``deployment`` starts a run of the ``promote`` deployment (the
    approval waits there, suspended; the summary's ``promote_flow_run`` names it and its
    decision page links back here); ``off`` stops after the challenger gate.
    Returns the summary, or for a refused training set a ``Completed`` state named
    ``Refused`` whose result says why.
    """
    reasons = reasons or ["manual"]
    window_ids = window_ids or []
    database = load_block(FabloopDatabase)
    engine = database.get_engine()
    tracking_uri = load_block(MLflowServer).login()
    policy = load_block(RetrainPolicyBlock, policy_block).policy
    catalog = load_block(ModelCatalog, catalog_block).value()
    outcome = "failed"
    try:
        try:
            training_set = _training_set(engine, catalog, policy, policy_block, model, reasons, window_ids)
        except DataGateError as exc:
            outcome = "refused"  # the data gate said no: nothing was registered
            remedy = remedy_text(str(exc), policy_block)
            get_run_logger().warning("retraining of %s refused by the data gate: %s; %s", model, exc, remedy)
            return Completed(name=REFUSED, message=f"refused by the data gate: {exc}; {remedy}",
                             data={"model": model, "refused": str(exc), "policy_block": policy_block,
                                   "remedy": remedy})
        tags = lineage_tags(engine, model, reasons, window_ids, training_set.digest, drift_check_id)
        client = registry.client(tracking_uri)
        training = train_challenger(client, model, training_set, tags, policy,
                                    store.optuna_storage(database.sqlalchemy_url()))
        version = register_challenger(model, training.model_uri, tags)
        set_challenger_alias(client, model, version)
        verdict = judge_challenger(training.challenger, training.champion, policy, paired=training.paired,
                                   challenger_cv=training.challenger_cv, champion_cv=training.champion_cv)
        tag_validation(client, model, version, verdict, training.champion_version)
        links = challenger_links(client, tracking_uri, model, training, version)
        links |= drift_evidence_links(client, tracking_uri, model, window_ids, drift_check_id)
        summary = _summary(model, version, training, verdict, links, training_set)
        summary["metrics"] = gate_metrics(training, verdict)
        publish_challenger(model, version, reasons, verdict, training, links, training_set.gate.dropped_markdown())
        _announce(model, version, verdict, training.challenger)
        if verdict.passed and promotion == "deployment":
            summary["promote_flow_run"] = _start_promotion(summary, reasons, window_ids, drift_check_id)
        outcome = "challenger" if verdict.passed else "rejected"
        return summary
    finally:
        if trigger_id is not None:
            finish_trigger(engine, trigger_id, outcome)


def _training_set(
    engine: AsyncEngine, catalog: ModelCatalogValue, policy: RetrainPolicy, policy_block: str, model: str,
    reasons: list[str], window_ids: list[int],
) -> TrainingSet:
    """The scope's labelled wafers through the data gate; a refusal is published, then raised."""
    logger = get_run_logger()
    spec, scope = find_scope(engine, catalog, model)
    frame: pd.DataFrame = load_training_set(engine, spec, scope)  # pandas is untyped: a DataFrame task looks async
    logger.info("training set for %s (%s): %d labelled wafers", model, scope, len(frame))
    try:
        gate, split = data_gate(frame, policy)
    except DataGateError as exc:
        refuse(model, str(exc), reasons, window_ids, len(frame), policy_block)
        raise
    if gate.n_dropped:
        logger.info("%s: %s", gate.dropped_summary(),
                    "; ".join(f"{sensor!r} {why}" for sensor, why in gate.dropped().items()))
    digest = data_hash(frame[["event_id", "ts", *gate.features, store.LABEL]])
    return TrainingSet(scope=scope, frame=frame, gate=gate, split=split, digest=digest)


def _summary(
    model: str, version: str, training: Training, verdict: GateVerdict, links: dict[str, str],
    training_set: TrainingSet,
) -> dict[str, Any]:
    """The flow run's return value: what was trained, how it scored, what the gate said, where to look."""
    return {
        "model": model, "version": version, "run_id": training.run_id, "winner": training.search.winner,
        "challenger": training.challenger, "champion": training.champion,
        "champion_version": training.champion_version, "champion_note": training.champion_note,
        "gate": verdict.model_dump(), "links": links, "dropped_constant": training_set.gate.dropped_constant,
        "dropped_missing": training_set.gate.dropped_missing,
        "rows": len(training_set.frame), "study": training.search.study_name,
    }


def _announce(model: str, version: str, verdict: GateVerdict, challenger: dict[str, float]) -> None:
    """The gate's verdict as an event: automations and the promotion listen to these."""
    if not verdict.passed:
        get_run_logger().warning("challenger v%s rejected: %s", version, verdict.summary())
        emit_event(event=CHALLENGER_REJECTED, resource=model_resource(model),
                   payload={"version": version, "reasons": verdict.reasons})
        return
    emit_event(event=CHALLENGER_REGISTERED, resource=model_resource(model),
               payload={"version": version, "metrics": challenger})


def _start_promotion(
    summary: dict[str, Any], reasons: list[str], window_ids: list[int], drift_check_id: int | None,
) -> str:
    """Start a run of ``promote`` (it suspends until approved); returns its flow run id.

    Not a subflow: Prefect suspends only top-level runs. The link between the two runs
    is this run's page on the decision page and the promotion's id in this run's result.
    """
    model, version = summary["model"], summary["version"]
    gate = GateVerdict(**summary["gate"]).summary()
    links = dict(summary["links"])
    retraining = flow_run.get_id()
    if retraining and (page := url_for("flow-run", obj_id=retraining)):
        links["retraining_flow_run"] = page
    child = run_deployment(
        PROMOTE_DEPLOYMENT, timeout=0, as_subflow=False,
        parameters={"model": model, "challenger_version": str(version), "reasons": reasons,
                    "metrics": summary["metrics"],
                    "links": links, "trigger": {"window_ids": window_ids, "drift_check_id": drift_check_id,
                                                "retrain_flow_run": retraining,
                                                "challenger_training_run": summary.get("run_id"),
                                                "challenger_gate": gate}},
    )
    assert isinstance(child, FlowRun)  # run_deployment is typed maybe-a-coroutine; a sync flow gets the run
    get_run_logger().info("promotion of v%s awaiting approval: flow run %s %s", version, child.id,
                          url_for("flow-run", obj_id=child.id) or "")
    return str(child.id)

