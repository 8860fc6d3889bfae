"""The ``fabloop`` command line."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from fabloop.infra.settings import StackEndpoints, StackSettings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Event-driven retraining for fab models on Prefect.")
console = Console()

HomeOpt = Annotated[Optional[Path], typer.Option("--home", envvar="FABLOOP_HOME", help="State directory of the stack.")]


def _settings(home: Path | None, **overrides: object) -> StackSettings:
    values = {k: v for k, v in overrides.items() if v is not None}
    if home is not None:
        values["home"] = home
    return StackSettings(**values)


def fail(exc: object) -> None:
    """Print an error without Rich markup: messages quote user input such as ``[x]``."""
    console.print(f"error: {exc}", style="red", markup=False, highlight=False)


def load_endpoints(home: Path | None) -> StackEndpoints:
    try:
        return StackEndpoints.load(home)
    except FileNotFoundError as exc:
        fail(exc)
        raise typer.Exit(2) from None


@app.command()
def up(
    home: HomeOpt = None,
    prefect_port: Annotated[Optional[int], typer.Option(help="Port of the embedded Prefect server.")] = None,
    mlflow_port: Annotated[Optional[int], typer.Option(help="Port of the embedded MLflow server.")] = None,
    kafka_port: Annotated[Optional[int], typer.Option(help="Port of the embedded Kafka-compatible broker.")] = None,
    partitions: Annotated[Optional[int], typer.Option(help="Partitions per fabloop topic.")] = None,
    database_url: Annotated[
        Optional[str], typer.Option(envvar="FABLOOP_DATABASE_URL", help="Event store URL, e.g. postgresql+asyncpg://…")
    ] = None,
    prefect_api_url: Annotated[Optional[str], typer.Option(envvar="FABLOOP_PREFECT_API_URL", help="Use this Prefect API instead of starting one.")] = None,
    mlflow_tracking_uri: Annotated[Optional[str], typer.Option(envvar="FABLOOP_MLFLOW_TRACKING_URI", help="Use this MLflow server instead of starting one.")] = None,
    kafka_bootstrap_servers: Annotated[Optional[str], typer.Option(envvar="FABLOOP_KAFKA_BOOTSTRAP_SERVERS", help="Use this Kafka cluster instead of starting a broker.")] = None,
) -> None:
    """Start the embedded stack (broker, Prefect server + worker, MLflow) and wait until healthy."""
    from fabloop.infra.process import PortInUseError
    from fabloop.infra.stack import Stack

    settings = _settings(
        home, prefect_port=prefect_port, mlflow_port=mlflow_port, kafka_port=kafka_port, partitions=partitions,
        database_url=database_url, prefect_api_url=prefect_api_url, mlflow_tracking_uri=mlflow_tracking_uri,
        kafka_bootstrap_servers=kafka_bootstrap_servers,
    )
    ep = settings.resolve()
    explicit = settings.model_fields_set - {"home"}
    try:
        existing = StackEndpoints.load(ep.home)
        if not explicit or any(s.pid for s in Stack(existing).status()):
            # Same home, no new settings (or it is running): keep the stack's endpoints.
            ep = existing
    except FileNotFoundError:
        pass
    t0 = time.monotonic()
    try:
        with console.status("starting the stack…"):
            timings = Stack(ep).up(log=lambda m: console.print(f"  {m}"))
    except PortInUseError as exc:
        fail(exc)
        raise typer.Exit(1) from None
    except (TimeoutError, RuntimeError) as exc:
        fail(exc)
        raise typer.Exit(1) from None
    console.print(f"[green]stack healthy in {time.monotonic() - t0:.1f}s[/green] {timings}")
    _print_status(ep)


@app.command("run")
def run_main(
    home: HomeOpt = None,
    approve_as: Annotated[Optional[str], typer.Option("--approve-as", help="Approve the drift challenger as NAME and finish the loop.")] = None,
    baseline_wafers: Annotated[int, typer.Option(help="Wafers streamed before the drift (bootstrap data).")] = 3000,
    drift_wafers: Annotated[int, typer.Option(help="Wafers streamed with the drift injected.")] = 900,
    drift_tool: Annotated[str, typer.Option(help="Tool whose chamber sensors drift.")] = "ETCH-02",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each stage of the loop.")] = 1500,
) -> None:
    """The main job: stack up, stream, bootstrap champions, inject drift, end on a paused promotion."""
    from fabloop.mainjob import MainJobConfig, run_main_job

    settings = _settings(home)
    try:
        ep = StackEndpoints.load(settings.home.expanduser().resolve())
    except FileNotFoundError:
        ep = settings.resolve()
    cfg = MainJobConfig(baseline_wafers=baseline_wafers, drift_wafers=drift_wafers, drift_tool=drift_tool,
                        approve_as=approve_as, timeout_s=timeout)
    try:
        result = run_main_job(ep, cfg, console)
    except (TimeoutError, RuntimeError) as exc:
        fail(exc)
        raise typer.Exit(1) from None
    (ep.home / "mainjob-result.json").write_text(__import__("json").dumps(result, indent=2, default=str))


@app.command()
def deploy(home: HomeOpt = None) -> None:
    """Register fabloop's deployments, schedules and event triggers (prefect.yaml)."""
    from fabloop.infra.deploy import DEPLOYMENTS
    from fabloop.infra.deploy import deploy as apply_prefect_yaml

    ep = load_endpoints(home)
    with console.status("applying prefect.yaml…"):
        try:
            apply_prefect_yaml(ep)
        except RuntimeError as exc:
            fail(exc)
            raise typer.Exit(1) from None
    console.print(f"deployments ready: {', '.join(DEPLOYMENTS)} on work pool {ep.work_pool}")


@app.command()
def status(home: HomeOpt = None) -> None:
    """Show each component, its URL and health."""
    ep = load_endpoints(home)
    healthy = _print_status(ep)
    raise typer.Exit(0 if healthy else 1)


def _print_status(ep: StackEndpoints) -> bool:
    from fabloop.infra.stack import Stack

    table = Table(title=f"fabloop stack ({ep.home})")
    for col in ("component", "url", "mode", "pid", "health"):
        table.add_column(col)
    rows = Stack(ep).status()
    for s in rows:
        table.add_row(
            s.name, s.url, "embedded" if s.embedded else "external", str(s.pid or "-"),
            "[green]healthy[/green]" if s.healthy else "[red]down[/red]",
        )
    console.print(table)
    console.print(f"event store: {_redact(ep.database_url)}")
    return all(s.healthy for s in rows)


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@app.command()
def down(home: HomeOpt = None) -> None:
    """Stop exactly the processes `fabloop up` started."""
    from fabloop.infra.stack import Stack

    ep = load_endpoints(home)
    ended = Stack(ep).down(log=lambda m: console.print(f"  {m}"))
    console.print(f"stopped {len(ended)} process(es)")


@app.command()
def simulate(
    home: HomeOpt = None,
    wafers: Annotated[int, typer.Option(help="Wafers to process (lots of 25).")] = 500,
    sensors: Annotated[int, typer.Option(help="Sensors per reading.")] = 40,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same stream.")] = 7,
    rate: Annotated[float, typer.Option(help="Events per second (0 = as fast as possible).")] = 0.0,
    start: Annotated[Optional[str], typer.Option(help="Simulated start time (ISO 8601, or 'now'); default a fixed date.")] = None,
    drift: Annotated[
        Optional[list[str]],
        typer.Option(help="Inject drift KIND:TOOL[,TOOL]@WAFER[xMAGNITUDE][:SENSORS], e.g. mean_shift:ETCH-02@300x3. "
                     "Kinds: mean_shift, variance_change, stuck, nan, recipe_change. Repeatable."),
    ] = None,
) -> None:
    """Publish a realistic, seeded fab stream to the stack's Kafka."""
    from datetime import UTC, datetime

    from pydantic import ValidationError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fabloop.adapters.kafka import make_producer, publish_events
    from fabloop.core.publishing import paced_by_rate, parse_drift_spec
    from fabloop.core.simulate import SimulationConfig
    from fabloop.core.simulate import simulate as simulate_events

    ep = load_endpoints(home)
    try:
        options: dict[str, object] = {"wafers": wafers, "n_sensors": sensors, "seed": seed,
                                      "drifts": [parse_drift_spec(d) for d in drift or []]}
        if start:
            options["start"] = datetime.now(UTC) if start == "now" else datetime.fromisoformat(start)
        config = SimulationConfig(**options)
    except (ValueError, ValidationError) as exc:
        fail(exc)
        raise typer.Exit(2) from None
    producer = make_producer(kafka_conf(ep))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("publishing events", total=2 * wafers)
        stats = publish_events(
            producer, paced_by_rate(simulate_events(config), rate), on_event=lambda _e: progress.advance(bar)
        )
    console.print(f"published {stats.published} events ({stats.failed} failed)")
    if stats.failed:
        raise typer.Exit(1)


@app.command()
def ingest(
    home: HomeOpt = None,
    batch_size: Annotated[int, typer.Option(help="Messages per batch (one transaction, one offset commit).")] = 500,
    max_idle: Annotated[Optional[float], typer.Option(help="Stop after this many seconds without messages.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Consumer name (client.id) of this group member.")] = None,
    bootstrap_servers: Annotated[Optional[str], typer.Option(help="Override the Kafka block's bootstrap servers.")] = None,
    database_url: Annotated[Optional[str], typer.Option(help="Override the database block's URL.")] = None,
    catalog: Annotated[str, typer.Option(help="Name of the ModelCatalog block that defines model scopes.")] = "default",
) -> None:
    """Run one ingest consumer in this terminal (as a Prefect flow run); Ctrl-C stops it cleanly."""
    ep = load_endpoints(home)
    from fabloop.infra.stack import prefect_env

    os.environ.update(prefect_env(ep))
    from fabloop.flows.ingest import ingest as ingest_flow

    result = ingest_flow(
        batch_size=batch_size, max_idle_seconds=max_idle, consumer_name=name,
        bootstrap_servers=bootstrap_servers, database_url=database_url, catalog_block=catalog,
    )
    console.print(result)


def kafka_conf(ep: StackEndpoints) -> dict[str, object]:
    """Client settings from the stack's KafkaConnection block (credentials included)."""
    from fabloop.blocks import DEFAULT, KafkaConnection
    from fabloop.infra.bootstrap import prefect_api

    try:
        with prefect_api(ep):
            return KafkaConnection.load(DEFAULT).client_config()
    except Exception:  # noqa: BLE001 - Prefect not reachable: fall back to the stack's address
        return {"bootstrap.servers": ep.kafka_bootstrap_servers}


from fabloop.cli_approvals import register as _register_approvals  # noqa: E402

_register_approvals(app)  # approvals / approve / reject / rollback

from fabloop.cli_data import register as _register_data  # noqa: E402

_register_data(app)  # replay / publish-stdf


def main() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    app()


if __name__ == "__main__":
    main()
