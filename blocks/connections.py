"""Connection settings for the components fabloop talks to, as Prefect Blocks.

They are registered and saved (under the name ``default``) by ``fabloop up`` and
edited in the Prefect UI's Blocks page; flows load them at run time, so pointing
fabloop at a real Kafka cluster, MLflow server or PostgreSQL is a block edit,
not a code change.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from prefect.blocks.core import Block
from pydantic import Field, PrivateAttr, SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from fabloop.adapters.store import make_engine

DEFAULT = "default"


class KafkaConnection(Block):
    """How to reach the Kafka cluster (or the embedded Kafka-compatible broker)."""

    _block_type_name = "fabloop Kafka connection"
    _block_type_slug = "fabloop-kafka-connection"
    _description = "Bootstrap servers and credentials for the fab event stream."

    bootstrap_servers: str = Field(default="127.0.0.1:9092", description="host:port[,host:port]")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    consumer_group: str = Field(default="fabloop-ingest", description="Consumer group of the ingest flow.")

    def client_config(self) -> dict[str, Any]:
        """librdkafka settings shared by producers, consumers and the admin client."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        return conf


class MLflowServer(Block):
    """The MLflow tracking server and model registry."""

    _block_type_name = "fabloop MLflow server"
    _block_type_slug = "fabloop-mlflow-server"
    _description = "Tracking URI of the MLflow server that holds runs and the model registry, and fabloop's account."

    tracking_uri: str = "http://127.0.0.1:5000"
    experiment_prefix: str = "fabloop"
    username: str | None = Field(default=None, description="Account fabloop works as (basic auth).")
    password: SecretStr | None = None

    def login(self) -> str:
        """Authenticate this process's MLflow clients as the block's account; returns the tracking URI.

        MLflow's clients (and the processes MLflow spawns) read the account from
        ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, not from an
        argument. Without a username the environment is left as it is.
        """
        if self.username:
            os.environ["MLFLOW_TRACKING_USERNAME"] = self.username
            os.environ["MLFLOW_TRACKING_PASSWORD"] = self.password.get_secret_value() if self.password else ""
        return self.tracking_uri


class FabloopDatabase(Block):
    """fabloop's own event store (SQLite by default, PostgreSQL via asyncpg)."""

    _block_type_name = "fabloop database"
    _block_type_slug = "fabloop-database"
    _description = "SQLAlchemy URL of the event store, e.g. postgresql+asyncpg://user:pw@host/db."

    url: SecretStr = Field(default=SecretStr("sqlite+aiosqlite:///fabloop.db"))

    # One engine per block instance and pool kind, made on first use (like
    # prefect-sqlalchemy's SqlAlchemyConnector.get_engine); never saved with the block.
    # Keyed by URL too: ``model_copy(update={"url": ...})`` shares this dict.
    _engines: dict[tuple[str, bool], AsyncEngine] = PrivateAttr(default_factory=dict)

    def sqlalchemy_url(self) -> str:
        return self.url.get_secret_value()

    def get_engine(self, *, pooled: bool = False) -> AsyncEngine:
        """The event store's engine: without a pool by default, so that one flow run's
        tasks can use it from several event loops; ``pooled=True`` for one long-lived loop
        (the ingestor)."""
        key = (self.sqlalchemy_url(), pooled)
        engine = self._engines.get(key)
        if engine is None:
            engine = self._engines[key] = make_engine(key[0], pooled=pooled)
        return engine
