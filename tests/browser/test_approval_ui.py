"""An engineer approves a challenger in the real Prefect UI, in headless Chromium.

The suspended ``promote`` run (no process while it waits) is opened at its page in
the Prefect UI, "Resume" opens the form whose description is the decision page
(metrics table included); a rejection without a comment is refused by the server
with a visible error and the run stays suspended; an approval then has a worker run
the promotion again, which makes the challenger champion, and the audit record
names the approver typed into the form.
"""

from __future__ import annotations

import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.prefect_api import flow_run
from tests.helpers.promotion import (
    PromotionLauncher,
    alias,
    approvals,
    events,
    register,
    save_policy,
    tiny_model_uris,
    unique_model,
    wait_completed,
    wait_paused,
)
from tests.helpers.stack import RunningStack

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
SCREENSHOT = Path(tempfile.gettempdir()) / "fabloop-approval-dialog.png"
# How long the UI may take to answer, for locators and assertions alike. Playwright's
# assertions wait 5 s by default; on a loaded 2-core machine the form's Submit alone
# took over 4 s to reach the server and close the dialog. How fast is not asserted here.
UI_TIMEOUT_MS = 30_000


def _choose(page: Any, dialog: Any, label: str, option: str) -> None:
    """Pick ``option`` in the form's select field ``label`` (it opens from the keyboard)."""
    field = _field(page, dialog, label)
    field.locator(".p-select button").first.focus()
    page.keyboard.press("ArrowDown")
    page.get_by_role("option", name=option, exact=True).click()


def _field(page: Any, dialog: Any, label: str) -> Any:
    title = page.locator(".schema-form-property__label", has_text=re.compile(f"^{label}"))
    return dialog.locator(".schema-form-property").filter(has=title)


def test_approve_from_the_prefect_ui(stack: RunningStack, launcher: PromotionLauncher) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (scripts/system-deps.sh installs Debian's chromium)")
    from playwright.sync_api import expect, sync_playwright

    since = datetime.now(UTC)
    policy = save_policy(unique_model("policy-ui"), ["Dana Kim"], timeout_seconds=600, poll_seconds=1)
    model = unique_model("ui")
    v1, v2 = register(stack.ep.mlflow_tracking_uri, model, tiny_model_uris(stack.ep.mlflow_tracking_uri)[:2],
                      {"champion": 0, "challenger": 1})
    run = launcher.start(model, v2, policy)
    paused = wait_paused(stack, run)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.goto(f"{stack.ep.prefect_ui_url}/runs/flow-run/{run.flow_run_id}")
            page.get_by_role("button", name="Resume").first.click()
            dialog = page.get_by_role("dialog")
            expect(dialog).to_contain_text(f"Promote {model} version {v2} to champion?", timeout=UI_TIMEOUT_MS)
            table = dialog.get_by_role("table")
            expect(table).to_contain_text(f"champion v{v1}", timeout=UI_TIMEOUT_MS)
            roc_auc = table.get_by_role("row").filter(has_text="roc_auc")
            expect(roc_auc).to_contain_text("+0.0494", timeout=UI_TIMEOUT_MS)
            page.screenshot(path=str(SCREENSHOT))

            # Reject without a comment: the server refuses, the UI says why, the run keeps waiting.
            _choose(page, dialog, "Decision", "reject")
            _field(page, dialog, "Approver").locator("textarea").fill("Dana Kim")
            dialog.get_by_role("button", name="Submit").click()
            refusal = page.get_by_text(re.compile("Validation failed for field 'comment'")).first
            expect(refusal).to_be_visible(timeout=UI_TIMEOUT_MS)
            assert flow_run(stack, run.flow_run_id)["state"]["id"] == paused["state"]["id"]

            _choose(page, dialog, "Decision", "approve")
            _field(page, dialog, "Comment").locator("textarea").fill("holdout recall +5 points, checked lot 7")
            dialog.get_by_role("button", name="Submit").click()
            expect(dialog).to_be_hidden(timeout=UI_TIMEOUT_MS)
        finally:
            browser.close()

    assert wait_completed(stack, run, timeout=120)["name"] == "Approved"
    assert (alias(stack, model, "champion"), alias(stack, model, "previous")) == (v2, v1)
    [rec] = approvals(stack, model)
    assert (rec.decision, rec.approver, rec.comment) == (
        "approved", "Dana Kim", "holdout recall +5 points, checked lot 7"
    )
    assert rec.flow_run_id == run.flow_run_id
    assert events(stack, "fabloop.model.promoted", model, since)[0]["payload"]["approver"] == "Dana Kim"
