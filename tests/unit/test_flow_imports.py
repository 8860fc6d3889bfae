"""Each flow module imports only what its flow uses: a flow run is a fresh process.

A worker starts every flow run in a new Python process that imports the flow's
module, so a heavy package imported there is paid on every run, before the flow
body starts. LightGBM and Optuna belong to the retraining, Evidently to the drift
verdict (imported when a check first needs it), MLflow to the flows that talk to
the registry. Each module is imported in a fresh interpreter and the packages it
loaded are read from ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("lightgbm", "optuna", "evidently", "mlflow")

# What each flow module must not load when imported.
NOT_LOADED = {
    "fabloop.flows.drift_check": {"lightgbm", "optuna"},
    "fabloop.flows.retrain": {"evidently"},
    "fabloop.flows.promote": {"lightgbm", "optuna", "evidently"},
    "fabloop.flows.ingest": {"lightgbm", "optuna", "evidently", "mlflow"},
    "fabloop.flows.promotion_timeout": {"lightgbm", "optuna", "evidently", "mlflow"},
}


def _loaded(module: str) -> set[str]:
    """The heavy packages a fresh interpreter holds after importing ``module``."""
    probe = (
        f"import importlib, json, sys; importlib.import_module({module!r}); "
        f"print(json.dumps([p for p in {HEAVY!r} if p in sys.modules]))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", sorted(NOT_LOADED))
def test_a_flow_module_does_not_import_the_heavy_packages_its_flow_does_not_use(module: str) -> None:
    loaded = _loaded(module)
    assert not loaded & NOT_LOADED[module], (
        f"importing {module} loads {sorted(loaded & NOT_LOADED[module])}: every run of its flow pays for them; "
        "import them where they are used (see python -X importtime)"
    )


def test_the_probe_sees_a_heavy_package_that_is_imported() -> None:
    """The control: tuning brings LightGBM and Optuna, and the probe reports both."""
    assert {"lightgbm", "optuna"} <= _loaded("fabloop.core.tuning")
