"""``fabloop backtest``: what the loop would have done on a recorded history, without the stack.

The table is read exactly as ``fabloop replay`` reads it (same options, same bad-row
report, same exit codes), then replayed in event time through the loop's decision
code (:mod:`fabloop.core.backtest`). The last line of the output is always one JSON
object, so a script can compare policies on the same history.
"""

# pandas, LightGBM, Evidently and the plotting libraries are imported inside the
# command: they take seconds to load, and ``fabloop --help`` needs none of them.

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fabloop.cli._common import HomeOpt, console
from fabloop.cli.data import LINE_WAFER, fail, replay_columns, report_bad_rows, resolve_labels, say, with_line_wafers

if TYPE_CHECKING:
    from fabloop.core.backtest import BacktestResult, Step
    from fabloop.core.policies import DriftPolicy, RetrainPolicy

DEFAULT_TRIALS = 3  # per retraining without --policy: a small budget, so a long history backtests in minutes
_POLICY_FILES = (".json", ".yaml", ".yml")


class _Usage(ValueError):
    """A mistake in the command's options or files (exit 2)."""


def load_policies(policy: str | None, trials: int | None, home: Path | None) -> tuple[DriftPolicy, RetrainPolicy, str]:
    """The drift and retrain policies: defaults, a file with ``drift:`` / ``retrain:`` sections, or the blocks NAME."""
    from pydantic import ValidationError

    from fabloop.core.policies import DriftPolicy, RetrainPolicy

    if policy is None:
        drift, retrain, source = DriftPolicy(), RetrainPolicy(), "the policies' defaults"
        trials = DEFAULT_TRIALS if trials is None else trials
    elif Path(policy).suffix.lower() in _POLICY_FILES or Path(policy).is_file():
        drift, retrain = _policy_file(Path(policy))
        source = f"policy file {policy}"
    else:
        drift, retrain = _policy_blocks(policy, home)
        source = f"DriftPolicy / RetrainPolicy blocks {policy!r}"
    if trials is not None:
        try:
            retrain = RetrainPolicy(**{**retrain.model_dump(), "n_trials": trials})
        except ValidationError as exc:
            raise _Usage(f"--trials: {exc.errors(include_url=False)[0]['msg']}") from None
        source += f", {trials} tuning trial(s) per retraining"
    return drift, retrain, source


def _policy_file(path: Path) -> tuple[DriftPolicy, RetrainPolicy]:
    import yaml
    from pydantic import ValidationError

    from fabloop.core.policies import DriftPolicy, RetrainPolicy

    try:
        data = yaml.safe_load(path.read_text()) or {}  # JSON is YAML
    except (OSError, yaml.YAMLError) as exc:
        raise _Usage(f"--policy {path}: cannot read it: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"drift", "retrain"}:
        raise _Usage(f"--policy {path}: expected a mapping with 'drift:' and/or 'retrain:' sections only")
    try:
        return DriftPolicy.model_validate(data.get("drift") or {}), RetrainPolicy.model_validate(
            data.get("retrain") or {})
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        section = "drift" if exc.title == DriftPolicy.__name__ else "retrain"
        where = ".".join(str(p) for p in (section, *err["loc"]))
        raise _Usage(f"--policy {path}: {where}: {err['msg']}") from None


def _policy_blocks(name: str, home: Path | None) -> tuple[DriftPolicy, RetrainPolicy]:
    from contextlib import AbstractContextManager, nullcontext

    from fabloop.infra.settings import StackEndpoints

    ep: StackEndpoints | None = None
    if not os.environ.get("PREFECT_API_URL"):
        try:
            ep = StackEndpoints.load(home)
        except FileNotFoundError as exc:
            raise _Usage(f"--policy {name!r} names policy blocks, but no Prefect API is configured ({exc}); "
                         "give a policy file (.json/.yaml with drift: and retrain: sections) instead") from None
    # Prefect takes seconds to import: only once there is an API to ask.
    from fabloop.blocks import DriftPolicyBlock, RetrainPolicyBlock, load_block
    from fabloop.infra.bootstrap import prefect_api

    context: AbstractContextManager[None] = nullcontext() if ep is None else prefect_api(ep)
    where = os.environ["PREFECT_API_URL"] if ep is None else ep.prefect_api_url
    try:
        with context:
            return load_block(DriftPolicyBlock, name).policy, load_block(RetrainPolicyBlock, name).policy
    except Exception as exc:  # noqa: BLE001 - Prefect raises ValueError, HTTP or connection errors alike
        raise _Usage(f"--policy {name!r}: cannot load the policy blocks from Prefect at {where}: {exc}") from None


# ------------------------------------------------------------------------ output


def _score(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _verdict(s: Step) -> str:
    if s.trigger == "first_training":
        return "first training"
    if s.breach:
        return f"breach: {s.trigger}"
    return {"ok": "ok", "window_too_small": "too small", "no_testable_features": "no verdict"}.get(s.status, s.status)


def print_timeline(result: BacktestResult) -> None:
    """The timeline as a plain table (it is read in terminals and CI logs alike), then why each decision was taken."""
    width = max([len(s.model) for s in result.steps] + [5])
    say(f"{'model':<{width}}  win  {'event time (UTC)':<34}  wafers  lab/test/fail  {'verdict':<21}  "
        f"{'action':<12}  AUC adaptive/static")
    for s in result.steps:
        adaptive, static = (m.roc_auc if m else None for m in (s.adaptive, s.static))
        say(f"{s.model:<{width}}  {s.window:>3}  {s.ts_start:%Y-%m-%d %H:%M} → {s.ts_end:%Y-%m-%d %H:%M}  "
            f"{s.wafers:>6}  {f'{s.labelled}/{s.tested}/{s.fails}':>13}  {_verdict(s):<21}  {s.action:<12}  "
            f"{_score(adaptive)} / {_score(static)}")
    say("why:")
    for s in result.steps:
        if s.breach or s.action not in ("none", "waiting"):
            say(f"  {s.model} window {s.window}: {s.reason} → {s.action}" + (f": {s.detail}" if s.detail else ""))
    c = result.counts
    say(f"{c.windows} windows: {c.alarms} alarm(s), {c.first_trainings} first-training request(s), {c.retrains} "
        f"retraining(s) ran ({c.refusals} refused by the data gate, {c.rejections} rejected by the challenger gate, "
        f"{c.not_approved} not approved, {c.promotions} promoted), {c.suppressed} held back by the cooldown")
    say(f"pooled over {result.scored_wafers} tested wafers after each scope's first champion: ROC-AUC adaptive "
        f"{_score(result.adaptive_auc)} vs static {_score(result.static_auc)}; fail recall at the operating point "
        f"adaptive {_score(result.adaptive_recall)} vs static {_score(result.static_recall)}")


def write_plot(result: BacktestResult, path: Path) -> None:
    """Per model: the window ROC-AUC of the adaptive and the static champion, with the loop's actions marked."""
    models = sorted({s.model for s in result.steps})
    by_model = {m: [s for s in result.steps if s.model == m] for m in models}
    if path.suffix.lower() in (".html", ".htm"):
        _plot_html(by_model, path)
    else:
        _plot_png(by_model, path)


_MARKS = {"alarm": ("x", "red"), "promoted": ("^", "green"), "refused": ("s", "orange"), "rejected": ("v", "purple"),
          "suppressed": ("o", "grey")}


def _mark_y(kind: str) -> float:
    """Alarms on one row, the actions they led to just below, so neither hides the other."""
    return 0.5 if kind == "alarm" else 0.465


def _marks(steps: list[Step]) -> dict[str, list[Step]]:
    out: dict[str, list[Step]] = {k: [] for k in _MARKS}
    for s in steps:
        if s.breach and s.trigger != "first_training":
            out["alarm"].append(s)
        if s.action in out:
            out[s.action].append(s)
    return out


def _plot_png(by_model: dict[str, list[Step]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(by_model), 1, figsize=(12, 3.2 * len(by_model)), squeeze=False, sharex=True)
    for ax, (model, steps) in zip(axes[:, 0], by_model.items(), strict=True):
        x = [s.ts_end for s in steps]
        for name, color in (("adaptive", "tab:blue"), ("static", "tab:grey")):
            y = [getattr(s, name).roc_auc if getattr(s, name) and getattr(s, name).roc_auc is not None
                 else float("nan") for s in steps]
            ax.plot(x, y, marker=".", color=color, label=f"{name} champion")
        for kind, marked in _marks(steps).items():
            if marked:
                marker, color = _MARKS[kind]
                ax.scatter([s.ts_end for s in marked], [_mark_y(kind)] * len(marked), marker=marker, color=color,
                           label=kind)
        ax.set_ylim(0.44, 1.01)
        ax.set_ylabel("window ROC-AUC")
        ax.set_title(model)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_html(by_model: dict[str, list[Step]], path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=len(by_model), cols=1, shared_xaxes=True, subplot_titles=list(by_model))
    symbols = {"x": "x", "^": "triangle-up", "s": "square", "v": "triangle-down", "o": "circle"}
    for row, steps in enumerate(by_model.values(), start=1):
        x = [s.ts_end for s in steps]
        for name, color in (("adaptive", "royalblue"), ("static", "grey")):
            y = [getattr(s, name).roc_auc if getattr(s, name) else None for s in steps]
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=f"{name} champion", line={"color": color},
                                     text=[s.reason for s in steps], showlegend=row == 1), row=row, col=1)
        for kind, marked in _marks(steps).items():
            if marked:
                marker, color = _MARKS[kind]
                fig.add_trace(go.Scatter(
                    x=[s.ts_end for s in marked], y=[_mark_y(kind)] * len(marked), mode="markers", name=kind,
                    marker={"symbol": symbols[marker], "color": color, "size": 10},
                    text=[f"{s.action}: {s.detail or s.reason}" for s in marked], showlegend=row == 1,
                ), row=row, col=1)
        fig.update_yaxes(range=[0.44, 1.01], title_text="window ROC-AUC", row=row, col=1)
    fig.update_layout(height=300 * len(by_model), title="fabloop backtest")
    fig.write_html(path, include_plotlyjs=True)


def summary_line(result: BacktestResult, seconds: float) -> str:
    """The last line: counts, pooled scores and the timeline in brief."""
    timeline = [{"model": s.model, "window": s.window, "ts_start": s.ts_start.isoformat(),
                 "ts_end": s.ts_end.isoformat(), "status": s.status, "breach": s.breach, "trigger": s.trigger,
                 "action": s.action} for s in result.steps]
    return json.dumps({**result.summary(), "seconds": round(seconds, 1), "timeline": timeline})


# ------------------------------------------------------------------------ command


def backtest(
    file: Annotated[Path, typer.Argument(help="Recorded table: .csv, .csv.gz, .txt or .parquet.", show_default=False)],
    timestamp_col: Annotated[str, typer.Option(help="Column with the process time of the row.")] = "timestamp",
    wafer_col: Annotated[str, typer.Option(help=f"Column with the (globally unique) wafer id; {LINE_WAFER} makes "
                                           "one from the file and line for tables without one.")] = "wafer",
    label_col: Annotated[str, typer.Option(help="Column with the pass/fail label.")] = "label",
    tool_col: Annotated[str | None, typer.Option(help="Column with the tool (default: --default tool=…).")] = None,
    chamber_col: Annotated[str | None, typer.Option(help="Column with the chamber.")] = None,
    recipe_col: Annotated[str | None, typer.Option(help="Column with the recipe.")] = None,
    lot_col: Annotated[str | None, typer.Option(help="Column with the lot.")] = None,
    step_col: Annotated[str | None, typer.Option(help="Column with the process step.")] = None,
    sensors: Annotated[str, typer.Option(help="'all-numeric' (every other mostly-numeric column) or a,b,c.")]
    = "all-numeric",
    label_pass: Annotated[list[str] | None, typer.Option(
        help="A label value meaning pass (repeatable). Only pass values given: every other value fails.")] = None,
    label_fail: Annotated[list[str] | None, typer.Option(
        help="A label value meaning fail (repeatable). Only fail values given: every other value passes.")] = None,
    secom: Annotated[bool, typer.Option(
        "--secom", help="SECOM conventions: label -1 = pass, 1 = fail; timestamps dd/mm/YYYY HH:MM:SS.")] = False,
    timestamp_format: Annotated[str | None, typer.Option(
        help="strptime format, or ISO8601 / mixed (default: inferred from the first row).")] = None,
    timezone: Annotated[str, typer.Option(help="Time zone of timestamps written without one.")] = "UTC",
    dayfirst: Annotated[bool, typer.Option(help="Read 01/02/2024 as 1 February when inferring.")] = False,
    default: Annotated[list[str] | None, typer.Option(
        "--default", help="ROLE=VALUE for a role without a column (fab, lot, tool, chamber, recipe, step, program, "
        "stage), e.g. --default tool=ETCH-01. Repeatable.")] = None,
    test_delay_minutes: Annotated[float, typer.Option(
        min=0, help="A row's test result arrives this long after its sensor reading.")] = 60.0,
    show_bad_rows: Annotated[int, typer.Option(min=0, help="Bad rows listed in the output.")] = 50,
    bad_rows_out: Annotated[Path | None, typer.Option(help="Write every bad row (line, column, reason) to "
                                                         "this CSV.")] = None,
    scope_by: Annotated[str, typer.Option(help="One model per value of these roles (comma-separated: fab, tool, "
                                          "chamber, recipe, step), as in the model catalog.")] = "tool",
    model_name: Annotated[str, typer.Option(help="Model name prefix, as in the model catalog.")] = "yield",
    window_wafers: Annotated[int, typer.Option(min=2, help="Wafers per window, as in the model catalog.")] = 200,
    policy: Annotated[str | None, typer.Option(
        help="DriftPolicy/RetrainPolicy block NAME (needs a Prefect API: the stack's, or PREFECT_API_URL), or a "
        ".json/.yaml file with drift: and retrain: sections. Default: the policies' defaults.")] = None,
    trials: Annotated[int | None, typer.Option(
        min=1, help=f"Optuna trials per retraining (default {DEFAULT_TRIALS} without --policy, else the policy's).")]
    = None,
    approve: Annotated[str, typer.Option(
        help="Simulated approvals: 'gate' promotes every challenger that passes the gate, 'never' none.")] = "gate",
    train_windows: Annotated[int | None, typer.Option(
        min=1, help="Retrain on the labelled wafers of the scope's last K windows (default: all so far, as the "
        "live loop).")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the ROC-AUC timeline plot here (.png, or .html).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the JSON line.")] = False,
    home: HomeOpt = None,
) -> None:
    """Replay a recorded history through the loop's decisions, without the stack, and report what it would have done.

    Windows are cut per scope in event time; labels count once their test result has arrived (--test-delay-minutes); approvals are simulated. The last line is one JSON object.
    """  # noqa: E501 - one line: Typer keeps docstring line breaks in the help
    from fabloop.core.backtest import history_frame, run_backtest
    from fabloop.core.replay import ReplayTableError, read_table, replay_events
    from fabloop.core.scopes import ModelSpec

    t0 = time.monotonic()
    quiet = as_json
    try:
        if approve not in ("gate", "never"):
            raise _Usage(f"--approve {approve!r}: expected 'gate' or 'never'")
        try:
            spec = ModelSpec(name=model_name, window_wafers=window_wafers,
                             scope_by=[s.strip() for s in scope_by.split(",") if s.strip()])
        except ValueError as exc:
            raise _Usage(f"--scope-by/--model-name: {exc}") from None
        drift_policy, retrain_policy, source = load_policies(policy, trials, home)
        columns = replay_columns(
            timestamp_col=timestamp_col, wafer_col=wafer_col, label_col=label_col, tool_col=tool_col,
            chamber_col=chamber_col, recipe_col=recipe_col, lot_col=lot_col, step_col=step_col, sensors=sensors,
            secom=secom, timezone=timezone, timestamp_format=timestamp_format, dayfirst=dayfirst,
            defaults=default or [],
        )
    except ValueError as exc:  # _Usage included
        fail(exc)
        raise typer.Exit(2) from None
    if columns.label is None:
        fail("--label-col: a backtest needs pass/fail labels")
        raise typer.Exit(2)
    line_wafers = columns.wafer == LINE_WAFER
    try:
        with console.status(f"reading {file}…"):
            frame = read_table(file, columns.model_copy(update={"wafer": columns.timestamp}) if line_wafers
                               else columns)
            if line_wafers:
                columns = with_line_wafers(frame, columns)
            columns, labels_text = resolve_labels(columns, frame, label_pass or [], label_fail or [])
            events = replay_events(frame, columns, test_delay=timedelta(minutes=test_delay_minutes))
    except ReplayTableError as exc:
        fail(exc)
        raise typer.Exit(2) from None
    except ValueError as exc:
        fail(f"{file}: {exc}")
        raise typer.Exit(2) from None
    del frame
    report = events.report
    if not quiet:
        say(f"{file}: {report.rows} rows, {len(report.sensor_columns)} sensor columns")
        say(f"labels in {columns.label!r}: {labels_text}")
        report_bad_rows(events, show_bad_rows, bad_rows_out)
        say(f"policy: {source}; windows of {spec.window_wafers} wafers per {', '.join(spec.scope_by)}; "
            f"approvals: {approve}")
    if len(events) == 0:
        fail(f"{file}: no row can be replayed; nothing to backtest")
        raise typer.Exit(1)

    history = history_frame(events)
    progress = None if quiet else (lambda s: say(f"  {s.model} window {s.window} closed {s.ts_end:%Y-%m-%d %H:%M}: "
                                                 f"{_verdict(s)}, {s.action}"))
    result = run_backtest(history, spec, drift_policy, retrain_policy, approve="gate" if approve == "gate" else "never",
                          train_windows=train_windows, on_step=progress)
    if not quiet:
        print_timeline(result)
    if plot is not None:
        write_plot(result, plot)
        if not quiet:
            say(f"plot written to {plot}")
    console.print(summary_line(result, time.monotonic() - t0), markup=False, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``backtest`` to the ``fabloop`` app."""
    app.command("backtest")(backtest)
