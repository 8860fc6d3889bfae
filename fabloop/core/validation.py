"""The challenger gate: challenger and champion judged on the same most-recent wafers."""

from __future__ import annotations

from pydantic import BaseModel

from fabloop.core.policies import RetrainPolicy


class GateVerdict(BaseModel):
    passed: bool
    reasons: list[str]

    def summary(self) -> str:
        return ("passed: " if self.passed else "rejected: ") + "; ".join(self.reasons)


def judge_challenger(
    challenger: dict[str, float], champion: dict[str, float] | None, policy: RetrainPolicy
) -> GateVerdict:
    """Apply the policy: an absolute floor, no regression beyond tolerance, an optional gain."""
    auc = challenger["roc_auc"]
    reasons: list[str] = []
    ok = True
    if auc != auc or auc < policy.min_roc_auc:  # NaN never passes
        ok = False
        reasons.append(f"holdout ROC-AUC {auc:.3f} below the floor {policy.min_roc_auc:.3f}")
    else:
        reasons.append(f"holdout ROC-AUC {auc:.3f} ≥ floor {policy.min_roc_auc:.3f}")
    if champion is None:
        reasons.append("no champion yet: the first model that passes the floor is a candidate")
        return GateVerdict(passed=ok, reasons=reasons)
    base = champion["roc_auc"]
    if auc < base - policy.max_regression:
        ok = False
        reasons.append(f"regresses vs champion ({auc:.3f} < {base:.3f} − tolerance {policy.max_regression:.3f})")
    if policy.required_gain > 0 and auc < base + policy.required_gain:
        ok = False
        reasons.append(f"gain {auc - base:+.3f} short of the required {policy.required_gain:+.3f}")
    if ok:
        reasons.append(f"vs champion {base:.3f}: {auc - base:+.3f}")
    return GateVerdict(passed=ok, reasons=reasons)
