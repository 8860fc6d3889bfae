"""The real stack and broker as tests reach them: the ``fabloop`` command line, endpoints, addresses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from fabloop.infra.mlflow_auth import client_env, load_secrets
from fabloop.infra.prefect_auth import CLIENT_VAR, basic_auth
from fabloop.infra.process import free_port
from fabloop.infra.settings import StackEndpoints, prefect_env

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"


def fabloop(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the real ``fabloop`` command line."""
    proc = subprocess.run(
        [sys.executable, "-m", "fabloop.cli", *args],
        env={**os.environ, "COLUMNS": "200", **(env or {})}, capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"fabloop {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class RunningStack:
    ep: StackEndpoints
    env: dict[str, str]
    up_seconds: float
    up_output: str

    @property
    def kafka_conf(self) -> dict[str, str]:
        return {"bootstrap.servers": self.ep.kafka_bootstrap_servers}

    @property
    def prefect_auth(self) -> tuple[str, str] | None:
        """The Prefect API's basic-auth credential when the stack has one (``fabloop up --auth``)."""
        return basic_auth(self.env.get(CLIENT_VAR))

    @property
    def mlflow_account(self) -> tuple[str, str]:
        """The service account (username, password), for plain HTTP to the stack's MLflow (links, artifacts)."""
        creds = load_secrets(self.ep.home)
        return creds.service_username, creds.service_password.get_secret_value()


def start_stack(home: Path, partitions: int = 3, auth: bool = False) -> RunningStack:
    env = {"FABLOOP_HOME": str(home)}
    args = [
        "up", "--prefect-port", str(free_port()), "--mlflow-port", str(free_port()),
        "--kafka-port", str(free_port()), "--partitions", str(partitions), *(["--auth"] if auth else []),
    ]
    t0 = time.monotonic()
    try:
        out = fabloop(*args, env=env, timeout=600)  # `up` reports its own timeouts before this
    except (AssertionError, subprocess.TimeoutExpired):
        # What did start must not outlive the session (its logs stay in the home).
        fabloop("down", env=env, timeout=120, check=False)
        raise
    elapsed = time.monotonic() - t0
    ep = StackEndpoints.load(home)
    # MLflow's clients in the tests (and what they start) work as the stack's service account.
    return RunningStack(ep=ep, env={**env, **prefect_env(ep), **client_env(ep)}, up_seconds=elapsed,
                        up_output=out.stdout)


def registry_alias(ep: StackEndpoints, model: str, alias: str) -> tuple[str, dict[str, str]] | None:
    """The version ``alias`` names and its tags, read as the stack's service account; None if unset.

    Plain REST with the account given per request: MLflow's client takes its account
    from the process environment, which belongs to the session's stack, not this one.
    """
    creds = load_secrets(ep.home)
    with httpx.Client(base_url=f"{ep.mlflow_tracking_uri.rstrip('/')}/api/2.0/mlflow", timeout=30,
                      auth=(creds.service_username, creds.service_password.get_secret_value())) as http:
        resp = http.get("/registered-models/get", params={"name": model})
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        named = {a["alias"]: a["version"] for a in resp.json()["registered_model"].get("aliases", [])}
        if alias not in named:
            return None
        resp = http.get("/model-versions/get", params={"name": model, "version": named[alias]})
        resp.raise_for_status()
        mv = resp.json()["model_version"]
    return str(mv["version"]), {t["key"]: t["value"] for t in mv.get("tags", [])}


@dataclass
class Broker:
    bootstrap: str

    @property
    def conf(self) -> dict[str, str]:
        return {"bootstrap.servers": self.bootstrap}


def stack_processes(home: Path) -> list[psutil.Process]:
    """Every process of the stack at ``home``: its components and what they started (flow runs)."""
    return [p for p in psutil.process_iter(["cmdline", "environ"]) if _belongs_to(p, str(home))]


def _belongs_to(proc: psutil.Process, home: str) -> bool:
    try:
        cmd = " ".join(proc.info["cmdline"] or [])
        env = proc.info["environ"] or {}
        return home in cmd or env.get("FABLOOP_HOME") == home or home in env.get("PREFECT_HOME", "")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
