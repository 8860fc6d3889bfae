"""Things the stack needs inside Prefect before any deployment can run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from pydantic import SecretStr

from fabloop.blocks import DEFAULT, FabloopDatabase, KafkaConnection, MLflowServer, load_block, policy_defaults
from fabloop.infra import prefect_auth
from fabloop.infra.mlflow_auth import load_secrets
from fabloop.infra.settings import WORK_POOL_TYPE, StackEndpoints, prefect_auth_env


@contextmanager
def prefect_api(ep: StackEndpoints) -> Iterator[None]:
    """Point this process's Prefect client at the stack's server."""
    updates: dict[Any, Any] = {PREFECT_API_URL: ep.prefect_api_url}
    if auth := prefect_auth_env(ep).get(prefect_auth.CLIENT_VAR):
        updates[PREFECT_API_AUTH_STRING] = auth
    with temporary_settings(updates=updates):
        yield


def ensure_work_pool(ep: StackEndpoints) -> None:
    with prefect_api(ep), get_client(sync_client=True) as client, suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=ep.work_pool, type=WORK_POOL_TYPE))


def _mlflow_server(ep: StackEndpoints) -> MLflowServer:
    """The MLflow block: for the embedded server, as its service account (fabloop.infra.mlflow_auth)."""
    if not ep.embedded_mlflow:
        return MLflowServer(tracking_uri=ep.mlflow_tracking_uri)
    creds = load_secrets(ep.home)
    return MLflowServer(tracking_uri=ep.mlflow_tracking_uri, username=creds.service_username,
                        password=creds.service_password)


def _kafka_connection(ep: StackEndpoints) -> KafkaConnection:
    """The Kafka block: a real cluster gets the production defaults (replication factor 3,
    idempotent producers); the embedded broker is one node that forgets producer state
    when it restarts (an idempotent producer would then stall), so 1 and off."""
    if not ep.embedded_kafka:
        return KafkaConnection(bootstrap_servers=ep.kafka_bootstrap_servers)
    return KafkaConnection(bootstrap_servers=ep.kafka_bootstrap_servers, replication_factor=1,
                           enable_idempotence=False)


def kafka_connection(ep: StackEndpoints, name: str = DEFAULT) -> KafkaConnection:
    """The stack's saved Kafka block (security settings and credentials included)."""
    with prefect_api(ep):
        return load_block(KafkaConnection, name)


def register_blocks(ep: StackEndpoints) -> None:
    """Register fabloop's block types and save ``default`` documents for this stack.

    Connection blocks always carry the addresses ``fabloop up`` was given (point at a
    real cluster with its options); policy blocks are created once and then belong
    to the user, who edits them in the UI.
    """
    connections: list[Block] = [
        _kafka_connection(ep),
        _mlflow_server(ep),
        FabloopDatabase(url=SecretStr(ep.database_url)),
    ]
    with prefect_api(ep):
        for block in connections:
            # Addresses follow the stack; anything else edited in the UI (security
            # protocol, SASL credentials, consumer group) is kept.
            type(block).register_type_and_schema()
            try:
                saved = load_block(type(block))
            except ValueError:
                block.save(DEFAULT)
                continue
            # The embedded MLflow's service account belongs to the stack home like its address.
            account = ("username", "password") if ep.embedded_mlflow else ()
            # So do the embedded broker's limits (one node, in memory).
            broker = ("replication_factor", "enable_idempotence") if ep.embedded_kafka else ()
            follow = ("bootstrap_servers", "tracking_uri", "url", *account, *broker)
            address = {k: getattr(block, k) for k in follow if hasattr(block, k)}
            if any(getattr(saved, k) != v for k, v in address.items()):
                saved.model_copy(update=address).save(DEFAULT, overwrite=True)
        for block in policy_defaults():
            type(block).register_type_and_schema()
            try:
                load_block(type(block))
            except ValueError:
                block.save(DEFAULT)
