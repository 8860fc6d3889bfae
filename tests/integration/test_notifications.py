"""Notifications end to end: real automations on the session's Prefect server post to a local webhook.

A tiny HTTP receiver listens on a free loopback port; a Custom Webhook notification
block (Prefect's own) points at it, and ``ensure_notification_automations`` (what
``fabloop deploy`` runs) creates the automations for it. Each case then happens for
real: a ``retrain`` deployment run started with a drift check's parameters (the worker
runs it), a ``promote`` run that waits for a decision, an approval through the UI's
resume call and a rollback from the command line. The server's trigger and action
services render the messages and post them; the test reads what arrived.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from fabloop.deployments.notifications import AUTOMATIONS, ensure_notification_automations
from tests.helpers.drift import cancel_unfinished
from tests.helpers.prefect_api import api, deployment_id
from tests.helpers.promotion import (
    PromotionLauncher,
    register,
    resume,
    save_policy,
    tiny_model_uris,
    unique_model,
    wait_completed,
    wait_paused,
)
from tests.helpers.stack import RunningStack, fabloop

pytestmark = pytest.mark.integration

DEADLINE = 90  # seconds for one message: event → trigger service → action service → webhook


class Receiver:
    """Collects the JSON bodies posted to it (subject and body, as the block sends them)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, str]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.messages.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/notify"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, *needles: str, timeout: float = DEADLINE) -> dict[str, str]:
        """The first message whose subject or body contains every needle."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for msg in self.messages:
                    text = f"{msg['subject']}\n{msg['body']}"
                    if all(n in text for n in needles):
                        return msg
            time.sleep(0.5)
        with self._lock:
            seen = [m["subject"] for m in self.messages]
        raise AssertionError(f"no message with {needles} within {timeout}s; received: {seen}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _automations(stack: RunningStack) -> dict[str, int]:
    found = api(stack, "POST", "/automations/filter", {"automations": {"name": {"any_": list(AUTOMATIONS)}}})
    return {name: sum(a["name"] == name for a in found) for name in AUTOMATIONS}


@pytest.fixture
def receiver(stack: RunningStack, deployments: None) -> Iterator[tuple[Receiver, str]]:
    """The receiver, a webhook block of this test's own name pointing at it, and the automations for it.

    Afterwards the block is deleted and the automations removed again (``deploy``
    with no block: notifications off), so no later test posts to a closed port.
    """
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    rx = Receiver()
    name = unique_model("notify")
    CustomWebhookNotificationBlock(
        name="fabloop test receiver", url=rx.url, json_data={"subject": "{{subject}}", "body": "{{body}}"},
    ).save(name, overwrite=True)
    try:
        yield rx, name
    finally:
        block = api(stack, "GET", f"/block_types/slug/custom-webhook/block_documents/name/{name}")
        api(stack, "DELETE", f"/block_documents/{block['id']}")
        assert ensure_notification_automations(stack.ep, name) == []
        assert _automations(stack) == dict.fromkeys(AUTOMATIONS, 0)
        rx.close()


def test_waiting_promotion_retraining_and_champion_changes_are_posted_to_the_webhook(
    stack: RunningStack, receiver: tuple[Receiver, str], launcher: PromotionLauncher
) -> None:
    rx, block_name = receiver
    since = datetime.now(UTC)
    off = fabloop("status", env=stack.env).stdout
    assert "notifications: off (save a notification block named 'fabloop-notify'" in off, off

    # What `fabloop deploy --notify-block NAME` runs; twice, as a re-deploy would: updated, not duplicated.
    for _ in range(2):
        [block] = ensure_notification_automations(stack.ep, block_name)
        assert (block.name, block.block_type) == (block_name, "Custom Webhook")
    assert _automations(stack) == dict.fromkeys(AUTOMATIONS, 1)
    on = fabloop("status", env=stack.env).stdout
    assert f"notifications: on, through {block_name} (Custom Webhook)" in on, on

    # (b) A breach starts a retraining: the retrain deployment run a drift check starts (the
    # worker runs it; this model has no scope, so it then fails, and nothing is trained).
    retrained = unique_model("notify-retrain")
    params = {"model": retrained, "reasons": ["feature drift on 12 of 40 sensors (share 0.30 > 0.25)"],
              "window_ids": [41], "drift_check_id": 42}
    retrain_run = api(stack, "POST", f"/deployments/{deployment_id(stack, 'retrain', 'retrain')}/create_flow_run",
                      {"parameters": params})["id"]

    # (a) A promotion waits for a decision, with its decision link and evidence.
    model = unique_model("notify")
    v1, v2 = register(stack.ep.mlflow_tracking_uri, model, tiny_model_uris(stack.ep.mlflow_tracking_uri)[:2],
                      {"champion": 0, "challenger": 1})
    policy = save_policy(unique_model("policy"), ["Alice"], timeout_seconds=600, poll_seconds=1)
    try:
        run = launcher.start(model, v2, policy)
        wait_paused(stack, run)
        decide = f"{stack.ep.prefect_ui_url}/runs/flow-run/{run.flow_run_id}"
        waiting = rx.wait_for(f"{model} version {v2} waits for a decision")
        body = waiting["body"]
        assert f"Decide (Resume): {decide}\n" in body, body
        assert f"(champion: version {v1})" in body and f"fabloop approve {model} --version {v2} --as NAME" in body
        # The evidence: the decision page itself (metrics table, reasons, drift report link).
        assert "| roc_auc | 0.8123 | 0.8617 | +0.0494 |" in body, body
        assert "feature drift on 12 of 40 sensors" in body and "http://127.0.0.1:1/reports/drift-42.html" in body

        started = rx.wait_for(f"retraining {retrained}")["body"]
        assert started.startswith(f"A drift breach started a retraining of {retrained}."), started
        assert "Why: feature drift on 12 of 40 sensors (share 0.30 > 0.25)\n" in started
        assert "Windows: 41\n" in started and "Drift check: 42\n" in started
        assert started.endswith(f"Run: {stack.ep.prefect_ui_url}/runs/flow-run/{retrain_run}"), started

        # (c) The champion changes: approved from the UI's resume form, then rolled back from the CLI.
        assert resume(stack, run.flow_run_id, {"decision": "approve", "approver": "Alice", "comment": "ok"})[
            "status"] == "ACCEPT"
        assert wait_completed(stack, run)["name"] == "Approved"
        approved = rx.wait_for(f"{model} champion is now version {v2}")["body"]
        assert approved.startswith(
            f"Approved by Alice: the champion of {model} is now version {v2} (was version {v1}).\n"), approved
        assert approved.endswith(f"Run: {decide}"), approved

        fabloop("rollback", model, "--as", "Alice", "--comment", "scrap rate up", "--policy", policy, env=stack.env)
        rolled = rx.wait_for(f"{model} champion is now version {v1}")["body"]
        assert rolled.startswith(
            f"Rolled back by Alice: the champion of {model} is now version {v1} (was version {v2}).\n"), rolled
        assert "Comment: scrap rate up\n" in rolled and f"{stack.ep.prefect_ui_url}/runs/flow-run/" in rolled
        # One message per event: a re-deploy did not double the automations.
        ours = [m for m in rx.messages if model in m["subject"] or retrained in m["subject"]]
        assert len(ours) == 4, [m["subject"] for m in ours]
    finally:
        cancel_unfinished(stack, ["retrain", "promote"], [retrained, model], since)
