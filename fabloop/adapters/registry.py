"""MLflow as fabloop uses it: training runs, the model registry's roles, reference data, reports.

Aliases name the roles: ``champion`` is the version in production, ``challenger``
the candidate waiting for a decision, ``previous`` the champion before the last
promotion (the target of a rollback). Decisions are also written to the version's
tags (prefix ``fabloop.``), so the MLflow UI shows who promoted a version, when and why.

The champion's training-set sensors are logged with its run as
``reference/sensors.parquet``: that snapshot *is* the drift reference of its scope,
so moving the ``champion`` alias moves the reference with it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient  # re-exported: callers name the client type without importing mlflow
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import Metric, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from pydantic import BaseModel

from fabloop.core.names import CHALLENGER, CHAMPION, PREVIOUS

if TYPE_CHECKING:  # LightGBM is heavy to import; promotion and drift checks never train
    from fabloop.core.tuning import FinalModel, TrialRecord

__all__ = [
    "CHALLENGER", "CHAMPION", "MAX_TAG_VALUE", "MODEL_KIND_TAG", "PREVIOUS", "REFERENCE_ARTIFACT", "TAG_PREFIX",
    "MlflowClient", "ModelVersion", "RegistryError", "Scorer", "VersionInfo", "alias_version", "aliases",
    "all_aliases", "artifact_page_url", "artifact_url", "client",
    "describe", "drop_alias_if_on", "experiment_name", "get_version", "keep_window_report", "load_scorer",
    "log_feature_importance", "log_html", "log_metrics", "log_model", "log_params", "log_reference",
    "log_training_data", "log_trial", "open_window_report", "promote_to_champion", "reference_frame",
    "register_version",
    "rollback_champion", "run_id_of", "run_of", "run_url", "set_alias", "set_run_tags", "set_tags", "start_run",
    "use_experiment", "version_url", "window_report_run",
]

REFERENCE_ARTIFACT = "reference/sensors.parquet"
MODEL_KIND_TAG = "fabloop.model_kind"
BASELINE_SKOPS_TRUSTED_TYPES = ["numpy.dtype"]
TAG_PREFIX = "fabloop."
# Longest comment kept in a tag (the approvals table keeps all of it).
MAX_TAG_VALUE = 5000
# MLflow's own HTTP retries per request (an operator's environment wins).
_HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class RegistryError(RuntimeError):
    """A registry state that makes the requested operation impossible (named in the message)."""


class VersionInfo(BaseModel):
    """What the decision page needs to know about one model version."""

    model: str
    version: str
    run_id: str | None
    experiment_id: str | None
    aliases: list[str]
    tags: dict[str, str]


# --- connection and links --------------------------------------------------------------

def client(tracking_uri: str) -> MlflowClient:
    """A client for the tracking server, also set as the process's tracking URI.

    The fluent API (``mlflow.start_run``, ``log_model``, the child processes MLflow
    spawns) reads the URI from the process, the client from its argument. Both take
    the account from ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` in the process's
    environment (set by ``MLflowServer.login`` in flows, by the CLI from the stack home).
    """
    mlflow.set_tracking_uri(tracking_uri)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    # MLflow retries a refused request 7 times over about four minutes by default; a
    # few quick ones here, and fabloop's task retries (fabloop.tasks.retries) take over.
    for name, value in _HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def version_url(tracking_uri: str, model: str, version: str | int) -> str:
    """The model version page in the MLflow UI."""
    return f"{tracking_uri.rstrip('/')}/#/models/{quote(model, safe='')}/versions/{version}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def artifact_url(tracking_uri: str, run_id: str, artifact_path: str) -> str:
    """A direct link to an artifact served by the tracking server."""
    return f"{tracking_uri.rstrip('/')}/get-artifact?path={artifact_path}&run_uuid={run_id}"


def artifact_page_url(tracking_uri: str, experiment_id: str, run_id: str, artifact_path: str) -> str:
    """The MLflow UI's view of a run artifact: an HTML file opens rendered in the page.

    ``get-artifact`` (:func:`artifact_url`) always answers as a download (MLflow sends
    artifacts as attachments against XSS); the UI's run page with the artifact
    selected shows the same file in a sandboxed frame instead.
    """
    return f"{run_url(tracking_uri, experiment_id, run_id)}/artifactPath/{artifact_path}"


def window_report_run(ml: MlflowClient, model: str, window_id: int) -> Run | None:
    """The monitoring run that keeps window ``window_id``'s drift report, if one was published."""
    experiment = ml.get_experiment_by_name(experiment_name(model, "monitoring"))
    if experiment is None:
        return None
    runs = ml.search_runs([experiment.experiment_id], f"tags.`fabloop.window_id` = '{int(window_id)}'",
                          max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def open_window_report(ml: MlflowClient, model: str, window_id: int, metrics: Mapping[str, float]) -> str:
    """Start window ``window_id``'s monitoring run, with the check's figures; returns its run id.

    Opened as soon as the check has acted on its verdict, before the slow HTML report:
    the retraining's evidence links (:func:`window_report_run`) find the run from then
    on, and its artifact page shows the report once :func:`keep_window_report` logs it.
    """
    # The experiment by id, not as mlflow's process-wide "active experiment": when two
    # checks create it at once, the loser's set_experiment returns without activating it.
    experiment_id = use_experiment(model, "monitoring")
    run = ml.create_run(experiment_id, run_name=f"drift-window-{int(window_id)}",
                        tags={"fabloop.model": model, "fabloop.window_id": str(int(window_id))})
    now = int(time.time() * 1000)
    ml.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    return run.info.run_id


def keep_window_report(ml: MlflowClient, run_id: str, html: str | None, artifact_file: str) -> None:
    """Log the rendered report into its monitoring run and end the run (``None``: FAILED, no report)."""
    if html is None:
        ml.set_terminated(run_id, "FAILED")
        return
    ml.log_text(run_id, html, artifact_file)
    ml.set_terminated(run_id, "FINISHED")


# --- registry: versions and aliases ----------------------------------------------------

def _missing(exc: MlflowException) -> bool:
    """The registry answered "no such model, version, alias or run"; anything else is not an answer."""
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def get_version(ml: MlflowClient, model: str, version: str) -> ModelVersion:
    """The version, or a :class:`RegistryError` naming the model and version."""
    try:
        return ml.get_model_version(model, str(version))
    except MlflowException as exc:
        if _missing(exc):
            raise RegistryError(f"model {model!r} has no version {version!r} in the registry") from None
        raise


def run_id_of(version: ModelVersion) -> str:
    """The training run of a registered version (fabloop registers only versions logged by a run)."""
    if not version.run_id:
        raise RegistryError(f"model {version.name!r} version {version.version} has no training run")
    return str(version.run_id)


def run_of(ml: MlflowClient, version: ModelVersion) -> Run:
    return ml.get_run(run_id_of(version))


def describe(ml: MlflowClient, model: str, version: str) -> VersionInfo:
    mv = get_version(ml, model, version)
    experiment_id = None
    if mv.run_id:
        try:
            experiment_id = ml.get_run(mv.run_id).info.experiment_id
        except MlflowException as exc:
            if not _missing(exc):
                raise  # unreachable is not "deleted": the caller retries or fails
            experiment_id = None  # the run was deleted: the version page still works
    return VersionInfo(
        model=model, version=str(mv.version), run_id=mv.run_id or None, experiment_id=experiment_id,
        aliases=list(mv.aliases or []), tags=dict(mv.tags or {}),
    )


def aliases(ml: MlflowClient, model: str) -> dict[str, str]:
    """Every alias of ``model`` and the version it names (one registry call)."""
    try:
        registered = ml.get_registered_model(model)
    except MlflowException as exc:
        if _missing(exc):
            raise RegistryError(f"model {model!r} is not in the registry") from None
        raise
    return {alias: str(version) for alias, version in (registered.aliases or {}).items()}


def alias_version(ml: MlflowClient, model: str, alias: str) -> ModelVersion | None:
    """The version carrying ``alias``; None when the model or the alias does not exist.

    Any other registry failure (server down, bad credentials) propagates: a scope
    must not be judged "without champion" because MLflow was unreachable.
    """
    try:
        version = aliases(ml, model).get(alias)
    except RegistryError:
        return None
    return None if version is None else ml.get_model_version(model, version)


def register_version(model_uri: str, model: str, tags: Mapping[str, str]) -> ModelVersion:
    """A new version of ``model`` from a logged model, with ``tags`` (created with the version)."""
    return mlflow.register_model(model_uri, model, tags=dict(tags))


def set_alias(ml: MlflowClient, model: str, alias: str, version: str) -> None:
    ml.set_registered_model_alias(model, alias, str(version))


def set_tags(ml: MlflowClient, model: str, version: str, tags: dict[str, object]) -> None:
    """Write ``fabloop.<key>`` tags on a version (None values are skipped)."""
    for key, value in tags.items():
        if value is None:
            continue
        text = value.isoformat() if isinstance(value, datetime) else str(value)
        ml.set_model_version_tag(model, str(version), f"{TAG_PREFIX}{key}", text[:MAX_TAG_VALUE])


def drop_alias_if_on(ml: MlflowClient, model: str, alias: str, version: str) -> None:
    """Remove ``alias`` only if it still names ``version`` (a newer challenger keeps its alias)."""
    if aliases(ml, model).get(alias) == str(version):
        ml.delete_registered_model_alias(model, alias)


def promote_to_champion(ml: MlflowClient, model: str, version: str, replaced: str | None = None) -> str | None:
    """Make ``version`` the champion; the champion it replaces keeps the ``previous`` alias.

    Each step is one registry call and the calls can be interrupted anywhere, so they
    run in the order that never leaves ``champion`` and ``previous`` on the same
    version: ``previous`` leaves ``version`` first, ``champion`` moves in one call (a
    reader never sees a model without a champion), and only then does ``previous``
    name the replaced champion. Running it again completes an interrupted promotion:
    ``champion`` is then already on ``version``, and ``replaced`` (from the decision's
    intent record) names the champion it replaced. Returns the replaced champion's
    version (None for a model's first champion).
    """
    version = str(version)
    get_version(ml, model, version)
    named = aliases(ml, model)
    before = named.get(CHAMPION)
    if before == version:
        before = replaced if replaced != version else None
    if named.get(PREVIOUS) == version:
        ml.delete_registered_model_alias(model, PREVIOUS)
    if named.get(CHAMPION) != version:
        ml.set_registered_model_alias(model, CHAMPION, version)
    if before is not None and named.get(PREVIOUS) != before:
        ml.set_registered_model_alias(model, PREVIOUS, before)
    if named.get(CHALLENGER) == version:
        ml.delete_registered_model_alias(model, CHALLENGER)
    return before


def rollback_champion(
    ml: MlflowClient, model: str, planned: tuple[str, str] | None = None
) -> tuple[str, str]:
    """Move ``champion`` back to ``previous``; returns (demoted, restored) versions.

    Afterwards ``previous`` names the champion the restored version had replaced
    (read from its ``fabloop.previous_champion`` tag), so rollbacks can walk back
    the promotion history; without that tag the alias is removed. ``previous``
    moves before ``champion``: an interruption leaves the old champion in place,
    never ``champion`` and ``previous`` on the same version. ``planned`` (demoted,
    restored), as read before the decision was recorded, makes a repeated call
    finish the same rollback instead of rolling back one step further.
    """
    named = aliases(ml, model)
    current, restored = planned or (named.get(CHAMPION), named.get(PREVIOUS))
    if planned is not None and named.get(CHAMPION) == restored:
        return planned  # done already: a repeated call
    if restored is None:
        raise RegistryError(f"model {model!r} has no version with alias {PREVIOUS!r}: nothing to roll back to")
    if current is None:
        raise RegistryError(f"model {model!r} has no version with alias {CHAMPION!r}: nothing to roll back")
    if named.get(CHAMPION) != current:
        raise RegistryError(f"model {model!r}: {CHAMPION!r} moved to version {named.get(CHAMPION)} meanwhile")
    if current == restored:
        raise RegistryError(f"model {model!r}: {CHAMPION!r} and {PREVIOUS!r} are both on version {current}")
    before_restored = describe(ml, model, restored).tags.get(f"{TAG_PREFIX}previous_champion")
    if before_restored and before_restored not in (restored, current):
        ml.set_registered_model_alias(model, PREVIOUS, before_restored)
    elif named.get(PREVIOUS) is not None:
        ml.delete_registered_model_alias(model, PREVIOUS)
    ml.set_registered_model_alias(model, CHAMPION, restored)
    return current, restored


def all_aliases(ml: MlflowClient) -> dict[str, dict[str, str]]:
    """Every registered model and its aliases (alias -> version), for the audit."""
    out: dict[str, dict[str, str]] = {}
    token: str | None = None
    while True:
        page = ml.search_registered_models(max_results=200, page_token=token)
        for registered in page:
            out[registered.name] = {alias: str(v) for alias, v in (registered.aliases or {}).items()}
        token = page.token
        if not token:
            return out


# --- tracking: experiments, logged models, reference data, reports ---------------------

def experiment_name(model: str, purpose: str) -> str:
    return f"fabloop/{model}/{purpose}"


def use_experiment(model: str, purpose: str) -> str:
    return mlflow.set_experiment(experiment_name(model, purpose)).experiment_id


@contextmanager
def start_run(run_name: str, experiment_id: str | None = None, tags: Mapping[str, str] | None = None) -> Iterator[str]:
    """An MLflow run, active for the logging calls below (and nested trial runs) until the block ends.

    Without ``experiment_id`` the run goes to the experiment :func:`use_experiment` set.
    """
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        if tags:
            mlflow.set_tags(dict(tags))
        yield run.info.run_id


def set_run_tags(tags: Mapping[str, str]) -> None:
    mlflow.set_tags(dict(tags))


def log_params(params: Mapping[str, Any]) -> None:
    mlflow.log_params(dict(params))


def log_metrics(metrics: Mapping[str, float]) -> None:
    mlflow.log_metrics(dict(metrics))


def log_training_data(train: pd.DataFrame, model: str, scope: Mapping[str, str], data_digest: str, label: str) -> None:
    """The training rows as the run's input dataset, traced back to the event store by scope and hash."""
    source = CodeDatasetSource(tags={"fabloop.source": "event store", "fabloop.model": model,
                                     "fabloop.scope": json.dumps(scope), "fabloop.data_hash": data_digest})
    dataset = from_pandas(train, source=source, targets=label, name=f"{model}-train",
                                      digest=data_digest[:36])
    mlflow.log_input(dataset, context="training")


def log_trial(trial: TrialRecord, study: str) -> None:
    """One Optuna trial as a nested run under the active training run."""
    with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True):
        mlflow.log_params({k: v for k, v in trial.params.items()})
        mlflow.set_tags({"fabloop.trial_state": trial.state, "fabloop.study": study})
        metrics = {"duration_s": trial.duration_s}
        if trial.cv_auc is not None:
            metrics["cv_roc_auc"] = trial.cv_auc
        for i, auc in enumerate(trial.fold_aucs):
            metrics[f"fold_{i}_roc_auc"] = auc
        mlflow.log_metrics(metrics)


def _requirements(flavour_defaults: list[str], *packages: str) -> list[str]:
    """MLflow's pinned requirements for the flavour, plus what feeds the model, pinned too."""
    return [*flavour_defaults, *(f"{name}=={package_version(name)}" for name in (*packages, "numpy", "pandas"))]


def log_model(final: FinalModel, example: pd.DataFrame) -> str:
    """Log the trained model with signature and input example; returns its model URI."""
    example = example[final.feature_names].head(5)
    signature = infer_signature(example, final.predict_score(example))
    # Requirements are named, not inferred: inference reloads the model in a fresh
    # interpreter to watch its imports, ~13 s per retraining for a list known here.
    if final.kind == "lightgbm":
        requirements = _requirements(mlflow.lightgbm.get_default_pip_requirements(), "scikit-learn")
        info = mlflow.lightgbm.log_model(final.model, name="model", signature=signature, input_example=example,
                                         pip_requirements=requirements)
    else:
        # MLflow saves sklearn models with skops, which refuses to load any type not on
        # its allowlist; the baseline pipeline (imputer, scaler, logistic regression)
        # keeps a numpy dtype, so without this the baseline could never be logged.
        requirements = _requirements(mlflow.sklearn.get_default_pip_requirements(include_skops=True))
        info = mlflow.sklearn.log_model(final.model, name="model", signature=signature, input_example=example,
                                        skops_trusted_types=BASELINE_SKOPS_TRUSTED_TYPES, pip_requirements=requirements)
    mlflow.set_tag(MODEL_KIND_TAG, final.kind)
    mlflow.log_dict({"features": final.feature_names, "best_iteration": final.best_iteration}, "features.json")
    return str(info.model_uri)


def log_reference(frame: pd.DataFrame) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sensors.parquet"
        frame.reset_index(drop=True).to_parquet(path)
        mlflow.log_artifact(str(path), artifact_path="reference")


def log_feature_importance(final: FinalModel, top: int = 25) -> None:
    """A PNG of what the model leans on (gain for LightGBM, |coefficient| for the baseline)."""
    if final.kind == "lightgbm":
        values = final.model.feature_importance(importance_type="gain")
        label = "total gain"
    else:
        values = np.abs(final.model[-1].coef_[0])
        label = "|coefficient| (standardised)"
    imp = pd.Series(values, index=final.feature_names).sort_values(ascending=False).head(top)[::-1]
    # A bare Figure, not pyplot: no process-wide backend or figure registry in a worker.
    # Lazy: matplotlib is needed only when a model is logged.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 0.28 * len(imp) + 1.2))
    ax = fig.subplots()
    ax.barh(imp.index, imp.values, color="#3b6ea8")
    ax.set_xlabel(label)
    ax.set_title(f"Top {len(imp)} sensors")
    fig.tight_layout()
    mlflow.log_figure(fig, "feature_importance.png")


def log_html(html: str, artifact_file: str) -> None:
    mlflow.log_text(html, artifact_file)


@dataclass
class Scorer:
    """A registered version, loaded for scoring wafers (probability of failing)."""

    version: ModelVersion
    kind: str
    model: Any
    feature_names: list[str]
    best_iteration: int | None = None

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        missing = [c for c in self.feature_names if c not in frame.columns]
        if missing:
            raise KeyError(f"model version {self.version.version} needs sensors the data lacks: {missing[:10]}")
        X = frame[self.feature_names].to_numpy(dtype="float64")
        if self.kind == "lightgbm":
            return np.asarray(self.model.predict(X, num_iteration=self.best_iteration))
        return np.asarray(self.model.predict_proba(X)[:, 1])


# The LightGBM class fabloop logs: saved in LightGBM's own text format, which loads
# without running code (any other class of the flavour is pickled or skops'd).
LIGHTGBM_BOOSTER = "lightgbm.basic.Booster"


def scorer_kind(model: str, version: str, flavors: Mapping[str, Mapping[str, Any]]) -> str:
    """Which of fabloop's own formats a logged model is, read from its MLmodel flavours.

    A LightGBM Booster (``lightgbm`` flavour, text format) or the baseline pipeline
    (``sklearn`` flavour in skops, trusting no type beyond fabloop's allowlist);
    anything else (a pickle, a pyfunc wrapper, a flavour fabloop never logs) could
    run code when loaded, so it is refused, whatever the run's tags say.
    """
    lgbm = flavors.get("lightgbm")
    if lgbm is not None and lgbm.get("model_class") == LIGHTGBM_BOOSTER:
        return "lightgbm"
    sk = flavors.get("sklearn")
    if (sk is not None and sk.get("serialization_format") == "skops"
            and set(sk.get("skops_trusted_types") or []) <= set(BASELINE_SKOPS_TRUSTED_TYPES)):
        return "baseline"
    declared = "; ".join(
        f"{name}" + "".join(f" {k}={conf[k]}" for k in ("model_class", "serialization_format", "loader_module")
                            if isinstance(conf, Mapping) and conf.get(k))
        for name, conf in flavors.items()
    ) or "none"
    raise RegistryError(
        f"model {model!r} version {version} is not a model fabloop writes (flavours: {declared}); "
        f"fabloop loads only the lightgbm flavour ({LIGHTGBM_BOOSTER}) or its skops baseline, never a pickle"
    )


def load_scorer(client: MlflowClient, version: ModelVersion) -> Scorer:
    """The version's model, loaded through its declared flavour once :func:`scorer_kind` accepts it.

    The MLmodel checked is the one loaded: both come from one download.
    """
    uri = f"models:/{version.name}/{version.version}"
    with tempfile.TemporaryDirectory(prefix="fabloop-scorer-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        flavors = Model.load(str(Path(local) / "MLmodel")).flavors
        kind = scorer_kind(version.name, str(version.version), flavors)
        model = mlflow.lightgbm.load_model(local) if kind == "lightgbm" else mlflow.sklearn.load_model(local)
    meta = mlflow.artifacts.load_dict(f"runs:/{run_id_of(version)}/features.json")
    return Scorer(version, kind, model, list(meta["features"]), meta.get("best_iteration"))


def reference_frame(client: MlflowClient, version: ModelVersion, cache_dir: Path | None = None) -> pd.DataFrame:
    """The training-set sensors of a registered version (cached on disk per run).

    Checks of one model run side by side and share the cache: each downloads into a
    private directory and moves the file into place in one step, so no check ever
    reads a file another is still writing.
    """
    run_id = run_id_of(version)
    cache = (cache_dir or Path(tempfile.gettempdir()) / "fabloop-reference") / run_id
    path = cache / Path(REFERENCE_ARTIFACT).name
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as staging:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=REFERENCE_ARTIFACT, dst_path=staging
            )
            os.replace(local, path)
    return pd.read_parquet(path)


# --- drift calibration: the null of a champion's data-drift alarm, kept on its run ------

DRIFT_CALIBRATION_DIR = "drift-calibration"


def drift_calibration_path(window_rows: int, fingerprint: str) -> str:
    """Where a version's run keeps its calibration for windows of ``window_rows`` wafers under one policy."""
    return f"{DRIFT_CALIBRATION_DIR}/w{int(window_rows)}-{fingerprint}.json"


def load_drift_calibration(client: MlflowClient, version: ModelVersion, artifact_file: str) -> dict[str, Any] | None:
    """The calibration a previous check logged on the version's run, or None when there is none yet."""
    run_id = run_id_of(version)
    listed = {a.path for a in client.list_artifacts(run_id, DRIFT_CALIBRATION_DIR)}
    if artifact_file not in listed:
        return None
    try:
        payload: dict[str, Any] = mlflow.artifacts.load_dict(f"runs:/{run_id}/{artifact_file}")
    except (json.JSONDecodeError, MlflowException):  # caught mid-write by a concurrent check: compute afresh
        return None
    return payload


def log_drift_calibration(
    client: MlflowClient, version: ModelVersion, payload: Mapping[str, Any], artifact_file: str
) -> None:
    """Keep a calibration on the version's (finished) run: the next check of the model reads it back.

    Two checks computing it at once write the same content to the same file.
    """
    client.log_dict(run_id_of(version), dict(payload), artifact_file)
