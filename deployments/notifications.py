"""Notification automations: someone is told when a promotion waits, a breach starts a
retraining, or a champion changes.

Messages go through a Prefect notification block the user saves in the UI (Blocks →
Custom Webhook, Slack Webhook, Microsoft Teams Webhook, Email, …) under the name
``fabloop-notify`` (or ``fabloop deploy --notify-block NAME``, ``FABLOOP_NOTIFY_BLOCK``).
Every notification block of that name gets each message. ``prefect.yaml`` cannot hold
these automations: a send-notification action names its block by document id, which
exists only once the user has saved the block. ``deploy`` creates or updates them; with
no such block it removes them, and notifications are off.

The message bodies are Jinja templates Prefect renders when the automation fires, from
the triggering event (``event``) and the flow run it concerns (``flow_run``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectNotFound

from fabloop.core.names import (
    MODEL_PROMOTED,
    MODEL_ROLLED_BACK,
    PROMOTION_WAITING,
    RETRAIN_DEPLOYMENT,
    model_resource,
)
from fabloop.infra.bootstrap import prefect_api
from fabloop.infra.settings import StackEndpoints

NOTIFY_BLOCK = "fabloop-notify"
NOTIFY_BLOCK_VAR = "FABLOOP_NOTIFY_BLOCK"

PROMOTION_WAITING_AUTOMATION = "notify: a promotion waits for a decision"
RETRAINING_AUTOMATION = "notify: a retraining started"
CHAMPION_AUTOMATION = "notify: the champion changed"
AUTOMATIONS = (PROMOTION_WAITING_AUTOMATION, RETRAINING_AUTOMATION, CHAMPION_AUTOMATION)

# --- message templates (rendered by the Prefect server; tests/unit/test_notification_templates.py) ---

WAITING_SUBJECT = "fabloop: {{ event.payload.model }} version {{ event.payload.version }} waits for a decision"
WAITING_BODY = (
    "Version {{ event.payload.version }} of {{ event.payload.model }} waits for a named person's decision "
    "(champion: {{ ('version ' ~ event.payload.champion) if event.payload.champion else 'none yet' }}).\n"
    "Decide (Resume): {{ event.payload.decision_url }}\n"
    "or: fabloop approve {{ event.payload.model }} --version {{ event.payload.version }} --as NAME\n"
    "Without a decision by {{ event.payload.deadline }} it is rejected (timed out).\n\n"
    "{{ event.payload.summary }}"
)

RETRAINING_SUBJECT = "fabloop: retraining {{ flow_run.parameters.model }}"
RETRAINING_BODY = (
    "{% set p = flow_run.parameters %}"
    "{% if p.get('drift_check_id') is not none %}A drift breach started a retraining of {{ p.model }}."
    "{% else %}A retraining of {{ p.model }} started.{% endif %}\n"
    "Why: {{ (p.get('reasons') or ['manual']) | join('; ') }}\n"
    "{% if p.get('window_ids') %}Windows: {{ p.window_ids | join(', ') }}\n{% endif %}"
    "{% if p.get('drift_check_id') is not none %}Drift check: {{ p.drift_check_id }}\n{% endif %}"
    "Run: {{ flow_run | ui_url }}"
)

CHAMPION_SUBJECT = "fabloop: {{ event.payload.model }} champion is now version {{ event.payload.detail.champion }}"
CHAMPION_BODY = (
    "{% set d = event.payload.detail %}"
    "{% if event.event == '" + MODEL_ROLLED_BACK + "' %}Rolled back{% else %}Approved{% endif %}"
    " by {{ event.payload.approver }}: the champion of {{ event.payload.model }} is now version {{ d.champion }}"
    " (was {{ ('version ' ~ (d.get('previous') or d.get('demoted'))) if (d.get('previous') or d.get('demoted'))"
    " else 'none' }}).\n"
    "{% if event.payload.comment %}Comment: {{ event.payload.comment }}\n{% endif %}"
    "Decided at: {{ event.payload.decided_at }}\n"
    "{% if flow_run %}Run: {{ flow_run | ui_url }}{% endif %}"
)


@dataclass(frozen=True)
class NotifyBlock:
    """A saved notification block messages are sent through."""

    id: UUID
    name: str
    block_type: str


def notify_block_name(name: str | None = None) -> str:
    """The block name asked for, else ``FABLOOP_NOTIFY_BLOCK``, else ``fabloop-notify``."""
    return name or os.environ.get(NOTIFY_BLOCK_VAR) or NOTIFY_BLOCK


def notification_blocks(client: SyncPrefectClient, name: str) -> list[NotifyBlock]:
    """Every saved block named ``name`` whose type can notify (one per block type at most)."""
    body: dict[str, Any] = {
        "block_documents": {"name": {"any_": [name]}, "is_anonymous": {"eq_": False}},
        "block_schemas": {"block_capabilities": {"all_": ["notify"]}},
        "include_secrets": False,
    }
    found = client.request("POST", "/block_documents/filter", json=body).json()
    return [NotifyBlock(id=UUID(doc["id"]), name=doc["name"], block_type=(doc.get("block_type") or {}).get("name", "?"))
            for doc in found]


def _reactive(expect: set[str], match: dict[str, str], match_related: dict[str, str] | None = None) -> EventTrigger:
    return EventTrigger(
        expect=expect, match=ResourceSpecification(match),
        match_related=ResourceSpecification(match_related or {}),
        posture=Posture.Reactive, threshold=1, within=0,
    )


def notification_automations(blocks: list[NotifyBlock]) -> list[AutomationCore]:
    """The three automations, each sending through every block in ``blocks``."""
    def send(subject: str, body: str) -> list[SendNotification]:
        return [SendNotification(block_document_id=b.id, subject=subject, body=body) for b in blocks]

    models = {"prefect.resource.id": model_resource("*")["prefect.resource.id"]}
    return [
        AutomationCore(
            name=PROMOTION_WAITING_AUTOMATION,
            description="A challenger waits for approval: the decision link and the evidence, to the notify block.",
            trigger=_reactive({PROMOTION_WAITING}, models),
            actions=send(WAITING_SUBJECT, WAITING_BODY),
        ),
        AutomationCore(
            name=RETRAINING_AUTOMATION,
            description="A run of the retrain deployment started (a drift breach, the schedule or by hand).",
            # Running, not Scheduled: an active schedule creates its runs days ahead.
            trigger=_reactive({"prefect.flow-run.Running"}, {"prefect.resource.id": "prefect.flow-run.*"},
                              {"prefect.resource.role": "deployment",
                               "prefect.resource.name": RETRAIN_DEPLOYMENT.split("/", 1)[1]}),
            actions=send(RETRAINING_SUBJECT, RETRAINING_BODY),
        ),
        AutomationCore(
            name=CHAMPION_AUTOMATION,
            description="A champion changed: approved promotion or rollback, who decided and why.",
            trigger=_reactive({MODEL_PROMOTED, MODEL_ROLLED_BACK}, models),
            actions=send(CHAMPION_SUBJECT, CHAMPION_BODY),
        ),
    ]


def ensure_notification_automations(ep: StackEndpoints, block_name: str | None = None) -> list[NotifyBlock]:
    """Create or update the automations for the blocks named ``block_name``; returns those blocks.

    With no such block, the automations are removed (notifications off) and ``[]`` is
    returned. Idempotent: an automation is found by its name and updated in place.
    """
    name = notify_block_name(block_name)
    with prefect_api(ep), get_client(sync_client=True) as client:
        blocks = notification_blocks(client, name)
        wanted = {a.name: a for a in notification_automations(blocks)} if blocks else {}
        for automation in AUTOMATIONS:
            existing = client.read_automations_by_name(automation)
            for stale in existing[1:] if automation in wanted else existing:
                client.delete_automation(stale.id)
            if automation not in wanted:
                continue
            if existing:
                client.update_automation(existing[0].id, wanted[automation])
            else:
                client.create_automation(wanted[automation])
    return blocks


def notification_status(ep: StackEndpoints, block_name: str | None = None) -> str:
    """One line for ``fabloop status`` and ``deploy``: the blocks the automations send through, or why none."""
    with prefect_api(ep), get_client(sync_client=True) as client:
        used = {a.block_document_id for name in AUTOMATIONS for auto in client.read_automations_by_name(name)
                for a in auto.actions if isinstance(a, SendNotification)}
        if not used:
            return (f"notifications: off (save a notification block named {notify_block_name(block_name)!r} in the "
                    "Prefect UI, then run `fabloop deploy`)")
        try:
            blocks = [client.read_block_document(block_id, include_secrets=False) for block_id in sorted(used)]
        except ObjectNotFound:
            return "notifications: broken (their block was deleted; run `fabloop deploy` to switch them off)"
    shown = ", ".join(f"{b.name} ({b.block_type.name if b.block_type else '?'})" for b in blocks)
    return f"notifications: on, through {shown}"

