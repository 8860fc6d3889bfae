"""Human decisions on challenger models, as plain values: the records and the decision page.

A pending promotion *is* a suspended ``promote`` flow run (see
:mod:`fabloop.adapters.prefect_api`); resuming it with the approval form is the
decision. This module holds what needs no I/O: the audit record, the pending-run
summary, the refusal rule and the Markdown an engineer decides from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from fabloop.core.names import CHAMPION, DEADLINE_TAG_PREFIX, PREVIOUS, SUPERSEDED_TAG_PREFIX

Decision = Literal["approved", "rejected", "refused", "timed_out", "superseded", "rolled_back"]
DecisionRequest = Literal["approve", "reject"]

# The reason recorded when nobody decided in time (also the comment of the system
# answer the promotion's timeout run wakes it with).
TIMED_OUT_REASON = "approval timed out"


class Answer(Protocol):
    """What an engineer submitted on the approval form (see ``ApprovalInput``)."""

    decision: DecisionRequest
    approver: str
    comment: str


def refusal_reason(answer: Answer, allowed: bool, policy_name: str) -> str | None:
    """Why a submitted decision cannot be acted on, or None when it can."""
    if not allowed:
        return f"{answer.approver.strip()!r} is not on the approver allowlist of policy {policy_name!r}"
    if answer.decision == "reject" and not answer.comment.strip():
        return "a comment is required to reject"
    return None


# --- the decision page --------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


# Keys of a holdout metrics dict that qualify another metric rather than being one.
_QUALIFIERS = ("_ci_low", "_ci_high", "_var", "_p_chance")
_COUNTS = ("n_fail", "n_rows")


def _cell(values: Mapping[str, float], name: str) -> str:
    """A metric with its interval when one was given: ``0.8617 [0.80, 0.92]``; counts as integers."""
    value = values.get(name)
    if value is None:
        return "—"
    if name in _COUNTS:
        return str(int(value))
    lo, hi = values.get(f"{name}_ci_low"), values.get(f"{name}_ci_high")
    return _fmt(value) + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else "")


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def metrics_table(metrics: Mapping[str, Mapping[str, float]], champion: str | None, challenger: str) -> str:
    """Champion vs challenger on the same holdout, one row per metric, with the change.

    Intervals (``<metric>_ci_low``/``_ci_high``) are shown next to their metric, and the
    ROC-AUC change carries the paired test's interval and p-value (``metrics["paired"]``);
    ``metrics["cv"]`` adds the time-series CV estimates the gate uses on a small holdout.
    """
    champ = metrics.get("champion") or {}
    chall = metrics.get("challenger") or {}
    paired = metrics.get("paired") or {}
    cv = metrics.get("cv") or {}
    names = [n for n in dict.fromkeys([*chall, *champ]) if not n.endswith(_QUALIFIERS)]
    if not names:
        return "_No holdout metrics were given._\n"
    head = f"champion v{champion}" if champion else "champion (none)"
    lines = [f"| metric | {head} | challenger v{challenger} | change |", "|---|---:|---:|---:|"]
    for name in names:
        a, b = champ.get(name), chall.get(name)
        change = "—" if a is None or b is None else (f"{int(b - a):+d}" if name in _COUNTS else f"{b - a:+.4f}")
        if f"{name}_diff" in paired:  # the paired test on the same wafers: difference, interval, p-value
            change = (f"{paired[f'{name}_diff']:+.4f} [{paired[f'{name}_diff_ci_low']:+.3f}, "
                      f"{paired[f'{name}_diff_ci_high']:+.3f}], {_p(paired[f'{name}_diff_p'])}")
        lines.append(f"| {name} | {_cell(champ, name)} | {_cell(chall, name)} | {change} |")
    if "roc_auc_p_chance" in chall:
        lines.append(f"| roc_auc better than chance | "
                     f"{_p(champ['roc_auc_p_chance']) if 'roc_auc_p_chance' in champ else '—'} | "
                     f"{_p(chall['roc_auc_p_chance'])} | |")
    if cv:
        a, b = cv.get("champion"), cv.get("challenger")
        change = "—" if a is None or b is None else f"{b - a:+.4f}"
        lines.append(f"| cv_roc_auc (time-series CV) | {_fmt(a)} | {_fmt(b)} | {change} |")
    notes = []
    if chall.get("roc_auc_ci_low") is not None:
        notes.append("Brackets: confidence intervals (DeLong for ROC-AUC, Wilson for rates, bootstrap for PR-AUC).")
    if "roc_auc_diff" in paired:
        notes.append(f"ROC-AUC change: paired DeLong test on the same {int(paired.get('n_fail', 0))} failing wafers "
                     f"of {int(paired.get('n_rows', 0))}.")
    if "pr_auc_diff" in paired:
        notes.append("PR-AUC change: paired bootstrap on the same wafers.")
    if "precision_at_op_diff" in paired:
        notes.append("Precision change: paired bootstrap, each model at its own operating point; recall at the "
                     "operating point is set by the policy's target for both, so its change is not tested.")
    return "\n".join(lines) + "\n" + ("\n" + " ".join(notes) + "\n" if notes else "")


def decision_markdown(
    *,
    model: str,
    challenger: str,
    champion: str | None,
    reasons: Sequence[str],
    metrics: Mapping[str, Mapping[str, float]],
    links: Mapping[str, str],
    trigger: Mapping[str, Any],
    policy_name: str,
    deadline: datetime,
) -> str:
    """Everything an engineer needs to decide, as Markdown (artifact and form description)."""
    champion_text = f"[version {champion}]({links['champion_version']})" if champion else "none yet"
    out = [
        f"## Promote `{model}` version {challenger} to champion?\n",
        f"**Challenger:** [version {challenger}]({links['challenger_version']})"
        + (f" ([training run]({links['challenger_run']}))" if links.get("challenger_run") else "")
        + f" · **Champion:** {champion_text}"
        + (f" ([training run]({links['champion_run']}))" if champion and links.get("champion_run") else ""),
        "" if champion else "\nThis model has no champion yet: if approved, this version becomes the first.",
        "\n### Why a new model\n",
        *([f"- {r}" for r in reasons] or ["- (no reason given)"]),
        "\n### Holdout metrics (same holdout for both, with their uncertainty)\n",
        metrics_table(metrics, champion, challenger),
    ]
    shown = {"challenger_version", "champion_version", "challenger_run", "champion_run"}
    evidence = [f"- [{k.replace('_', ' ')}]({v})" for k, v in links.items() if k not in shown and v]
    evidence += [f"- {k.replace('_', ' ')}: `{v}`" for k, v in trigger.items()]
    if evidence:
        out += ["### Evidence\n", *evidence, ""]
    out += [
        "### Decide\n",
        "Choose **approve** or **reject** and give your name as it appears on the approver allowlist "
        f"(block `{policy_name}`); a comment is required to reject. Names are self-declared: every "
        "decision is recorded with it. Without a decision by "
        f"{deadline.astimezone(UTC):%Y-%m-%d %H:%M} UTC the challenger is rejected ({TIMED_OUT_REASON}).",
    ]
    return "\n".join(out) + "\n"


# --- the audit trail and the waiting runs ------------------------------------------------


class ApprovalRecord(BaseModel):
    """One row of the approvals table."""

    model_config = ConfigDict(from_attributes=True)

    id: int | None = None
    model: str
    version: str
    decision: Decision
    approver: str | None = None
    comment: str | None = None
    flow_run_id: str | None = None
    previous_champion: str | None = None
    decided_at: datetime | None = None
    detail: dict[str, Any] = Field(default_factory=dict)


class PendingPromotion(BaseModel):
    """A suspended ``promote`` run waiting for a decision (``times_out``: its ``decide-by`` deadline)."""

    flow_run_id: str
    flow_run_name: str
    model: str
    version: str
    state: str
    started: datetime | None
    paused_since: datetime | None
    times_out: datetime | None
    tags: list[str]

    def age_seconds(self, now: datetime | None = None) -> float | None:
        since = self.started or self.paused_since
        return None if since is None else ((now or datetime.now(UTC)) - since).total_seconds()

    @property
    def superseded_by(self) -> str | None:
        return superseded_by(self.tags)


def version_key(version: str) -> int:
    """Registry versions sort as numbers; anything else sorts before every real version."""
    return int(version) if str(version).isdigit() else -1


def newest_above(version: str, others: Sequence[str]) -> str | None:
    """The newest of ``others`` if it is newer than ``version`` (then ``version`` is superseded), else None."""
    newer = [o for o in others if version_key(o) > version_key(version)]
    return max(newer, key=version_key) if newer else None


def superseded_reason(version: str) -> str:
    """The comment of a promotion ended because ``version`` started its own."""
    return f"superseded by version {version}"


def superseded_by(tags: Sequence[str]) -> str | None:
    """The version named by a ``superseded-by:N`` tag, if any."""
    return next((t.removeprefix(SUPERSEDED_TAG_PREFIX) for t in tags if t.startswith(SUPERSEDED_TAG_PREFIX)), None)


def deadline_tag(deadline: datetime) -> str:
    """The flow-run tag that carries a promotion's deadline: ``decide-by:<ISO 8601 UTC, seconds>``."""
    return f"{DEADLINE_TAG_PREFIX}{deadline.astimezone(UTC).replace(microsecond=0).isoformat()}"


def decide_by(tags: Sequence[str]) -> datetime | None:
    """The deadline a promotion wrote on itself (its ``decide-by:`` tag), if any."""
    found = next((t.removeprefix(DEADLINE_TAG_PREFIX) for t in tags if t.startswith(DEADLINE_TAG_PREFIX)), None)
    return None if found is None else datetime.fromisoformat(found)


# --- decisions that move the champion: intent, completion, verification ---------------------

# An approval or rollback is recorded in two steps around the alias moves: the row is
# written ``intended`` (who decided what, replacing which champion) before the
# registry is touched, and marked ``completed`` once the aliases are where the row
# says. A crash in between leaves an intended row that names both possible champions.
INTENDED = "intended"
COMPLETED = "completed"
MOVES_CHAMPION: tuple[Decision, ...] = ("approved", "rolled_back")


def is_intended(record: ApprovalRecord) -> bool:
    """The decision was recorded but its alias moves were not confirmed (yet)."""
    return record.detail.get("status") == INTENDED


def champion_after(record: ApprovalRecord) -> str | None:
    """The champion a decision that moves ``champion`` made (None for other decisions)."""
    if record.decision == "approved":
        return record.version
    if record.decision == "rolled_back":
        restored = record.detail.get("champion")
        return None if restored is None else str(restored)
    return None


def champion_before(record: ApprovalRecord) -> str | None:
    """The champion a decision that moves ``champion`` replaced."""
    if record.decision == "rolled_back":
        demoted = record.detail.get("demoted", record.version)
        return None if demoted is None else str(demoted)
    return record.previous_champion


def alias_history(records: Sequence[ApprovalRecord]) -> list[tuple[ApprovalRecord, str | None]]:
    """Each decision (oldest first) with the champion it left: the model's alias history as recorded."""
    champion: str | None = None
    out = []
    for rec in records:
        if rec.decision in MOVES_CHAMPION:
            champion = champion_after(rec)
        out.append((rec, champion))
    return out


class AliasVerdict(BaseModel):
    """One model's aliases in the registry compared with its recorded decisions."""

    model: str
    champion: str | None
    previous: str | None
    expected: str | None = None  # the champion the last recorded decision made
    decision_id: int | None = None  # that decision
    problem: str | None = None  # why the registry is not explained; None when it is
    note: str | None = None  # explained, but worth saying (an intent not completed)

    @property
    def explained(self) -> bool:
        return self.problem is None


def verify_aliases(model: str, aliases: Mapping[str, str], records: Sequence[ApprovalRecord]) -> AliasVerdict:
    """Whether a recorded decision explains ``model``'s ``champion`` (and ``previous``).

    The last decision that moved ``champion`` must name the version carrying it. If
    that decision is only intended (interrupted between its record and its alias
    moves), either side of the move is explained: the champion it replaced or the
    one it made.
    """
    champion, previous = aliases.get(CHAMPION), aliases.get(PREVIOUS)
    verdict = AliasVerdict(model=model, champion=champion, previous=previous)
    moves = [r for r in records if r.decision in MOVES_CHAMPION]
    if champion is not None and champion == previous:
        verdict.problem = f"champion and previous are both on version {champion}"
        return verdict
    if not moves:
        if champion is not None:
            verdict.problem = f"champion is version {champion} but no recorded decision made any version champion"
        return verdict
    last = moves[-1]
    verdict.expected, verdict.decision_id = champion_after(last), last.id
    who = f"decision #{last.id} ({last.decision} by {last.approver or 'nobody'}"
    who += f" at {last.decided_at:%Y-%m-%d %H:%M:%S} UTC)" if last.decided_at else ")"
    allowed = {verdict.expected}
    if is_intended(last):
        allowed.add(champion_before(last))
        verdict.note = f"{who} is recorded as intended, not completed"
    if champion not in allowed:
        shown = "no version" if champion is None else f"version {champion}"
        verdict.problem = f"champion is {shown} but the last {who} made version {verdict.expected} champion"
    return verdict
