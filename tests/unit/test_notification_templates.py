"""The notification messages as the Prefect server renders them (its own Jinja sandbox and filters).

The templates are plain strings until an automation fires on a running server; these
tests render them with the renderer and context objects the server's send-notification
action uses, for the payloads the flows emit. End to end: tests/integration/test_notifications.py.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import EventTrigger
from prefect.server.events.jinja_filters import all_filters
from prefect.server.events.schemas.events import ReceivedEvent
from prefect.server.schemas.responses import FlowRunResponse
from prefect.server.utilities.user_templates import register_user_template_filters, render_user_template
from prefect.settings import PREFECT_UI_URL, temporary_settings

from fabloop.core import names
from fabloop.deployments import notifications as n

UI = "http://prefect.fab.example"


def render(template: str, **context: Any) -> str:
    register_user_template_filters(all_filters)  # what the server's action does before rendering
    with temporary_settings(updates={PREFECT_UI_URL: UI}):
        return asyncio.run(render_user_template(template, context))


def event(name: str, payload: dict[str, Any], version: str) -> ReceivedEvent:
    return ReceivedEvent(id=uuid4(), event=name, resource=names.model_resource("yield-ETCH-01", version),
                         payload=payload, occurred=datetime.now(UTC))


def test_a_waiting_promotion_names_the_version_the_decision_link_and_the_evidence() -> None:
    ev = event(names.PROMOTION_WAITING, {
        "model": "yield-ETCH-01", "version": "7", "champion": "5", "deadline": "2026-12-05T10:00:00+00:00",
        "decision_url": f"{UI}/runs/flow-run/abc", "summary": "## Promote `yield-ETCH-01` version 7?\n| roc_auc |",
    }, "7")
    assert render(n.WAITING_SUBJECT, event=ev) == "fabloop: yield-ETCH-01 version 7 waits for a decision"
    body = render(n.WAITING_BODY, event=ev)
    assert "(champion: version 5)" in body and f"Decide (Resume): {UI}/runs/flow-run/abc\n" in body
    assert "fabloop approve yield-ETCH-01 --version 7 --as NAME" in body and "2026-12-05T10:00:00+00:00" in body
    assert body.endswith("## Promote `yield-ETCH-01` version 7?\n| roc_auc |")
    first = render(n.WAITING_BODY, event=event(names.PROMOTION_WAITING, {**ev.payload, "champion": None}, "7"))
    assert "(champion: none yet)" in first


@pytest.mark.parametrize(("parameters", "expected", "absent"), [
    ({"model": "yield-ETCH-01", "reasons": ["feature drift on 12 of 40 sensors"], "window_ids": [41],
      "drift_check_id": 42, "trigger_id": 3},
     ["A drift breach started a retraining of yield-ETCH-01.", "Why: feature drift on 12 of 40 sensors\n",
      "Windows: 41\n", "Drift check: 42\n"], []),
    ({"model": "yield-ETCH-01", "reasons": ["scheduled weekly retraining"]},
     ["A retraining of yield-ETCH-01 started.", "Why: scheduled weekly retraining\n"], ["Windows", "Drift check"]),
])
def test_a_retraining_names_its_model_its_reasons_and_its_run(
    parameters: dict[str, Any], expected: list[str], absent: list[str]
) -> None:
    run = FlowRunResponse(id=uuid4(), flow_id=uuid4(), labels={}, name="brave-otter", parameters=parameters)
    assert render(n.RETRAINING_SUBJECT, flow_run=run) == "fabloop: retraining yield-ETCH-01"
    body = render(n.RETRAINING_BODY, flow_run=run)
    for text in expected:
        assert text in body, body
    for text in absent:
        assert text not in body, body
    assert body.endswith(f"Run: {UI}/runs/flow-run/{run.id}")


def test_a_champion_change_says_who_moved_it_from_which_version_to_which() -> None:
    approved = event(names.MODEL_PROMOTED, {
        "model": "yield-ETCH-01", "version": "7", "decision": "approved", "approver": "Alice",
        "comment": "better recall", "previous_champion": "5", "decided_at": "2026-12-02T23:40:00+00:00",
        "detail": {"status": "completed", "champion": "7", "previous": "5"},
    }, "7")
    run = FlowRunResponse(id=uuid4(), flow_id=uuid4(), labels={}, name="promote-yield-ETCH-01-v7")
    assert render(n.CHAMPION_SUBJECT, event=approved) == "fabloop: yield-ETCH-01 champion is now version 7"
    body = render(n.CHAMPION_BODY, event=approved, flow_run=run)
    assert body.startswith("Approved by Alice: the champion of yield-ETCH-01 is now version 7 (was version 5).\n")
    assert "Comment: better recall\n" in body and body.endswith(f"Run: {UI}/runs/flow-run/{run.id}")

    rolled_back = event(names.MODEL_ROLLED_BACK, {
        "model": "yield-ETCH-01", "version": "7", "decision": "rolled_back", "approver": "Bob",
        "comment": "scrap spike", "previous_champion": "7", "decided_at": "2026-12-03T08:00:00+00:00",
        "detail": {"status": "completed", "champion": "5", "demoted": "7"},
    }, "5")
    body = render(n.CHAMPION_BODY, event=rolled_back, flow_run=None)
    assert body.startswith("Rolled back by Bob: the champion of yield-ETCH-01 is now version 5 (was version 7).\n")
    assert "Run:" not in body

    first = event(names.MODEL_PROMOTED, {**approved.payload, "previous_champion": None,
                                         "detail": {"status": "completed", "champion": "1", "previous": None}}, "1")
    assert "is now version 1 (was none)." in render(n.CHAMPION_BODY, event=first)


def test_the_automations_send_through_every_block_of_the_name() -> None:
    blocks = [n.NotifyBlock(uuid4(), "fabloop-notify", "Slack Webhook"),
              n.NotifyBlock(uuid4(), "fabloop-notify", "Custom Webhook")]
    autos = {a.name: a for a in n.notification_automations(blocks)}
    assert set(autos) == set(n.AUTOMATIONS)
    for auto in autos.values():
        assert all(isinstance(a, SendNotification) for a in auto.actions)
        assert [a.block_document_id for a in auto.actions if isinstance(a, SendNotification)] == [b.id for b in blocks]
    triggers = {name: auto.trigger for name, auto in autos.items()}
    assert all(isinstance(t, EventTrigger) for t in triggers.values())
    waiting, retraining, champion = (triggers[name] for name in n.AUTOMATIONS)
    assert isinstance(waiting, EventTrigger) and isinstance(retraining, EventTrigger)
    assert isinstance(champion, EventTrigger)
    assert waiting.expect == {names.PROMOTION_WAITING}
    assert champion.expect == {names.MODEL_PROMOTED, names.MODEL_ROLLED_BACK}
    assert retraining.expect == {"prefect.flow-run.Running"}
    assert retraining.match_related.model_dump() == {  # type: ignore[union-attr]  # a spec or a list of them
        "prefect.resource.role": "deployment", "prefect.resource.name": "retrain"}
