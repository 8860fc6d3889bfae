"""``fabloop replay`` and ``fabloop publish-stdf``: recorded fab data into Kafka.

Both commands validate everything before the first message leaves, so what they
refuse is reported (bad rows with their line, a damaged STDF file with its byte
offset) instead of half-published. Event ids are derived from the file content,
so running a command again on the same file is harmless: ingest stores each
event id once.
"""

# The table reader (pandas) and the Kafka clients are imported inside the functions that
# use them: they take seconds to load, and ``fabloop --help`` needs neither.

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fabloop.cli._common import HomeOpt, console, load_endpoints
from fabloop.cli._common import fail as print_error
from fabloop.core.schemas import SENSOR_TOPIC, TEST_TOPIC, SensorReading, TestResult
from fabloop.core.stdf import StdfError, read_stdf

if TYPE_CHECKING:
    import pandas as pd

    from fabloop.core.replay import Replay, ReplayColumns

BootstrapOpt = Annotated[
    str | None,
    typer.Option("--bootstrap-servers", help="Publish to this Kafka (host:port[,…]) instead of the stack's; plaintext "
                 "unless --kafka-config or --kafka-block adds security. No running stack is needed then."),
]
KafkaConfigOpt = Annotated[
    Path | None,
    typer.Option("--kafka-config", exists=True, dir_okay=False,
                 help="librdkafka properties file (key=value: security.protocol, sasl.*, ssl.*, …, as for kcat -F); "
                 "no running stack is needed. Keep it mode 600 when it holds a password."),
]
KafkaBlockOpt = Annotated[
    str | None,
    typer.Option("--kafka-block", help="Publish with this saved Kafka block of the stack (default: 'default')."),
]

DEFAULT_BLOCK = "default"

LINE_WAFER = "@line"
"""``--wafer-col @line``: tables without wafer ids (public SECOM) get ``<file>-<digest>-L<line>``."""

_PROBE_LOG = logging.getLogger("fabloop.kafka.cli-probe")
_PROBE_LOG.addHandler(logging.NullHandler())
_PROBE_LOG.propagate = False


def fail(message: object) -> None:
    """An error that is never wrapped: errors here quote paths that users copy."""
    print_error(message, soft_wrap=True)


def say(message: str) -> None:
    """Plain output: file names, labels and cell values must not be read as Rich markup."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------- Kafka


def kafka_target(home: Path | None, bootstrap_servers: str | None, kafka_config: Path | None = None,
                 kafka_block: str | None = None) -> dict[str, Any]:
    """Producer settings: a properties file, or plaintext ``--bootstrap-servers``, or a Kafka block of the stack
    (``--bootstrap-servers`` then only re-points it). Exit 2 when none of them can be read."""
    from fabloop.adapters.kafka import read_properties, refusal_handler

    if kafka_config is not None and kafka_block is not None:
        fail("give --kafka-config or --kafka-block, not both")
        raise typer.Exit(2)
    if kafka_config is not None:
        try:
            conf: dict[str, Any] = dict(read_properties(kafka_config))
        except (OSError, ValueError) as exc:
            fail(exc)
            raise typer.Exit(2) from None
        if bootstrap_servers:
            conf["bootstrap.servers"] = bootstrap_servers
        if "bootstrap.servers" not in conf:
            fail(f"{kafka_config}: no bootstrap.servers (add it, or give --bootstrap-servers)")
            raise typer.Exit(2)
        return {**conf, "error_cb": refusal_handler(conf, f"--kafka-config {kafka_config}")}
    if bootstrap_servers and kafka_block is None:
        return {"bootstrap.servers": bootstrap_servers}
    ep = load_endpoints(home)
    from fabloop.infra.bootstrap import kafka_connection

    try:
        block = kafka_connection(ep, kafka_block or DEFAULT_BLOCK)
    except Exception as exc:  # noqa: BLE001 - Prefect unreachable, no such block, or a block that fails validation
        if kafka_block is None and not isinstance(exc, ValidationError):
            return {"bootstrap.servers": ep.kafka_bootstrap_servers}  # the stack's own broker, as `up` made it
        fail(f"cannot load the Kafka block {kafka_block or DEFAULT_BLOCK!r} from the stack's Prefect at "
             f"{ep.prefect_api_url}: {exc}")
        raise typer.Exit(2) from None
    if bootstrap_servers:
        block = block.model_copy(update={"bootstrap_servers": bootstrap_servers})
    return block.producer_config()


def check_topics(conf: dict[str, Any], topics: Iterable[str], timeout: float = 5.0) -> None:
    """Fail fast (exit 1) when Kafka is unreachable or a topic is missing.

    Without this a producer would wait minutes for a broker or topic that is not there.
    """
    from confluent_kafka import KafkaException

    from fabloop.adapters.kafka import KafkaRefused, cluster_metadata

    where = conf.get("bootstrap.servers", "?")
    try:
        meta = cluster_metadata(conf, timeout, logger=_PROBE_LOG)
    except KafkaRefused as exc:
        fail(exc)
        raise typer.Exit(1) from None
    except KafkaException as exc:
        fail(f"cannot reach Kafka at {where}: {exc.args[0].str() if exc.args else exc}")
        raise typer.Exit(1) from None
    missing = [t for t in topics if t not in meta.topics]
    if missing:
        fail(f"topic {', '.join(missing)} does not exist on Kafka at {where} (`fabloop up` creates the fabloop topics)")
        raise typer.Exit(1)


def _progress() -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console)


# ---------------------------------------------------------------------- replay


def replay_columns(
    *, timestamp_col: str, wafer_col: str, label_col: str | None, tool_col: str | None, chamber_col: str | None,
    recipe_col: str | None, lot_col: str | None, step_col: str | None, sensors: str, secom: bool,
    timezone: str, timestamp_format: str | None, dayfirst: bool, defaults: list[str],
) -> ReplayColumns:
    """The column mapping from the command's options (labels are resolved later, against the table)."""
    from fabloop.core.replay import ReplayColumns, ReplayDefaults

    values: dict[str, Any] = {
        "timestamp": timestamp_col, "wafer": wafer_col, "label": label_col or None, "tool": tool_col,
        "chamber": chamber_col, "recipe": recipe_col, "lot": lot_col, "step": step_col,
        "timezone": timezone, "dayfirst": dayfirst,
    }
    if sensors.strip() not in ("all-numeric", "numeric"):
        names = [s.strip() for s in sensors.split(",") if s.strip()]
        if not names:
            raise ValueError("--sensors: give 'all-numeric' or a comma-separated list of sensor columns")
        values["sensors"] = names
    if timestamp_format:
        values["timestamp_format"] = timestamp_format
    if defaults:
        pairs: dict[str, str] = {}
        roles = ", ".join(ReplayDefaults.model_fields)
        for item in defaults:
            role, sep, value = item.partition("=")
            role = role.strip()
            if not sep:
                raise ValueError(f"--default {item!r}: expected ROLE=VALUE, e.g. tool=ETCH-01")
            if role not in ReplayDefaults.model_fields:
                raise ValueError(f"--default {item!r}: unknown role {role!r} (roles: {roles})")
            pairs[role] = value.strip()
        try:
            values["defaults"] = ReplayDefaults(**pairs)
        except ValidationError as exc:
            raise ValueError(f"--default {_first_error(exc)}") from None
    try:
        return ReplayColumns.secom(**values) if secom else ReplayColumns(**values)
    except ValidationError as exc:
        raise ValueError(_first_error(exc)) from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else str(err["msg"])


def resolve_labels(columns: ReplayColumns, frame: pd.DataFrame, label_pass: list[str],
                   label_fail: list[str]) -> tuple[ReplayColumns, str]:
    """Apply ``--label-pass`` / ``--label-fail``; returns the mapping and how to describe it.

    Both given: exactly those values, anything else is a bad row. One side given:
    every other label value found in the table is the other side (e.g. ``--label-pass 1``
    for a bin column where every bin but 1 fails), and the values are listed.
    """
    from fabloop.core.replay import ReplayColumns

    if columns.label is None or not (label_pass or label_fail):
        return columns, _describe_labels(columns.labels)
    given = ReplayColumns(labels={**{v: "pass" for v in label_pass}, **{v: "fail" for v in label_fail}}).labels
    clash = sorted(set(ReplayColumns(labels={v: "pass" for v in label_pass}).labels)
                   & set(ReplayColumns(labels={v: "fail" for v in label_fail}).labels))
    if clash:
        raise ValueError(f"label value(s) {', '.join(clash)} given with both --label-pass and --label-fail")
    if label_pass and label_fail:
        return columns.model_copy(update={"labels": given}), _describe_labels(given)
    other = "fail" if label_pass else "pass"
    seen = [v for v in frame[columns.label].dropna().astype(str).str.strip().unique() if v]
    found = {k: other for k in ReplayColumns(labels={v: other for v in seen}).labels if k not in given}
    labels = {**found, **given}
    side = "pass" if label_pass else "fail"
    shown = ", ".join(sorted(k for k, v in labels.items() if v == side))
    rest = ", ".join(sorted(found)) or "none in this table"
    return columns.model_copy(update={"labels": labels}), f"{side} = {shown}; {other} = every other value ({rest})"


def _describe_labels(labels: Mapping[str, str]) -> str:
    by = {v: sorted(k for k, verdict in labels.items() if verdict == v) for v in ("pass", "fail")}
    return f"pass = {', '.join(by['pass'])}; fail = {', '.join(by['fail'])}"


def with_line_wafers(frame: pd.DataFrame, columns: ReplayColumns) -> ReplayColumns:
    """Give every row a wafer id from the file and its line, for tables that have none."""
    stem = Path(str(frame.attrs.get("replay_path", "table"))).name.split(".")[0][:60] or "table"
    digest = str(frame.attrs.get("replay_source", "")).rsplit(":", 1)[-1][:8]
    prefix = f"{stem}-{digest}" if digest else stem
    frame[LINE_WAFER] = [f"{prefix}-L{line}" for line in frame.index]
    return columns.model_copy(update={"wafer": LINE_WAFER})


def report_bad_rows(replay: Replay, show: int, out: Path | None) -> None:
    report = replay.report
    if not report.bad_rows:
        say(f"no bad rows ({report.rows} rows read)")
        return
    say(f"{report.skipped_rows} of {report.rows} rows skipped, {len(report.bad_rows)} problem(s) "
        f"(line numbers: {report.line_numbering}):")
    for bad in report.bad_rows[:show]:
        say(f"  {bad}")
    hidden = len(report.bad_rows) - min(show, len(report.bad_rows))
    if hidden:
        say(f"  … {hidden} more" + ("" if out else " (--bad-rows-out FILE writes them all)"))
    if out is not None:
        with out.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["line", "column", "reason"])
            writer.writerows((b.line_number, b.column, b.reason) for b in report.bad_rows)
        say(f"  all {len(report.bad_rows)} problem(s) written to {out}")


def replay(
    file: Annotated[Path, typer.Argument(help="Recorded table: .csv, .csv.gz, .txt or .parquet.", show_default=False)],
    timestamp_col: Annotated[str, typer.Option(help="Column with the process time of the row.")] = "timestamp",
    wafer_col: Annotated[str, typer.Option(help=f"Column with the (globally unique) wafer id; {LINE_WAFER} makes "
                                           "one from the file and line for tables without one.")] = "wafer",
    label_col: Annotated[str, typer.Option(help="Column with the pass/fail label ('' for none: no test events).")]
    = "label",
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
        "stage), e.g. --default fab=FAB7. Repeatable.")] = None,
    speed: Annotated[float, typer.Option(
        min=0, help="Replay speed: simulated time runs SPEED× wall time (3600 = one hour per second; "
        "0 = as fast as possible).")] = 0.0,
    test_delay_minutes: Annotated[float, typer.Option(
        min=0, help="A row's test result is published this long after its sensor reading.")] = 60.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and report; publish nothing.")] = False,
    show_bad_rows: Annotated[int, typer.Option(min=0, help="Bad rows listed in the output.")] = 50,
    bad_rows_out: Annotated[Path | None, typer.Option(help="Write every bad row (line, column, reason) to "
                                                         "this CSV.")] = None,
    bootstrap_servers: BootstrapOpt = None,
    kafka_config: KafkaConfigOpt = None,
    kafka_block: KafkaBlockOpt = None,
    home: HomeOpt = None,
) -> None:
    """Stream a recorded table into Kafka as sensor and test events, in time order."""
    from fabloop.core.replay import ReplayTableError, paced, read_table, replay_events

    try:
        columns = replay_columns(
            timestamp_col=timestamp_col, wafer_col=wafer_col, label_col=label_col, tool_col=tool_col,
            chamber_col=chamber_col, recipe_col=recipe_col, lot_col=lot_col, step_col=step_col, sensors=sensors,
            secom=secom, timezone=timezone, timestamp_format=timestamp_format, dayfirst=dayfirst,
            defaults=default or [],
        )
    except ValueError as exc:
        fail(exc)
        raise typer.Exit(2) from None
    line_wafers = columns.wafer == LINE_WAFER
    t0 = time.monotonic()
    try:
        with console.status(f"reading {file}…"):
            # With @line the wafer column is made after reading: check the others only.
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
    say(f"{file}: {report.rows} rows, {len(report.sensor_columns)} sensor columns "
        f"(read and checked in {time.monotonic() - t0:.1f} s)")
    if columns.label is not None:
        say(f"labels in {columns.label!r}: {labels_text}")
    if report.ignored_columns:
        say(f"ignored non-sensor columns: {', '.join(report.ignored_columns)}")
    if report.nonfinite_values:
        say(f"{report.nonfinite_values} ±inf sensor value(s) sent as null (a broken sensor reading)")
    report_bad_rows(events, show_bad_rows, bad_rows_out)
    if len(events) == 0:
        fail(f"{file}: no row can be replayed; nothing to publish")
        raise typer.Exit(1)

    if dry_run:
        span = _span(events)
        say(f"dry run: would publish {report.sensor_events} sensor and {report.test_events} test events "
            f"({span}); nothing was published")
        return

    conf = kafka_target(home, bootstrap_servers, kafka_config, kafka_block)
    check_topics(conf, (SENSOR_TOPIC, TEST_TOPIC))
    pace = "as fast as possible" if speed == 0 else f"at {speed:g}× real time"
    say(f"publishing to {conf.get('bootstrap.servers')} {pace}")
    stats, seconds, first, last = _publish_with_progress(
        conf, (event for _ts, event in paced(events, speed)), len(events),
        lambda e: f"replaying {e.ts:%Y-%m-%d %H:%M}",
    )
    if stats.failed:
        fail(f"{stats.failed} of {len(events)} events were not delivered; re-running the replay is safe "
             "(same event ids, ingest stores each once)")
        raise typer.Exit(1)
    say(f"published {report.sensor_events} sensor events to {SENSOR_TOPIC} and {report.test_events} test events to "
        f"{TEST_TOPIC} in {seconds:.1f} s ({first:%Y-%m-%d %H:%M} → {last:%Y-%m-%d %H:%M} UTC); "
        f"skipped {report.skipped_rows} bad row(s)")


def _span(events: Replay) -> str:
    """Build every event once (the full validation) and name the time range."""
    first = last = None
    for ts, _event in events:
        first = first or ts
        last = ts
    return f"{first:%Y-%m-%d %H:%M} → {last:%Y-%m-%d %H:%M} UTC"


def _publish_with_progress(
    conf: dict[str, Any], events: Iterable[SensorReading | TestResult], total: int,
    describe: Callable[[SensorReading | TestResult], str] | None = None, label: str = "publishing",
) -> tuple[Any, float, datetime | None, datetime | None]:
    """Publish with a progress bar; Ctrl-C flushes what was handed over and says so."""
    from fabloop.adapters.kafka import KafkaRefused, make_producer, publish_events

    producer = make_producer(conf)
    seen: dict[str, Any] = {"n": 0, "first": None, "last": None}
    t0 = time.monotonic()
    with _progress() as progress:
        bar = progress.add_task(label, total=total)

        def on_event(event: SensorReading | TestResult) -> None:
            seen["n"] += 1
            seen["first"] = seen["first"] or event.ts
            seen["last"] = event.ts
            if describe is None:
                progress.advance(bar)
            else:
                progress.update(bar, advance=1, description=describe(event))

        refused: KafkaRefused | None = None
        try:
            stats = publish_events(producer, events, on_event=on_event)
        except KafkaRefused as exc:
            refused = exc.with_traceback(None)  # drops the frames that hold the producer
        except KeyboardInterrupt:
            left = producer.flush(10)
            progress.stop()
            fail(f"interrupted after {seen['n'] - left} of {total} events; running the command again is safe "
                 "(same event ids, ingest stores each once)")
            raise typer.Exit(130) from None
        if refused is not None:
            progress.stop()
            del producer  # destroyed now, not while the interpreter shuts down
            fail(refused)
            raise typer.Exit(1)
    return stats, time.monotonic() - t0, seen["first"], seen["last"]


# ----------------------------------------------------------------- publish-stdf


def publish_stdf(
    files: Annotated[list[Path], typer.Argument(help="STDF V4 files (.stdf or .stdf.gz).", show_default=False)],
    min_yield_pct: Annotated[float, typer.Option(
        min=0, max=100, help="A wafer event passes when its yield % is at least this.")] = 80.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Parse and report; publish nothing.")] = False,
    bootstrap_servers: BootstrapOpt = None,
    kafka_config: KafkaConfigOpt = None,
    kafka_block: KafkaBlockOpt = None,
    home: HomeOpt = None,
) -> None:
    """Publish tester STDF files as per-wafer and per-part test events.

    Each file is parsed completely before any of its events is sent: a damaged file is reported with the byte offset and contributes nothing; the other files still go.
    """  # noqa: E501 - one line: Typer keeps docstring line breaks in the help
    conf: dict[str, Any] | None = None
    failed: list[str] = []
    published = 0
    for path in files:
        t0 = time.monotonic()
        try:
            with console.status(f"parsing {path}…"):
                summary = read_stdf(path, min_yield_pct=min_yield_pct)
        except StdfError as exc:
            fail(f"{exc} — nothing from this file was published")
            failed.append(str(path))
            continue
        parts = sum(e.part_id is not None for e in summary.events)
        wafer_events = len(summary.events) - parts
        say(f"{path}: lot {summary.lot}, program {summary.program}: {len(summary.wafers)} wafer(s), "
            f"{summary.parts} parts, {summary.parametrics} parametrics (parsed in {time.monotonic() - t0:.1f} s)")
        if summary.orphan_ptrs:
            say(f"  {summary.orphan_ptrs} PTR record(s) outside any part were not attached to an event")
        if dry_run:
            say(f"  dry run: would publish {len(summary.events)} events ({wafer_events} per wafer, {parts} per part)")
            continue
        if conf is None:
            conf = kafka_target(home, bootstrap_servers, kafka_config, kafka_block)
            check_topics(conf, (TEST_TOPIC,))
        stats, seconds, _, _ = _publish_with_progress(conf, summary.events, len(summary.events),
                                                      label=f"publishing {path.name}")
        if stats.failed:
            fail(f"{path}: {stats.failed} of {len(summary.events)} events were not delivered; publishing the file "
                 "again is safe (same event ids, ingest stores each once)")
            failed.append(str(path))
        published += stats.published
        say(f"  published {stats.published} events to {TEST_TOPIC} ({wafer_events} per wafer, {parts} per part) "
            f"in {seconds:.1f} s")
    good = len(files) - len(failed)
    verb = "checked" if dry_run else f"published {published} events from"
    say(f"{verb} {good} of {len(files)} file(s)" + (f"; failed: {', '.join(failed)}" if failed else ""))
    if failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``replay`` and ``publish-stdf`` to the ``fabloop`` app."""
    app.command("replay")(replay)
    app.command("publish-stdf")(publish_stdf)
