"""Where the stack lives and how to reach it.

``StackSettings`` is read from ``FABLOOP_*`` environment variables (and CLI
options). ``fabloop up`` resolves it into :class:`StackEndpoints`, written to
``$FABLOOP_HOME/stack.json`` so that every later command, flow and test reaches
the same components without re-deriving ports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

from fabloop.infra import prefect_auth

DEFAULT_HOME = Path.home() / ".fabloop"
WORK_POOL = "fabloop-process"
WORK_POOL_TYPE = "process"  # Prefect's process worker: each run's launcher is its subprocess (fabloop.infra.launcher)


class StackSettings(BaseSettings):
    """Knobs for the embedded stack; any ``*_url`` set means "use that external one"."""

    model_config = SettingsConfigDict(env_prefix="FABLOOP_", extra="ignore")

    home: Path = DEFAULT_HOME
    host: str = "127.0.0.1"
    prefect_port: int = 4200
    mlflow_port: int = 5000
    kafka_port: int = 9092
    partitions: int = Field(default=3, ge=1)
    database_url: str | None = None
    prefect_api_url: str | None = None
    mlflow_tracking_uri: str | None = None
    kafka_bootstrap_servers: str | None = None
    work_pool: str = WORK_POOL
    prefect_auth: bool = Field(default=False, description=(
        "Turn on the embedded Prefect server's basic auth (fabloop.infra.prefect_auth)."))

    def resolve(self) -> StackEndpoints:
        home = self.home.expanduser().resolve()
        return StackEndpoints(
            home=home,
            prefect_api_url=self.prefect_api_url or f"http://{self.host}:{self.prefect_port}/api",
            mlflow_tracking_uri=self.mlflow_tracking_uri or f"http://{self.host}:{self.mlflow_port}",
            kafka_bootstrap_servers=self.kafka_bootstrap_servers or f"{self.host}:{self.kafka_port}",
            database_url=self.database_url or f"sqlite+aiosqlite:///{home / 'fabloop.db'}",
            partitions=self.partitions,
            work_pool=self.work_pool,
            embedded_prefect=self.prefect_api_url is None,
            embedded_mlflow=self.mlflow_tracking_uri is None,
            embedded_kafka=self.kafka_bootstrap_servers is None,
            prefect_auth=self.prefect_auth,
        )


class StackEndpoints(BaseModel):
    """The resolved addresses of one running stack."""

    home: Path
    prefect_api_url: str
    mlflow_tracking_uri: str
    kafka_bootstrap_servers: str
    database_url: str
    partitions: int = 3
    work_pool: str = WORK_POOL
    embedded_prefect: bool = True
    embedded_mlflow: bool = True
    embedded_kafka: bool = True
    prefect_auth: bool = False
    """The embedded Prefect server checks basic auth; the credential is in ``<home>/secrets``."""

    @property
    def prefect_ui_url(self) -> str:
        return self.prefect_api_url.removesuffix("/api")

    @property
    def state_file(self) -> Path:
        return self.home / "stack.json"

    @property
    def database_url_file(self) -> Path:
        return self.home / "secrets" / "database-url"

    def save(self) -> None:
        """``stack.json`` holds no secret: a database password goes to ``secrets/`` (mode 600)."""
        self.home.mkdir(parents=True, exist_ok=True)
        url = make_url(self.database_url)
        stored = self
        if url.password is not None:
            self.database_url_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.database_url_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(self.database_url)
            stored = self.model_copy(update={"database_url": url.render_as_string(hide_password=True)})
        self.state_file.write_text(stored.model_dump_json(indent=2))

    @classmethod
    def load(cls, home: Path | None = None) -> StackEndpoints:
        home = (home or StackSettings().home).expanduser().resolve()
        path = home / "stack.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: start the stack with `fabloop up` (FABLOOP_HOME={home})"
            )
        ep = cls.model_validate(json.loads(path.read_text()))
        if make_url(ep.database_url).password is not None:
            try:
                return ep.model_copy(update={"database_url": ep.database_url_file.read_text()})
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"{ep.database_url_file} not found: the event store's password is kept there; "
                    f"run `fabloop up --database-url …` again") from None
        return ep


# How often a Prefect client retries a request the server answered "retry later"
# (503, 429) or could not answer, with exponential back-off (2, 4, … 256 s). The
# embedded server keeps its state in SQLite, which refuses a write that meets another
# (503 "database is locked") while a burst of runs writes at once; Prefect's default
# of 5 retries gives up after about a minute, and a drift check would then fail.
CLIENT_MAX_RETRIES = 8


def prefect_env(ep: StackEndpoints) -> dict[str, str]:
    """Environment for any process that talks to this stack's Prefect server."""
    return {
        "PREFECT_HOME": str(ep.home / "prefect"),
        "PREFECT_API_URL": ep.prefect_api_url,
        "PREFECT_CLIENT_MAX_RETRIES": str(CLIENT_MAX_RETRIES),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "FABLOOP_HOME": str(ep.home),
        **prefect_auth_env(ep),
    }


def prefect_auth_env(ep: StackEndpoints) -> dict[str, str]:
    """The client credential for the stack's Prefect API: the stack's own, or the operator's for an external one."""
    value = prefect_auth.load_auth_string(ep.home) if ep.prefect_auth else os.environ.get(prefect_auth.CLIENT_VAR)
    return {prefect_auth.CLIENT_VAR: value} if value else {}
