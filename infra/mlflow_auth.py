"""Who may write to the embedded MLflow: its basic-auth app, an admin and fabloop's service account.

The embedded server runs MLflow's ``basic-auth`` app, so every request carries a
username and password. ``fabloop up`` makes three accounts per stack home, each
with a random password kept in ``<home>/secrets/mlflow.json`` (mode 600, never in
``stack.json``): the **admin**, used only by ``up`` to manage accounts;
**fabloop-service**, the account every fabloop client (flows, CLI, the main job)
works as; and **fabloop-viewer**, for people reviewing runs and versions in the
MLflow UI. The service account holds ``MANAGE`` on every experiment and registered
model; every other account gets the server's default, ``READ``: engineers review,
only fabloop moves ``champion`` (a person decides through fabloop's approval,
which is audited). An unauthenticated request is refused (401).

An external MLflow server is used as it is: its credentials come from the
``MLflowServer`` block or MLflow's own ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import httpx
from pydantic import BaseModel, SecretStr

from fabloop.infra.settings import StackEndpoints

ADMIN_USERNAME = "fabloop-admin"
SERVICE_USERNAME = "fabloop-service"
VIEWER_USERNAME = "fabloop-viewer"
# What an account without a grant of its own may do with fabloop's experiments and
# models: read them (the MLflow UI works for reviewers), never change them.
DEFAULT_PERMISSION = "READ"
# What the service account may do: everything fabloop does (log runs, register
# versions, move and delete aliases), on every experiment and registered model.
SERVICE_GRANTS = {"experiment": "MANAGE", "registered_model": "MANAGE"}
USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


class MLflowSecrets(BaseModel):
    """The accounts of one stack home's MLflow server (and its Flask session key)."""

    admin_username: str = ADMIN_USERNAME
    admin_password: SecretStr
    service_username: str = SERVICE_USERNAME
    service_password: SecretStr
    viewer_username: str = VIEWER_USERNAME
    viewer_password: SecretStr
    flask_secret_key: SecretStr

    @classmethod
    def generate(cls) -> MLflowSecrets:
        return cls(admin_password=SecretStr(secrets.token_urlsafe(32)),
                   service_password=SecretStr(secrets.token_urlsafe(32)),
                   viewer_password=SecretStr(secrets.token_urlsafe(16)),
                   flask_secret_key=SecretStr(secrets.token_urlsafe(32)))

    def dump(self) -> str:
        data = self.model_dump()
        for key, value in data.items():
            if isinstance(value, SecretStr):
                data[key] = value.get_secret_value()
        return json.dumps(data, indent=2)


def secrets_file(home: Path) -> Path:
    return home / "secrets" / "mlflow.json"


def auth_config_file(home: Path) -> Path:
    return home / "mlflow" / "basic_auth.ini"


def load_secrets(home: Path) -> MLflowSecrets:
    """The stack's MLflow accounts; FileNotFoundError (naming the file) before the first ``up``."""
    return MLflowSecrets.model_validate_json(secrets_file(home).read_text())


def ensure_secrets(home: Path) -> MLflowSecrets:
    """The stack's MLflow accounts, generated on the first ``up`` of this home.

    Created owner-only and exclusively: two ``up`` racing on one home keep the same
    passwords, and nobody else on the machine can read them.
    """
    path = secrets_file(home)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_secrets(home)
    generated = MLflowSecrets.generate()
    with os.fdopen(fd, "w") as out:
        out.write(generated.dump())
    return generated


def server_env(ep: StackEndpoints) -> dict[str, str]:
    """Environment of the embedded server: its auth config, first admin password and session key.

    The admin password is read by the auth app only while its user table is empty
    (the first start); the config file holds no secret.
    """
    creds = ensure_secrets(ep.home)
    config = auth_config_file(ep.home)
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        "[mlflow]\n"
        f"default_permission = {DEFAULT_PERMISSION}\n"
        f"database_uri = sqlite:///{ep.home / 'mlflow' / 'auth.db'}\n"
        f"admin_username = {creds.admin_username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Password hashes (PBKDF2) cost tens of ms each: without this cache every
        # registry call of every flow run pays one on a 2-core machine. One worker,
        # and password changes through the API invalidate it at once.
        "auth_cache_ttl_seconds = 60\n"
    )
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": creds.admin_password.get_secret_value(),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": creds.flask_secret_key.get_secret_value(),
    }


def _admin(ep: StackEndpoints, creds: MLflowSecrets) -> httpx.Client:
    return httpx.Client(base_url=ep.mlflow_tracking_uri.rstrip("/"), timeout=10.0,
                        auth=(creds.admin_username, creds.admin_password.get_secret_value()))


def admin_accepted(ep: StackEndpoints) -> bool:
    """The server enforces this home's accounts: the admin reads its own user record.

    False for a server without the auth app (no such route) or with other accounts.
    """
    creds = load_secrets(ep.home)
    with _admin(ep, creds) as http:
        return http.get("/api/2.0/mlflow/users/get", params={"username": creds.admin_username}).status_code == 200


def ensure_service_account(ep: StackEndpoints) -> None:
    """Create (or re-key) the service and viewer accounts; grant the service account fabloop's
    experiments and models.

    Idempotent: ``up`` runs it every time, so the accounts match the secrets file
    and a registry created before authentication was enabled is adopted too (the
    grants are wildcards, not per resource).
    """
    creds = load_secrets(ep.home)
    user = creds.service_username
    with _admin(ep, creds) as http:
        for name, password in ((user, creds.service_password), (creds.viewer_username, creds.viewer_password)):
            account = {"username": name, "password": password.get_secret_value()}
            if http.get("/api/2.0/mlflow/users/get", params={"username": name}).status_code == 200:
                resp = http.patch("/api/2.0/mlflow/users/update-password", json=account)
            else:
                resp = http.post("/api/2.0/mlflow/users/create", json=account)
            _raise_for(resp, f"cannot set up the MLflow account {name!r}")
        for resource_type, permission in SERVICE_GRANTS.items():
            grant = {"username": user, "resource_type": resource_type, "resource_id": "*", "permission": permission}
            resp = http.post("/api/3.0/mlflow/users/permissions/grant", json=grant)
            if resp.status_code != 200 and "RESOURCE_ALREADY_EXISTS" not in resp.text:
                _raise_for(resp, f"cannot grant {user!r} {permission} on every {resource_type}")
    # The auth app made its database on first start: password hashes, owner-only.
    (ep.home / "mlflow" / "auth.db").chmod(0o600)


def _raise_for(resp: httpx.Response, what: str) -> None:
    if resp.status_code != 200:
        raise RuntimeError(f"{what}: MLflow answered {resp.status_code} {resp.text[:300]}")


def client_env(ep: StackEndpoints) -> dict[str, str]:
    """``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` of the service account, for an embedded MLflow.

    Empty for an external server (its account is the user's to set) and before the
    first ``up`` of this home.
    """
    if not ep.embedded_mlflow:
        return {}
    try:
        creds = load_secrets(ep.home)
    except FileNotFoundError:
        return {}
    return {USERNAME_ENV: creds.service_username, PASSWORD_ENV: creds.service_password.get_secret_value()}
