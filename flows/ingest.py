"""The ingest flow: a long-running member of the ingest consumer group.

Start it from the Prefect UI (deployment ``ingest/ingest``) and stop it by
cancelling the run: SIGTERM finishes the current batch, commits and exits. If the
process dies instead, the deployment's own trigger on ``prefect.flow-run.Crashed``
starts it again (see prefect.yaml).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from pydantic import SecretStr

from fabloop.adapters.ingestor import BatchStats, ClosedWindow, Ingestor, IngestSettings
from fabloop.blocks import DEFAULT, FabloopDatabase, KafkaConnection, ModelCatalog, load_block
from fabloop.core.names import WINDOW_CLOSED, window_resource


def announce_window(window: ClosedWindow) -> None:
    """One Prefect event per closed window; the drift-check deployment is triggered by it."""
    emit_event(
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


@flow(name="ingest")
def ingest(
    batch_size: int = 500,
    max_idle_seconds: float | None = None,
    consumer_name: str | None = None,
    bootstrap_servers: str | None = None,
    database_url: str | None = None,
    catalog_block: str = DEFAULT,
) -> dict[str, Any]:
    """Consume sensor and test-data events into the event store until stopped.

    ``bootstrap_servers`` and ``database_url`` override the ``default`` blocks for
    this run only (e.g. to drain one cluster into another store).
    """
    logger = get_run_logger()
    kafka = load_block(KafkaConnection)
    if bootstrap_servers:
        kafka = kafka.model_copy(update={"bootstrap_servers": bootstrap_servers})
    # The ingestor keeps its connections for the whole run (a pooled engine), and
    # migrates the store to the newest schema before its first batch.
    database = FabloopDatabase(url=SecretStr(database_url)) if database_url else load_block(FabloopDatabase)
    engine = database.get_engine(pooled=True)
    catalog = load_block(ModelCatalog, catalog_block).value()
    name = consumer_name or f"ingest-{socket.gethostname()}-{os.getpid()}"

    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        logger.info("signal %s: finishing the current batch, then stopping", signum)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_batch(stats: BatchStats) -> None:
        logger.info("batch: %s", stats.line())

    ingestor = Ingestor(
        kafka.client_config(), engine, catalog, group=kafka.consumer_group,
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
