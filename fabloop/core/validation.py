"""The challenger gate: challenger and champion judged on the same most-recent wafers, with their uncertainty.

The rules (``RetrainPolicy`` fields in backquotes):

- **Which figures.** The holdout (the newest wafers) is the judge when it holds at
  least ``min_holdout_fails`` failing wafers. With fewer, its ROC-AUC is mostly
  noise (on three fails it moves by tens of points), so the gate judges on the
  time-series CV estimates instead: the challenger's (the winning model family's
  mean over its folds) against the champion's recorded one; the holdout figures are
  shown, not used. Without a CV estimate such a challenger is rejected: a holdout
  of a few fails can never pass on its point estimate.
- **Floor.** The ROC-AUC judged on must reach ``min_roc_auc``; on the holdout it
  must also be significantly better than chance (DeLong, one-sided, ``gate_alpha``).
- **No regression.** The challenger is rejected when it is more than
  ``max_regression`` below the champion. On the holdout this is the *paired*
  difference (DeLong on the same wafers), judged on its point estimate: a
  challenger that looks worse is never offered to an engineer, and its interval and
  p-value show whether the loss is real.
- **Required gain** (when ``required_gain`` > 0): the challenger must be at least
  that much better *and* the gain significant (paired, one-sided, ``gate_alpha``):
  production does not change on noise.

Every reason states n_fail, the (1 - ``gate_alpha``) interval and the p-value.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from fabloop.core.policies import RetrainPolicy

if TYPE_CHECKING:  # SciPy takes seconds to import; a drift check's report needs only GateVerdict
    from fabloop.core.stats import PairedAuc


def fmt_p(p: float) -> str:
    """A p-value as an engineer reads it."""
    from fabloop.core.stats import fmt_p as fmt

    return fmt(p)


class GateVerdict(BaseModel):
    passed: bool
    reasons: list[str]
    basis: Literal["holdout", "cv"] = "holdout"
    paired: dict[str, float] | None = None

    def summary(self) -> str:
        return ("passed: " if self.passed else "rejected: ") + "; ".join(self.reasons)


def paired_summary(paired: PairedAuc, alpha: float) -> dict[str, float]:
    """The paired ROC-AUC comparison as plain numbers (for the approval form and MLflow)."""
    lo, hi = paired.ci(alpha)
    return {"roc_auc_diff": paired.diff, "roc_auc_diff_ci_low": lo, "roc_auc_diff_ci_high": hi,
            "roc_auc_diff_p": paired.p_value, "n_fail": float(paired.n_fail), "n_rows": float(paired.n_fail +
                                                                                              paired.n_pass)}


def _auc_with_ci(metrics: dict[str, float], alpha: float) -> str:
    """'0.861 (95% CI 0.80–0.92) on 23 fails' from a holdout metrics dict."""
    auc = metrics["roc_auc"]
    level = f"{100 * (1 - alpha):g}% CI"
    lo, hi = metrics.get("roc_auc_ci_low"), metrics.get("roc_auc_ci_high")
    n_fail = metrics.get("n_fail")
    ci = f" ({level} {lo:.2f}–{hi:.2f})" if lo is not None and hi is not None else ""
    return f"{auc:.3f}{ci}" + (f" on {int(n_fail)} fails" if n_fail is not None else "")


def _p_chance(metrics: dict[str, float]) -> float | None:
    """One-sided p-value of "no better than chance": logged, or Hanley-McNeil from the counts."""
    if "roc_auc_p_chance" in metrics:
        return metrics["roc_auc_p_chance"]
    n_fail, n_rows, auc = metrics.get("n_fail"), metrics.get("n_rows"), metrics["roc_auc"]
    if not n_fail or not n_rows or n_rows <= n_fail:
        return None
    from scipy.stats import norm

    from fabloop.core.stats import hanley_mcneil_var

    se = math.sqrt(hanley_mcneil_var(auc, int(n_fail), int(n_rows - n_fail)))
    return float(norm.sf((auc - 0.5) / se)) if se > 0 else (0.0 if auc > 0.5 else 1.0)


def judge_challenger(
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    policy: RetrainPolicy,
    *,
    paired: PairedAuc | None = None,
    challenger_cv: float | None = None,
    champion_cv: float | None = None,
) -> GateVerdict:
    """Apply the policy's gate (see the module docstring) and say why, with the uncertainty.

    ``challenger``/``champion`` are :func:`fabloop.core.training.holdout_metrics` on the
    same holdout; ``paired`` is DeLong's paired comparison of their scores there
    (challenger minus champion); ``challenger_cv``/``champion_cv`` their time-series CV
    ROC-AUC, used when the holdout holds too few fails.
    """
    n_fail = challenger.get("n_fail")
    if n_fail is None or n_fail < policy.min_holdout_fails:
        return _judge_on_cv(challenger, champion, policy, paired, challenger_cv, champion_cv)
    alpha, auc = policy.gate_alpha, challenger["roc_auc"]
    reasons: list[str] = []
    ok = True
    shown = _auc_with_ci(challenger, alpha) if auc == auc else "NaN"
    p_chance = _p_chance(challenger) if auc == auc else None
    if auc != auc or auc < policy.min_roc_auc:  # NaN never passes
        ok = False
        reasons.append(f"holdout ROC-AUC {shown} below the floor {policy.min_roc_auc:.3f}")
    elif p_chance is not None and p_chance >= alpha:
        ok = False
        reasons.append(f"holdout ROC-AUC {shown} ≥ floor {policy.min_roc_auc:.3f} but not significantly better "
                       f"than chance ({fmt_p(p_chance)} ≥ α {alpha:g})")
    else:
        reasons.append(f"holdout ROC-AUC {shown} ≥ floor {policy.min_roc_auc:.3f}"
                       + (f", better than chance {fmt_p(p_chance)}" if p_chance is not None else ""))
    if champion is None:
        reasons.append("no champion yet: the first model that passes the floor is a candidate")
        return GateVerdict(passed=ok, reasons=reasons, basis="holdout")
    base = champion["roc_auc"]
    diff = paired.diff if paired is not None else auc - base
    if paired is not None:
        lo, hi = paired.ci(alpha)
        test = (f"paired DeLong on the same {paired.n_fail} fails: {diff:+.3f}, "
                f"{100 * (1 - alpha):g}% CI {lo:+.3f} to {hi:+.3f}, {fmt_p(paired.p_value)}")
    else:
        test = f"{diff:+.3f} (no paired scores: untested)"
    if diff < -policy.max_regression:
        ok = False
        reasons.append(f"regresses vs champion ({auc:.3f} < {base:.3f} − tolerance {policy.max_regression:.3f}; "
                       f"{test})")
    if policy.required_gain > 0:
        p_gain = paired.p_greater(0.0) if paired is not None else None
        if diff < policy.required_gain:
            ok = False
            reasons.append(f"gain {diff:+.3f} short of the required {policy.required_gain:+.3f} ({test})")
        elif p_gain is None or p_gain >= alpha:
            ok = False
            why = "untested without paired scores" if p_gain is None else f"one-sided {fmt_p(p_gain)} ≥ α {alpha:g}"
            reasons.append(f"gain {diff:+.3f} meets the required {policy.required_gain:+.3f} but is not "
                           f"significant ({why})")
    if ok:
        reasons.append(f"vs champion {base:.3f}: {test}")
    return GateVerdict(passed=ok, reasons=reasons, basis="holdout",
                       paired=paired_summary(paired, alpha) if paired is not None else None)


def _judge_on_cv(
    challenger: dict[str, float], champion: dict[str, float] | None, policy: RetrainPolicy,
    paired: PairedAuc | None, challenger_cv: float | None, champion_cv: float | None,
) -> GateVerdict:
    """Too few fails in the holdout: the CV estimates decide, the holdout is shown as evidence only."""
    alpha, n_fail = policy.gate_alpha, challenger.get("n_fail")
    held = "an unknown number of" if n_fail is None else str(int(n_fail))
    reasons = [
        f"holdout holds {held} fails (< min_holdout_fails {policy.min_holdout_fails}): judged on the time-series "
        f"CV estimates; holdout ROC-AUC {_auc_with_ci(challenger, alpha)} shown, not used"
    ]
    summary = paired_summary(paired, alpha) if paired is not None else None
    if challenger_cv is None or challenger_cv != challenger_cv:
        reasons.append("no CV estimate of the challenger: a holdout this small cannot pass the gate on its own")
        return GateVerdict(passed=False, reasons=reasons, basis="cv", paired=summary)
    ok = challenger_cv >= policy.min_roc_auc
    reasons.append(f"CV ROC-AUC {challenger_cv:.3f} {'≥' if ok else 'below the'} floor {policy.min_roc_auc:.3f}")
    if champion is None:
        reasons.append("no champion yet: the first model that passes the floor is a candidate")
        return GateVerdict(passed=ok, reasons=reasons, basis="cv", paired=summary)
    if champion_cv is not None and champion_cv == champion_cv:
        diff = challenger_cv - champion_cv
        versus = f"CV {challenger_cv:.3f} vs champion's recorded CV {champion_cv:.3f} (different training sets)"
        if diff < -policy.max_regression:
            ok = False
            reasons.append(f"regresses vs champion ({versus}: {diff:+.3f} < − tolerance {policy.max_regression:.3f})")
        elif policy.required_gain > 0 and diff < policy.required_gain:
            ok = False
            reasons.append(f"gain {diff:+.3f} short of the required {policy.required_gain:+.3f} ({versus})")
        else:
            reasons.append(f"vs champion: {versus}: {diff:+.3f}")
    elif paired is not None:
        # No recorded CV for the champion: only a significant loss on the paired holdout rejects.
        lo, hi = paired.ci(alpha)
        p_worse = 1 - paired.p_greater(0.0)
        test = (f"paired holdout {paired.diff:+.3f}, {100 * (1 - alpha):g}% CI {lo:+.3f} to {hi:+.3f}, "
                f"one-sided {fmt_p(p_worse)}")
        if paired.diff < -policy.max_regression and p_worse < alpha:
            ok = False
            reasons.append(f"regresses vs champion (significantly, {test}; the champion has no recorded CV)")
        elif policy.required_gain > 0:
            ok = False
            reasons.append(f"the required gain {policy.required_gain:+.3f} cannot be shown: the champion has no "
                           f"recorded CV and the holdout is too small ({test})")
        else:
            reasons.append(f"vs champion: no recorded CV; {test}")
    else:
        ok = False
        reasons.append("the champion has neither a recorded CV estimate nor paired holdout scores: no comparison")
    return GateVerdict(passed=ok, reasons=reasons, basis="cv", paired=summary)
