"""What every ``fabloop`` command shares: the console, errors, ``--home``, the stack's endpoints.

The command modules import this module only, never each other nor the package,
so the app (``fabloop.cli``) sits above them and nothing imports back up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fabloop.infra.mlflow_auth import client_env
from fabloop.infra.settings import StackEndpoints, StackSettings, prefect_env

console = Console()

HomeOpt = Annotated[Path | None, typer.Option("--home", envvar="FABLOOP_HOME", help="State directory of the stack.")]


def settings(home: Path | None, **overrides: object) -> StackSettings:
    """Stack settings from the environment, with the options the user gave on top."""
    values = {k: v for k, v in overrides.items() if v is not None}
    if home is not None:
        values["home"] = home
    return StackSettings(**values)  # type: ignore[arg-type]


def fail(exc: object, *, soft_wrap: bool = False) -> None:
    """Print an error without Rich markup: messages quote user input such as ``[x]``."""
    console.print(f"error: {exc}", style="red", markup=False, highlight=False, soft_wrap=soft_wrap)


def credential_refused(exc: BaseException) -> str | None:
    """What to tell the user when a 401 is anywhere in the exception's chain; None for any other error."""
    import httpx

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, httpx.HTTPStatusError) and current.response.status_code == 401:
            url = current.request.url.copy_with(query=None)
            return (f"{url} refused this client's credential (401): for a stack started with `fabloop up --auth` "
                    "the credential is <home>/secrets/prefect-auth; for an external server, set "
                    "PREFECT_API_AUTH_STRING")
        current = current.__cause__ or current.__context__
    return None


def load_endpoints(home: Path | None) -> StackEndpoints:
    """The endpoints ``fabloop up`` recorded; exit 2 with the reason when there are none."""
    try:
        return StackEndpoints.load(home)
    except FileNotFoundError as exc:
        fail(exc)
        raise typer.Exit(2) from None


def connect(home: Path | None) -> StackEndpoints:
    """Point this process's Prefect client at the stack before anything imports Prefect,
    and its MLflow clients at the stack's service account."""
    ep = load_endpoints(home)
    os.environ.update(prefect_env(ep))
    os.environ.update(client_env(ep))
    return ep
