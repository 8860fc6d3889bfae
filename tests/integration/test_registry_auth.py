"""Registry writes limited: the embedded MLflow authenticates, fabloop's service account writes,
and a version is loaded for scoring only through a flavour fabloop itself writes."""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from fabloop.infra.mlflow_auth import PASSWORD_ENV, USERNAME_ENV, load_secrets, secrets_file
from tests.helpers.promotion import register, tiny_model_uris, unique_model
from tests.helpers.stack import RunningStack

pytestmark = pytest.mark.integration


def _client(stack: RunningStack) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stack.ep.mlflow_tracking_uri, registry_uri=stack.ep.mlflow_tracking_uri)


def _refused(code: int, call: Any, *args: Any) -> None:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=f"error code {code} != 200"):
        call(*args)


@pytest.fixture
def model(stack: RunningStack) -> tuple[str, list[str]]:
    """A model with two versions, champion on the first, registered as the service account."""
    name = unique_model("auth")
    return name, register(stack.ep.mlflow_tracking_uri, name, tiny_model_uris(stack.ep.mlflow_tracking_uri)[:2],
                          {"champion": 0})


def test_anonymous_and_wrong_password_clients_cannot_touch_the_registry(
    stack: RunningStack, model: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, (v1, v2) = model
    uri = tiny_model_uris(stack.ep.mlflow_tracking_uri)[2]
    ml = _client(stack)
    monkeypatch.delenv(USERNAME_ENV)
    monkeypatch.delenv(PASSWORD_ENV)
    _refused(401, ml.set_registered_model_alias, name, "champion", v2)
    _refused(401, ml.create_model_version, name, uri)
    _refused(401, ml.get_registered_model, name)  # not even a read
    base = stack.ep.mlflow_tracking_uri
    for page in (f"{base}/", f"{base}/get-artifact?path=features.json&run_uuid=0"):  # the UI, a report link
        assert httpx.get(page, timeout=30).status_code == 401, page
    assert httpx.get(f"{base}/", timeout=30, auth=stack.mlflow_account).status_code == 200
    monkeypatch.setenv(USERNAME_ENV, load_secrets(stack.ep.home).service_username)
    monkeypatch.setenv(PASSWORD_ENV, "not-the-password")
    _refused(401, ml.set_registered_model_alias, name, "champion", v2)
    _refused(401, ml.create_model_version, name, uri)
    monkeypatch.undo()  # the service account again: nothing moved, and it can write
    assert _client(stack).get_registered_model(name).aliases == {"champion": v1}
    _client(stack).set_registered_model_alias(name, "champion", v2)
    assert _client(stack).get_registered_model(name).aliases == {"champion": v2}


@pytest.mark.parametrize("account", ["viewer", "new"])
def test_other_accounts_read_but_only_the_service_account_writes(
    stack: RunningStack, model: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch, account: str
) -> None:
    name, (v1, v2) = model
    creds = load_secrets(stack.ep.home)
    if account == "viewer":  # the account `fabloop up` makes for people reviewing in the MLflow UI
        user, password = creds.viewer_username, creds.viewer_password.get_secret_value()
    else:  # any account an admin adds later gets the server's default permission
        user, password = f"engineer-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        created = httpx.post(f"{stack.ep.mlflow_tracking_uri}/api/2.0/mlflow/users/create", timeout=30,
                             json={"username": user, "password": password},
                             auth=(creds.admin_username, creds.admin_password.get_secret_value()))
        assert created.status_code == 200, created.text
    monkeypatch.setenv(USERNAME_ENV, user)
    monkeypatch.setenv(PASSWORD_ENV, password)
    ml = _client(stack)
    assert ml.get_registered_model(name).aliases == {"champion": v1}  # an engineer reviews in MLflow
    _refused(403, ml.set_registered_model_alias, name, "champion", v2)
    _refused(403, ml.delete_registered_model_alias, name, "champion")
    _refused(403, ml.create_model_version, name, tiny_model_uris(stack.ep.mlflow_tracking_uri)[2])
    monkeypatch.undo()
    assert _client(stack).get_registered_model(name).aliases == {"champion": v1}


def test_secrets_live_only_in_the_owner_only_file_and_the_block(stack: RunningStack) -> None:
    from fabloop.blocks import DEFAULT, MLflowServer

    creds = load_secrets(stack.ep.home)
    path = secrets_file(stack.ep.home)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((stack.ep.home / "mlflow" / "auth.db").stat().st_mode) == 0o600  # password hashes
    block = MLflowServer.load(DEFAULT)
    assert block.username == creds.service_username
    assert block.password is not None and block.password.get_secret_value() == creds.service_password.get_secret_value()
    assert creds.service_password.get_secret_value() not in json.dumps(block.model_dump(mode="json"))
    secrets = [creds.admin_password.get_secret_value(), creds.service_password.get_secret_value(),
               creds.viewer_password.get_secret_value(), creds.flask_secret_key.get_secret_value()]
    public = [stack.ep.state_file, stack.ep.home / "mlflow" / "basic_auth.ini",
              *(stack.ep.home / "logs").glob("*.log"), *(stack.ep.home / "run").glob("*.json")]
    for file in public:
        text = Path(file).read_text(errors="replace")
        assert not any(secret in text for secret in secrets), f"a secret in {file}"


# --- models load through their declared flavour only -------------------------------------


def _sprung(path: str) -> object:
    """Called when a trap is unpickled: the proof that loading ran code from the artifact."""
    Path(path).write_text("unpickled")
    return object()


class _Trap:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _sprung, (self.marker,)


def _register_logged(stack: RunningStack, log: Any, tags: dict[str, str] | None = None) -> Any:
    """Log a model with ``log`` (inside a run) and register it as version 1 of a new model."""
    import mlflow

    mlflow.set_tracking_uri(stack.ep.mlflow_tracking_uri)
    mlflow.set_experiment("fabloop-test-registry-auth")
    with mlflow.start_run():
        if tags:
            mlflow.set_tags(tags)
        info = log()
    return mlflow.register_model(info.model_uri, unique_model("flavour"))


def test_load_scorer_refuses_models_fabloop_does_not_write_without_unpickling(
    stack: RunningStack, tmp_path: Path
) -> None:
    import mlflow
    from mlflow.pyfunc import PythonModel

    from fabloop.adapters.registry import MODEL_KIND_TAG, RegistryError, load_scorer

    marker = tmp_path / "sprung"

    class TrapModel(PythonModel):
        def __init__(self) -> None:
            self.trap = _Trap(str(marker))

        def predict(self, context: Any, model_input: list[Any]) -> list[Any]:
            return model_input

    cases = {
        # a pyfunc wrapper (cloudpickled), as anyone with mlflow.pyfunc would log it
        "python_function": lambda: mlflow.pyfunc.log_model(name="model", python_model=TrapModel(),
                                                           pip_requirements=["mlflow"]),
        # a pickled "sklearn" model whose run claims to be fabloop's baseline: the tag must not matter
        "sklearn serialization_format=cloudpickle": lambda: mlflow.sklearn.log_model(
            _Trap(str(marker)), name="model", serialization_format="cloudpickle", pip_requirements=["scikit-learn"]),
    }
    ml = _client(stack)
    for flavour, log in cases.items():
        mv = _register_logged(stack, log, tags={MODEL_KIND_TAG: "baseline"})
        assert not marker.exists(), "logging alone must not have unpickled the trap"
        with pytest.raises(RegistryError) as refused:
            load_scorer(ml, ml.get_model_version(mv.name, mv.version))
        message = str(refused.value)
        assert f"model {mv.name!r} version {mv.version}" in message and flavour in message, message
        assert not marker.exists(), f"load_scorer unpickled a {flavour} model"


def test_load_scorer_loads_the_lightgbm_model_fabloop_logs(stack: RunningStack) -> None:
    import lightgbm as lgb
    import numpy as np
    import pandas as pd

    from fabloop.adapters import registry
    from fabloop.core.tuning import FinalModel

    rng = np.random.default_rng(5)
    frame = pd.DataFrame(rng.normal(size=(120, 3)), columns=["rf_power", "pressure", "temp"])
    label = (frame["rf_power"] > 0).astype(int)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 4}, lgb.Dataset(frame, label), 5)
    final = FinalModel("lightgbm", booster, list(frame.columns), 5, 0.9)
    mv = _register_logged(stack, lambda: _LoggedUri(registry.log_model(final, frame)))
    ml = _client(stack)
    scorer = registry.load_scorer(ml, ml.get_model_version(mv.name, mv.version))
    assert scorer.kind == "lightgbm"
    np.testing.assert_allclose(scorer.score(frame), final.predict_score(frame))


class _LoggedUri:
    """``registry.log_model`` returns the model URI; ``_register_logged`` expects a model info."""

    def __init__(self, model_uri: str) -> None:
        self.model_uri = model_uri
