"""``fabloop up / run / deploy / status / down``: the embedded stack and the main job."""

# Imports of the stack, the main job and SQLAlchemy sit inside the commands: they pull
# in Prefect, MLflow and Kafka clients, and ``fabloop --help`` should not wait for them.

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.table import Table

from fabloop.cli._common import HomeOpt, console, fail, load_endpoints, settings
from fabloop.infra.process import PortInUseError
from fabloop.infra.settings import StackEndpoints


def up(
    home: HomeOpt = None,
    prefect_port: Annotated[int | None, typer.Option(help="Port of the embedded Prefect server.")] = None,
    mlflow_port: Annotated[int | None, typer.Option(help="Port of the embedded MLflow server.")] = None,
    kafka_port: Annotated[int | None, typer.Option(help="Port of the embedded Kafka-compatible broker.")] = None,
    partitions: Annotated[int | None, typer.Option(help="Partitions per fabloop topic.")] = None,
    database_url: Annotated[
        str | None, typer.Option(envvar="FABLOOP_DATABASE_URL", help="Event store URL, e.g. postgresql+asyncpg://…")
    ] = None,
    prefect_api_url: Annotated[str | None, typer.Option(
        envvar="FABLOOP_PREFECT_API_URL", help="Use this Prefect API instead of starting one.")] = None,
    mlflow_tracking_uri: Annotated[str | None, typer.Option(
        envvar="FABLOOP_MLFLOW_TRACKING_URI", help="Use this MLflow server instead of starting one.")] = None,
    kafka_bootstrap_servers: Annotated[str | None, typer.Option(
        envvar="FABLOOP_KAFKA_BOOTSTRAP_SERVERS", help="Use this Kafka cluster instead of starting a broker.")] = None,
    auth: Annotated[bool | None, typer.Option(
        "--auth/--no-auth", envvar="FABLOOP_PREFECT_AUTH",
        help="Turn on the embedded Prefect server's basic auth for the server and every client; the "
             "credential is kept in <home>/secrets/prefect-auth (mode 600).")] = None,
) -> None:
    """Start the embedded stack (broker, Prefect server + worker, MLflow) and wait until healthy."""
    from fabloop.infra.stack import Stack

    stack_settings = settings(
        home, prefect_port=prefect_port, mlflow_port=mlflow_port, kafka_port=kafka_port, partitions=partitions,
        database_url=database_url, prefect_api_url=prefect_api_url, mlflow_tracking_uri=mlflow_tracking_uri,
        kafka_bootstrap_servers=kafka_bootstrap_servers, prefect_auth=auth,
    )
    if stack_settings.prefect_auth and prefect_api_url:
        fail("--auth protects the embedded Prefect server; for an external one, set PREFECT_API_AUTH_STRING")
        raise typer.Exit(2)
    ep = stack_settings.resolve()
    explicit = stack_settings.model_fields_set - {"home"}
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


def run_main(
    home: HomeOpt = None,
    approve_as: Annotated[str | None, typer.Option(
        "--approve-as", help="Approve the drift challenger as NAME and finish the loop.")] = None,
    baseline_wafers: Annotated[int, typer.Option(help="Wafers streamed before the drift (bootstrap data).")] = 3000,
    drift_wafers: Annotated[int, typer.Option(help="Wafers streamed with the drift injected.")] = 900,
    drift_tool: Annotated[str, typer.Option(help="Tool whose chamber sensors drift.")] = "ETCH-02",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each stage of the loop.")] = 1500,
) -> None:
    """The main job: stack up, stream, bootstrap champions, inject drift, end on a paused promotion."""
    from fabloop.mainjob import MainJobConfig, run_main_job

    stack_settings = settings(home)
    try:
        ep = StackEndpoints.load(stack_settings.home.expanduser().resolve())
    except FileNotFoundError:
        ep = stack_settings.resolve()
    cfg = MainJobConfig(baseline_wafers=baseline_wafers, drift_wafers=drift_wafers, drift_tool=drift_tool,
                        approve_as=approve_as, timeout_s=timeout)
    try:
        result = run_main_job(ep, cfg, console)
    except (TimeoutError, RuntimeError) as exc:
        fail(exc)
        raise typer.Exit(1) from None
    (ep.home / "mainjob-result.json").write_text(json.dumps(result, indent=2, default=str))


def deploy(
    home: HomeOpt = None,
    notify_block: Annotated[str | None, typer.Option(
        envvar="FABLOOP_NOTIFY_BLOCK",
        help="Name of the notification block (any type) messages go through [default: fabloop-notify].")] = None,
) -> None:
    """Register fabloop's deployments, schedules and event triggers (prefect.yaml), and the notifications."""
    from fabloop.deployments import DEPLOYMENTS, deployment_name
    from fabloop.deployments import deploy as apply_prefect_yaml
    from fabloop.deployments.notifications import notification_status

    ep = load_endpoints(home)
    with console.status("applying prefect.yaml…"):
        try:
            apply_prefect_yaml(ep, notify_block=notify_block)
        except RuntimeError as exc:
            fail(exc)
            raise typer.Exit(1) from None
    names = ", ".join(deployment_name(d) for d in DEPLOYMENTS)
    console.print(f"deployments ready: {names} on work pool {ep.work_pool}")
    console.print(notification_status(ep, notify_block), markup=False, highlight=False)


def status(home: HomeOpt = None) -> None:
    """Show each component, its URL and health."""
    ep = load_endpoints(home)
    healthy = _print_status(ep)
    if healthy:
        from fabloop.deployments.notifications import notification_status

        try:
            line = notification_status(ep)
        except Exception as exc:  # noqa: BLE001 - a status line, not a failure of the stack
            line = f"notifications: unknown ({exc})"
        console.print(line, markup=False, highlight=False)
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
    if ep.prefect_auth:
        console.print(f"Prefect API: basic auth on (credential in {ep.home / 'secrets' / 'prefect-auth'})",
                      markup=False, highlight=False)
    return all(s.healthy for s in rows)


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def down(home: HomeOpt = None) -> None:
    """Stop exactly the processes `fabloop up` started."""
    from fabloop.infra.stack import Stack

    ep = load_endpoints(home)
    ended = Stack(ep).down(log=lambda m: console.print(f"  {m}"))
    console.print(f"stopped {len(ended)} process(es)")


def register(app: typer.Typer) -> None:
    """Add ``up``, ``run``, ``deploy``, ``status`` and ``down`` to the ``fabloop`` app."""
    app.command("up")(up)
    app.command("run")(run_main)
    app.command("deploy")(deploy)
    app.command("status")(status)
    app.command("down")(down)
