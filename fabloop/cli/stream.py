"""``fabloop simulate / ingest``: a seeded fab stream into Kafka, and one ingest consumer."""

# The simulator, the Kafka client and the ingest flow are imported inside the commands:
# they bring numpy, confluent_kafka and Prefect, which ``fabloop --help`` does not need
# (and Prefect must see the stack's settings, which ``connect`` sets, when it loads).

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from pydantic import SecretStr, ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fabloop.cli._common import HomeOpt, connect, console, fail, load_endpoints
from fabloop.infra.settings import StackEndpoints


def simulate(
    home: HomeOpt = None,
    wafers: Annotated[int, typer.Option(help="Wafers to process (lots of 25).")] = 500,
    sensors: Annotated[int, typer.Option(help="Sensors per reading.")] = 40,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same stream.")] = 7,
    rate: Annotated[float, typer.Option(help="Events per second (0 = as fast as possible).")] = 0.0,
    start: Annotated[str | None, typer.Option(
        help="Simulated start time (ISO 8601, or 'now'); default a fixed date.")] = None,
    drift: Annotated[
        list[str] | None,
        typer.Option(help="Inject drift KIND:TOOL[,TOOL]@WAFER[xMAGNITUDE][:SENSORS], e.g. mean_shift:ETCH-02@300x3. "
                     "Kinds: mean_shift, variance_change, stuck, nan, recipe_change. Repeatable."),
    ] = None,
) -> None:
    """Publish a realistic, seeded fab stream to the stack's Kafka."""
    from fabloop.adapters.kafka import KafkaRefused, make_producer, publish_events
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
    producer = make_producer(_producer_conf(ep))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("publishing events", total=2 * wafers)
        refused: KafkaRefused | None = None
        try:
            stats = publish_events(
                producer, paced_by_rate(simulate_events(config), rate), on_event=lambda _e: progress.advance(bar)
            )
        except KafkaRefused as exc:
            refused = exc.with_traceback(None)  # drops the frames that hold the producer
    if refused is not None:
        del producer  # destroyed now, not while the interpreter shuts down
        fail(refused)
        raise typer.Exit(1)
    console.print(f"published {stats.published} events ({stats.failed} failed)")
    if stats.failed:
        raise typer.Exit(1)


def _producer_conf(ep: StackEndpoints) -> dict[str, Any]:
    """The Kafka block's producer settings (security, idempotence); the stack's own address
    when its Prefect cannot be reached, as before."""
    from fabloop.infra.bootstrap import kafka_connection

    try:
        return kafka_connection(ep).producer_config()
    except ValidationError:
        raise
    except Exception:  # noqa: BLE001 - Prefect not reachable (or no block yet)
        return {"bootstrap.servers": ep.kafka_bootstrap_servers}


def ingest(
    home: HomeOpt = None,
    batch_size: Annotated[int, typer.Option(help="Messages per batch (one transaction, one offset commit).")] = 500,
    max_idle: Annotated[float | None, typer.Option(help="Stop after this many seconds without messages.")] = None,
    name: Annotated[str | None, typer.Option(help="Consumer name (client.id) of this group member.")] = None,
    bootstrap_servers: Annotated[str | None, typer.Option(
        help="Override the Kafka block's bootstrap servers.")] = None,
    database_url: Annotated[str | None, typer.Option(help="Override the database block's URL.")] = None,
    catalog: Annotated[str, typer.Option(help="Name of the ModelCatalog block that defines model scopes.")] = "default",
) -> None:
    """Run one ingest consumer in this terminal (as a Prefect flow run); Ctrl-C stops it cleanly."""
    connect(home)
    from fabloop.flows.ingest import ingest as ingest_flow

    result = ingest_flow(
        batch_size=batch_size, max_idle_seconds=max_idle, consumer_name=name,
        bootstrap_servers=bootstrap_servers, database_url=SecretStr(database_url) if database_url else None,
        catalog_block=catalog,
    )
    console.print(result)


def register(app: typer.Typer) -> None:
    """Add ``simulate`` and ``ingest`` to the ``fabloop`` app."""
    app.command("simulate")(simulate)
    app.command("ingest")(ingest)
