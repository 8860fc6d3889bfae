"""Where the stack lives and how to reach it.

``StackSettings`` is read from ``FABLOOP_*`` environment variables (and CLI
options). ``fabloop up`` resolves it into :class:`StackEndpoints`, written to
``$FABLOOP_HOME/stack.json`` so that every later command, flow and test reaches
the same components without re-deriving ports.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path.home() / ".fabloop"
WORK_POOL = "fabloop-process"
WORK_POOL_TYPE = "process"  # Prefect's process worker: flow runs are subprocesses of the stack's worker


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

    @property
    def prefect_ui_url(self) -> str:
        return self.prefect_api_url.removesuffix("/api")

    @property
    def state_file(self) -> Path:
        return self.home / "stack.json"

    def save(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, home: Path | None = None) -> StackEndpoints:
        home = (home or StackSettings().home).expanduser().resolve()
        path = home / "stack.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: start the stack with `fabloop up` (FABLOOP_HOME={home})"
            )
        return cls.model_validate(json.loads(path.read_text()))


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
    }
