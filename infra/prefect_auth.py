"""Prefect's basic auth for the embedded server: one credential per stack home, never in ``stack.json``.

Prefect OSS protects its API with one shared ``user:password``: the server checks
``PREFECT_SERVER_API_AUTH_STRING`` and every client sends ``PREFECT_API_AUTH_STRING``.
``fabloop up --auth`` generates that credential on the first ``up`` of a home, keeps it
in ``<home>/secrets/prefect-auth`` (mode 600), and hands it to the server and to every
client fabloop starts or is: the worker (and so every flow run it starts),
``prefect deploy``, the CLI, the main job and the health checks. The Prefect UI asks
for it on first load.

For an external Prefect server with basic auth, set ``PREFECT_API_AUTH_STRING`` in the
environment of the ``fabloop`` commands: it is passed on to the worker and the deploy.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

SERVER_VAR = "PREFECT_SERVER_API_AUTH_STRING"
CLIENT_VAR = "PREFECT_API_AUTH_STRING"
USERNAME = "fabloop"

__all__ = ["CLIENT_VAR", "SERVER_VAR", "USERNAME", "auth_file", "basic_auth", "ensure_auth_string",
           "load_auth_string"]


def auth_file(home: Path) -> Path:
    return home / "secrets" / "prefect-auth"


def load_auth_string(home: Path) -> str:
    """The stack's ``user:password``; FileNotFoundError (naming the file) before the first ``up --auth``."""
    return auth_file(home).read_text().strip()


def ensure_auth_string(home: Path) -> str:
    """The stack's credential, generated owner-only and exclusively on the first ``up --auth`` of ``home``."""
    path = auth_file(home)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_auth_string(home)
    value = f"{USERNAME}:{secrets.token_urlsafe(32)}"
    with os.fdopen(fd, "w") as out:
        out.write(value)
    return value


def basic_auth(auth_string: str | None) -> tuple[str, str] | None:
    """``user:password`` as httpx's ``auth=``; None when the API has no auth."""
    if not auth_string:
        return None
    user, _, password = auth_string.partition(":")
    return user, password
