"""The Markdown of the drift and retrain artifacts: what an engineer reads in the Prefect UI."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from fabloop.core.drift import DriftResult, PerformanceDriftResult
from fabloop.core.validation import GateVerdict

if TYPE_CHECKING:  # tuning brings LightGBM and Optuna, which a drift check's report does not need
    from fabloop.core.tuning import TuneResult

METRICS = ("roc_auc", "pr_auc", "recall_at_op", "precision_at_op", "fail_rate")


def drift_markdown(
    model: str, window_id: int, reason: str, data: DriftResult | None,
    performance: PerformanceDriftResult | None, report_url: str | None, note: str | None = None,
) -> str:
    """A window's verdict: the sensors' summary (or why there is none) and the champion's performance.

    ``note``: a line on the Evidently report while it has no link (being rendered, or failed).
    """
    return (
        f"## Drift check of `{model}` window {window_id}\n\n"
        + (data.to_markdown(report_url) if data else f"**{reason}**\n")
        + (f"\n\n**Performance:** {performance.reason}\n" if performance else "")
        + (f"\n\n_{note}_\n" if note else "")
    )


def metrics_table(challenger: Mapping[str, float], champion: Mapping[str, float] | None) -> str:
    """Challenger and champion holdout metrics side by side (– where the champion has none)."""
    rows = ["| metric | challenger | champion |", "|---|---:|---:|"]
    for key in METRICS:
        if key in challenger:
            champ = f"{champion[key]:.3f}" if champion and key in champion else "–"
            rows.append(f"| {key} | {challenger[key]:.3f} | {champ} |")
    return "\n".join(rows)


def refused_markdown(model: str, reason: str) -> str:
    """A retraining the data gate refused: nothing was registered."""
    return f"## Retraining of `{model}` refused\n\n**Data gate:** {reason}\n\nNothing was registered."


def challenger_markdown(
    model: str, version: str, reasons: Sequence[str], verdict: GateVerdict, search: TuneResult,
    challenger: Mapping[str, float], champion: Mapping[str, float] | None, links: Mapping[str, str],
) -> str:
    """A registered challenger: the gate's verdict, its metrics against the champion's, the search, the links."""
    return (
        f"## Challenger `{model}` v{version} — gate {'passed' if verdict.passed else 'REJECTED'}\n\n"
        f"Trigger: {'; '.join(reasons)}\n\n{metrics_table(challenger, champion)}\n\n"
        f"Gate: {verdict.summary()}\n\nWinner: {search.winner} "
        f"(CV ROC-AUC LightGBM {search.lgbm_cv_auc:.3f}, baseline {search.baseline_cv_auc:.3f}; "
        f"{search.n_complete} trials, {search.n_pruned} pruned)\n\n"
        f"[challenger run]({links['challenger_run']}) · [model version]({links['challenger_version']})\n"
    )
