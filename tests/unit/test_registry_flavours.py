"""Which logged models fabloop will load for scoring, decided from their MLmodel flavours alone."""

from __future__ import annotations

from typing import Any

import pytest

from fabloop.adapters.registry import BASELINE_SKOPS_TRUSTED_TYPES, RegistryError, scorer_kind

PYFUNC = {"python_function": {"loader_module": "mlflow.lightgbm", "data": "model.lgb"}}


@pytest.mark.parametrize(("flavors", "kind"), [
    ({"lightgbm": {"model_class": "lightgbm.basic.Booster", "data": "model.lgb"}, **PYFUNC}, "lightgbm"),
    ({"sklearn": {"serialization_format": "skops", "skops_trusted_types": BASELINE_SKOPS_TRUSTED_TYPES}}, "baseline"),
    ({"sklearn": {"serialization_format": "skops", "skops_trusted_types": None}}, "baseline"),
])
def test_the_formats_fabloop_writes_are_loaded_by_their_flavour(flavors: dict[str, Any], kind: str) -> None:
    assert scorer_kind("yield-ETCH-01", "3", flavors) == kind


@pytest.mark.parametrize(("flavors", "named"), [
    # LightGBM's scikit-learn wrapper is pickled (or skops'd) under the same flavour name
    ({"lightgbm": {"model_class": "lightgbm.sklearn.LGBMClassifier", "serialization_format": "cloudpickle"}},
     "model_class=lightgbm.sklearn.LGBMClassifier"),
    ({"sklearn": {"serialization_format": "cloudpickle", "pickled_model": "model.pkl"}},
     "serialization_format=cloudpickle"),
    # skops trusting a type beyond fabloop's allowlist would load whatever that type does
    ({"sklearn": {"serialization_format": "skops", "skops_trusted_types": ["builtins.eval"]}}, "sklearn"),
    ({"python_function": {"loader_module": "mlflow.pyfunc.model", "python_model": "python_model.pkl"}},
     "python_function loader_module=mlflow.pyfunc.model"),
    ({}, "flavours: none"),
])
def test_anything_else_is_refused_naming_model_version_and_flavour(flavors: dict[str, Any], named: str) -> None:
    with pytest.raises(RegistryError) as refused:
        scorer_kind("yield-ETCH-01", "3", flavors)
    message = str(refused.value)
    assert "model 'yield-ETCH-01' version 3" in message and named in message, message
