"""The verdict on one closed window: what the drift check records and whether it asks for a retraining.

A scope without a champion has no reference to compare with: its first full window
asks for a first training instead (a smaller one waits). With a champion, the window
breaches when its sensors drifted or the champion's performance on its labelled
wafers broke the policy; the trigger kind says which, for the retrain trigger row.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from fabloop.core.drift import DriftResult, PerformanceDriftResult
from fabloop.core.policies import DriftPolicy

WindowStatus = Literal["ok", "window_too_small", "no_testable_features", "no_champion"]
TriggerKind = Literal["first_training", "drift", "performance"]


class WindowVerdict(BaseModel):
    """The check's row fields and, on a breach, the kind of retraining it asks for."""

    model_config = ConfigDict(frozen=True)

    status: WindowStatus
    drifted: bool
    breach: bool
    performance_breach: bool
    reason: str
    trigger_kind: TriggerKind | None = None


def judge_window(
    model: str,
    wafers: int,
    policy: DriftPolicy,
    champion: str | None,
    data: DriftResult | None = None,
    performance: PerformanceDriftResult | None = None,
) -> WindowVerdict:
    """Judge a window of ``wafers`` wafers of ``model``; ``champion`` is its version, None without one.

    With a champion, ``data`` (the sensors' drift verdict) is required and
    ``performance`` is None when the window had no performance verdict.
    """
    if champion is None and wafers < policy.min_window_rows:
        return WindowVerdict(
            status="window_too_small", drifted=False, breach=False, performance_breach=False,
            reason=f"no champion for {model} yet, and {wafers} wafers < min_window_rows={policy.min_window_rows}",
        )
    if champion is None:
        return WindowVerdict(
            status="no_champion", drifted=False, breach=True, performance_breach=False, trigger_kind="first_training",
            reason=f"no champion for {model} yet: first full window ({wafers} wafers) asks for a first training",
        )
    if data is None:
        raise ValueError(f"window of {model}: a champion (v{champion}) needs the data drift verdict")
    performance_breach = bool(performance and performance.breached)
    breach = data.drifted or performance_breach
    kind: TriggerKind | None = ("drift" if data.drifted else "performance") if breach else None
    return WindowVerdict(
        status=data.status, drifted=data.drifted, breach=breach, performance_breach=performance_breach,
        reason=data.reason + (f" | performance: {performance.reason}" if performance else ""), trigger_kind=kind,
    )
