"""The ingest flow: a long-running member of the ingest consumer group.

Start it from the Prefect UI (deployment ``ingest/ingest``) and stop it by
cancelling the run: SIGTERM finishes the current batch, commits and exits. No event
fails the run (the ingestor dead-letters what it cannot store). If the run fails or
its process dies anyway, the deployment's own trigger on ``prefect.flow-run.Failed``
and ``prefect.flow-run.Crashed`` starts it again (see prefect.yaml), and a run that
follows several recent failures waits longer before it consumes (``restart_delay``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterEndTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.events import Event
from prefect.events.related import related_resources_from_run_context
from prefect.exceptions import PrefectHTTPStatusError
from pydantic import SecretStr

from fabloop.adapters.ingestor import BatchStats, ClosedWindow, Ingestor, IngestSettings
from fabloop.blocks import DEFAULT, FabloopDatabase, KafkaConnection, ModelCatalog, load_block
from fabloop.core.names import WINDOW_CLOSED, window_resource

ANNOUNCE_ATTEMPTS = 3  # per announcement; the ingestor's sweep tries again later, with backoff


async def announce_window(window: ClosedWindow) -> bool:
    """One Prefect event per closed window; the drift-check deployment is triggered by it.

    Returns True once the Prefect API has accepted the event, and raises when it has
    not: the window then stays unannounced and the ingestor announces it again.
    ``emit_event`` cannot tell: it queues the event for a background websocket client
    that drops it after its reconnect attempts. So the event is posted to the API's
    ``/events`` endpoint, whose 204 says the server has taken it in.
    """
    event = Event(
        event=WINDOW_CLOSED,
        resource=window_resource(window.model, window.id),
        payload={
            "window_id": window.id,
            "model": window.model,
            "scope": window.scope,
            "wafer_count": window.wafer_count,
            "ts_start": window.ts_start.isoformat() if window.ts_start else None,
            "ts_end": window.ts_end.isoformat() if window.ts_end else None,
            "offsets": window.offsets,
            "close_reason": window.close_reason,
        },
    )
    related = False
    for attempt in range(1, ANNOUNCE_ATTEMPTS + 1):
        try:
            # A new client per attempt: Prefect's client retries a refused connection
            # (with backoff, for a minute) only once it has connected; ingest must not wait that long.
            async with get_client() as client:
                if not related:
                    # What emit_event adds: the flow run (and its deployment) that closed the window.
                    event.related += await related_resources_from_run_context(client)
                    related = True
                response = await client.request("POST", "/events", json=[event.model_dump(mode="json")])
                response.raise_for_status()
            return True
        except (httpx.TransportError, PrefectHTTPStatusError) as exc:
            # A refused connection (the server is down) or a refused event (4xx) is not
            # retried here: the ingestor's sweep tries again, with backoff, while ingest goes on.
            refused = isinstance(exc, httpx.ConnectError) or (
                isinstance(exc, PrefectHTTPStatusError) and exc.response.status_code < 500)
            if refused or attempt == ANNOUNCE_ATTEMPTS:
                raise
            await asyncio.sleep(0.5 * attempt)
    raise AssertionError("unreachable")  # the loop returns or raises


RESTART_LOOKBACK = timedelta(minutes=30)
"""Failures of the deployment within this long count toward a restarted run's wait."""


def restart_delay(recent_failures: int, base_s: float = 10.0, cap_s: float = 300.0) -> float:
    """Seconds a restarted run waits before it consumes.

    The restart trigger already waits ``schedule_after`` (prefect.yaml) once; a run
    that keeps failing (the database refusing logins, say) then waits 10, 20, 40 s…
    up to five minutes, instead of restarting in a tight loop.
    """
    if recent_failures <= 1:
        return 0.0
    return float(min(base_s * 2 ** (recent_failures - 2), cap_s))


def _recent_failures(deployment_id: str) -> int:
    """This deployment's runs that ended Failed or Crashed within ``RESTART_LOOKBACK``."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.FAILED, StateType.CRASHED])),
                end_time=FlowRunFilterEndTime(after_=datetime.now(UTC) - RESTART_LOOKBACK),
            ),
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            limit=50,
        )
    return len(runs)


@flow(name="ingest")
def ingest(
    batch_size: int = 500,
    max_idle_seconds: float | None = None,
    consumer_name: str | None = None,
    bootstrap_servers: str | None = None,
    database_url: SecretStr | None = None,
    catalog_block: str = DEFAULT,
) -> dict[str, Any]:
    """Consume sensor and test-data events into the event store until stopped.

    ``bootstrap_servers`` and ``database_url`` override the ``default`` blocks for
    this run only (e.g. to drain one cluster into another store). The URL may hold a
    password: as a ``SecretStr`` it is masked in the run's parameters (UI and API).
    """
    logger = get_run_logger()
    kafka = load_block(KafkaConnection)
    if bootstrap_servers:
        kafka = kafka.model_copy(update={"bootstrap_servers": bootstrap_servers})
    # The ingestor keeps its connections for the whole run (a pooled engine), and
    # migrates the store to the newest schema before its first batch.
    database = FabloopDatabase(url=database_url) if database_url else load_block(FabloopDatabase)
    engine = database.get_engine(pooled=True)
    catalog = load_block(ModelCatalog, catalog_block).value()
    name = consumer_name or f"ingest-{socket.gethostname()}-{os.getpid()}"

    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        logger.info("signal %s: finishing the current batch, then stopping", signum)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    deployment_id = runtime.deployment.id
    if deployment_id:  # a deployment run, perhaps restarted by the trigger after a failure
        try:
            failures = _recent_failures(deployment_id)
        except Exception as exc:  # noqa: BLE001 - the wait is a courtesy; ingest matters more
            logger.warning("could not count recent failed runs (%s): starting without a wait", exc)
            failures = 0
        delay = restart_delay(failures)
        if delay:
            logger.warning("%d failed or crashed ingest runs in the last %s: waiting %.0f s before consuming",
                           failures, RESTART_LOOKBACK, delay)
            stop.wait(delay)

    def on_batch(stats: BatchStats) -> None:
        logger.info("batch: %s", stats.line())

    ingestor = Ingestor(
        kafka.client_config(), engine, catalog, group=kafka.consumer_group, producer_conf=kafka.producer_config(),
        settings=IngestSettings(batch_size=batch_size, consumer_name=name),
        announce=announce_window, on_batch=on_batch,
    )
    try:
        totals = asyncio.run(_run(ingestor, stop, max_idle_seconds))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("ingest stopped: %s", totals.line())
    create_markdown_artifact(
        key="ingest-summary",
        markdown=f"## Ingest `{name}` stopped\n\n{totals.line()}\n",
        description="What this ingest run consumed, stored and dead-lettered.",
    )
    return {"consumed": totals.consumed, "stored": totals.stored, "dead_lettered": totals.dead_lettered,
            "duplicates": totals.duplicates, "windows_closed": totals.windows_closed}



async def _run(ingestor: Ingestor, stop: threading.Event, max_idle: float | None) -> BatchStats:
    try:
        return await ingestor.run(stop, max_idle_s=max_idle)
    finally:
        await ingestor.engine.dispose()


if __name__ == "__main__":
    ingest()
