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
from pydantic import Field, PrivateAttr, SecretStr, model_validator
from sqlalchemy.ext.asyncio import AsyncEngine

from fabloop.adapters.kafka import refusal_handler
from fabloop.adapters.store import make_engine

DEFAULT = "default"


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]
# Secrets belong in SecretStr fields (masked in the UI and in logs), never in ``extra``.
_SECRET_WORDS = ("password", "secret", "token")


class KafkaConnection(Block):
    """How to reach the Kafka cluster (or the embedded Kafka-compatible broker).

    Field names are librdkafka's property names with ``_`` for ``.`` (``sasl_password``
    is ``sasl.password``), so an error from the client names the field to fix.
    """

    _block_type_name = "fabloop Kafka connection"
    _block_type_slug = "fabloop-kafka-connection"
    _description = "Bootstrap servers, security and credentials for the fab event stream."

    bootstrap_servers: str = Field(default="127.0.0.1:9092", description="host:port[,host:port]")
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = Field(default=None, description="Required with SASL_PLAINTEXT / SASL_SSL.")
    sasl_username: str | None = Field(default=None, description="PLAIN and SCRAM-SHA-256/512.")
    sasl_password: SecretStr | None = Field(default=None, description="PLAIN and SCRAM-SHA-256/512.")
    sasl_oauthbearer_token_endpoint_url: str | None = Field(
        default=None, description="OAUTHBEARER: the OIDC token endpoint (client-credentials grant).")
    sasl_oauthbearer_client_id: str | None = None
    sasl_oauthbearer_client_secret: SecretStr | None = None
    sasl_oauthbearer_scope: str | None = None
    ssl_ca_location: str | None = Field(
        default=None, description="CA certificate(s) (PEM file) the brokers' certificates are checked against; "
        "unset: the system's CAs.")
    ssl_certificate_location: str | None = Field(default=None, description="Client certificate (PEM), for mTLS.")
    ssl_key_location: str | None = Field(default=None, description="Client private key (PEM), for mTLS.")
    ssl_key_password: SecretStr | None = None
    extra: dict[str, str] = Field(
        default_factory=dict, description="Any other librdkafka properties (e.g. client.rack, "
        "ssl.endpoint.identification.algorithm), applied last. No secrets here: use the secret fields.")
    replication_factor: int | None = Field(
        default=3, ge=1, description="Replication factor of the topics fabloop creates; empty: the "
        "broker's default.replication.factor. The embedded single broker is saved with 1.")
    enable_idempotence: bool = Field(
        default=True, description="Idempotent producers (acks=all, no duplicates on retry). The embedded "
        "broker is saved with it off: it forgets producer state when it restarts.")
    consumer_group: str = Field(default="fabloop-ingest", description="Consumer group of the ingest flow.")

    @model_validator(mode="after")
    def _consistent(self) -> KafkaConnection:
        """Refuse a configuration librdkafka would accept and then fail with at connect time."""
        sasl = self.security_protocol.startswith("SASL_")
        tls = self.security_protocol.endswith("SSL")
        if sasl and self.sasl_mechanism is None:
            raise ValueError(f"sasl_mechanism is required with security_protocol {self.security_protocol}")
        if not sasl and self.sasl_mechanism is not None:
            raise ValueError(f"sasl_mechanism {self.sasl_mechanism} needs security_protocol SASL_PLAINTEXT or "
                             f"SASL_SSL, not {self.security_protocol}")
        if self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            for name in ("sasl_username", "sasl_password"):
                if not getattr(self, name):
                    raise ValueError(f"{name} is required with sasl_mechanism {self.sasl_mechanism}")
        if self.sasl_mechanism == "OAUTHBEARER":
            for name in ("sasl_oauthbearer_token_endpoint_url", "sasl_oauthbearer_client_id",
                         "sasl_oauthbearer_client_secret"):
                if not getattr(self, name):
                    raise ValueError(f"{name} is required with sasl_mechanism OAUTHBEARER (OIDC client credentials)")
        ssl_fields = ("ssl_ca_location", "ssl_certificate_location", "ssl_key_location", "ssl_key_password")
        for name in ssl_fields:
            if getattr(self, name) and not tls:
                raise ValueError(f"{name} is set but security_protocol {self.security_protocol} uses no TLS "
                                 "(SSL or SASL_SSL)")
        if bool(self.ssl_certificate_location) != bool(self.ssl_key_location):
            raise ValueError("ssl_certificate_location and ssl_key_location go together (mTLS)")
        for key in self.extra:
            if any(word in key.lower() for word in _SECRET_WORDS):
                raise ValueError(f"extra[{key!r}] looks like a secret: use the block's secret fields "
                                 "(sasl_password, sasl_oauthbearer_client_secret, ssl_key_password)")
        return self

    def label(self) -> str:
        """How errors name this block: by its saved name when it has one."""
        name = getattr(self, "_block_document_name", None)
        return f"Kafka block {name!r}" if name else "Kafka connection"

    def client_config(self) -> dict[str, Any]:
        """librdkafka settings shared by consumers and the admin client (producers: :meth:`producer_config`).

        Includes an ``error_cb`` that turns a refused authentication or TLS handshake
        into :class:`~fabloop.adapters.kafka.KafkaRefused` naming this block and its field.
        """
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_mechanism == "OAUTHBEARER":
            conf["sasl.oauthbearer.method"] = "oidc"
            conf["sasl.oauthbearer.token.endpoint.url"] = self.sasl_oauthbearer_token_endpoint_url
            conf["sasl.oauthbearer.client.id"] = self.sasl_oauthbearer_client_id
            if self.sasl_oauthbearer_client_secret:
                conf["sasl.oauthbearer.client.secret"] = self.sasl_oauthbearer_client_secret.get_secret_value()
            if self.sasl_oauthbearer_scope:
                conf["sasl.oauthbearer.scope"] = self.sasl_oauthbearer_scope
        elif self.sasl_mechanism:
            conf["sasl.username"] = self.sasl_username
            if self.sasl_password:
                conf["sasl.password"] = self.sasl_password.get_secret_value()
        for name in ("ssl_ca_location", "ssl_certificate_location", "ssl_key_location"):
            if getattr(self, name):
                conf[name.replace("_", ".")] = getattr(self, name)
        if self.ssl_key_password:
            conf["ssl.key.password"] = self.ssl_key_password.get_secret_value()
        conf.update(self.extra)
        conf["error_cb"] = refusal_handler(conf, self.label(), setting_name=lambda prop: prop.replace(".", "_"))
        return conf

    def producer_config(self) -> dict[str, Any]:
        """:meth:`client_config` plus the producer's delivery guarantees."""
        return {
            **self.client_config(),
            "enable.idempotence": self.enable_idempotence,
            "acks": "all",
        }

    def topic_replication(self) -> int:
        """The replication factor for ``NewTopic``: -1 asks for the broker's default."""
        return self.replication_factor if self.replication_factor is not None else -1


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
