"""MLflow: training runs, the model registry's champion/challenger, reference data, reports.

The champion's training-set sensors are logged with its run as
``reference/sensors.parquet``: that snapshot *is* the drift reference of its scope,
so moving the ``champion`` alias moves the reference with it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from fabloop.core.tuning import FinalModel

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
REFERENCE_ARTIFACT = "reference/sensors.parquet"
MODEL_KIND_TAG = "fabloop.model_kind"
BASELINE_SKOPS_TRUSTED_TYPES = ["numpy.dtype"]


def connect(tracking_uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(tracking_uri)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    return MlflowClient(tracking_uri)


def experiment_name(model: str, purpose: str) -> str:
    return f"fabloop/{model}/{purpose}"


def use_experiment(model: str, purpose: str) -> str:
    return mlflow.set_experiment(experiment_name(model, purpose)).experiment_id


def alias_version(client: MlflowClient, model: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(model, alias)
    except MlflowException:
        return None


def version_url(tracking_uri: str, model: str, version: str | int) -> str:
    return f"{tracking_uri.rstrip('/')}/#/models/{model}/versions/{version}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _requirements(flavour_defaults: list[str], *packages: str) -> list[str]:
    """MLflow's pinned requirements for the flavour, plus what feeds the model, pinned too."""
    from importlib.metadata import version

    return [*flavour_defaults, *(f"{name}=={version(name)}" for name in (*packages, "numpy", "pandas"))]


def log_model(final: FinalModel, example: pd.DataFrame) -> str:
    """Log the trained model with signature and input example; returns its model URI."""
    from mlflow.models import infer_signature

    example = example[final.feature_names].head(5)
    signature = infer_signature(example, final.predict_score(example))
    # Requirements are named, not inferred: inference reloads the model in a fresh
    # interpreter to watch its imports, ~13 s per retraining for a list known here.
    if final.kind == "lightgbm":
        info = mlflow.lightgbm.log_model(final.model, name="model", signature=signature, input_example=example,
                                         pip_requirements=_requirements(mlflow.lightgbm.get_default_pip_requirements(), "scikit-learn"))
    else:
        # MLflow saves sklearn models with skops, which refuses to load any type not on
        # its allowlist; the baseline pipeline (imputer, scaler, logistic regression)
        # keeps a numpy dtype, so without this the baseline could never be logged.
        info = mlflow.sklearn.log_model(final.model, name="model", signature=signature, input_example=example,
                                        skops_trusted_types=BASELINE_SKOPS_TRUSTED_TYPES,
                                        pip_requirements=_requirements(mlflow.sklearn.get_default_pip_requirements(include_skops=True)))
    mlflow.set_tag(MODEL_KIND_TAG, final.kind)
    mlflow.log_dict({"features": final.feature_names, "best_iteration": final.best_iteration}, "features.json")
    return info.model_uri


def log_reference(frame: pd.DataFrame) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sensors.parquet"
        frame.reset_index(drop=True).to_parquet(path)
        mlflow.log_artifact(str(path), artifact_path="reference")


def log_feature_importance(final: FinalModel, top: int = 25) -> None:
    """A PNG of what the model leans on (gain for LightGBM, |coefficient| for the baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if final.kind == "lightgbm":
        values = final.model.feature_importance(importance_type="gain")
        label = "total gain"
    else:
        values = np.abs(final.model[-1].coef_[0])
        label = "|coefficient| (standardised)"
    imp = pd.Series(values, index=final.feature_names).sort_values(ascending=False).head(top)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(imp) + 1.2))
    ax.barh(imp.index, imp.values, color="#3b6ea8")
    ax.set_xlabel(label)
    ax.set_title(f"Top {len(imp)} sensors")
    fig.tight_layout()
    mlflow.log_figure(fig, "feature_importance.png")
    plt.close(fig)


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
        return self.model.predict_proba(X)[:, 1]


def load_scorer(client: MlflowClient, version: ModelVersion) -> Scorer:
    run = client.get_run(version.run_id)
    kind = run.data.tags.get(MODEL_KIND_TAG, "lightgbm")
    uri = f"models:/{version.name}/{version.version}"
    meta = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/features.json")
    model = mlflow.lightgbm.load_model(uri) if kind == "lightgbm" else mlflow.sklearn.load_model(uri)
    return Scorer(version, kind, model, list(meta["features"]), meta.get("best_iteration"))


def reference_frame(client: MlflowClient, version: ModelVersion, cache_dir: Path | None = None) -> pd.DataFrame:
    """The training-set sensors of a registered version (cached on disk per run)."""
    cache = (cache_dir or Path(tempfile.gettempdir()) / "fabloop-reference") / version.run_id
    path = cache / "sensors.parquet"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        local = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=REFERENCE_ARTIFACT, dst_path=str(cache))
        path = Path(local)
    return pd.read_parquet(path)


def log_html(html: str, artifact_file: str) -> None:
    mlflow.log_text(html, artifact_file)


def artifact_url(tracking_uri: str, run_id: str, artifact_path: str) -> str:
    """A direct link to an artifact served by the tracking server."""
    return f"{tracking_uri.rstrip('/')}/get-artifact?path={artifact_path}&run_uuid={run_id}"
