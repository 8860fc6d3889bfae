"""prefect.yaml agrees with the code: deployments, entrypoints, flow names, parameters, events, pool.

prefect.yaml is plain text that Prefect reads at deploy time; nothing else notices
when a flow, a parameter or an event is renamed in Python and not there. These
tests load every entrypoint the way the worker does and compare names with
``fabloop.core.names``.
"""

from __future__ import annotations

import inspect
from datetime import timedelta
from fnmatch import fnmatch
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import Flow
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.flows import load_flow_from_entrypoint
from pydantic import TypeAdapter

from fabloop.core import names
from fabloop.deployments import (
    DEPLOYMENTS,
    PREFECT_YAML,
    PULL_STEPS,
    PYTHON_VAR,
    WORK_POOL,
    WORK_POOL_TYPE,
    deployment_name,
    flow_name,
)

PROJECT = PREFECT_YAML.parent
FABLOOP_EVENTS = {
    names.WINDOW_CLOSED, names.DRIFT_DETECTED, names.RETRAIN_REJECTED, names.CHALLENGER_REGISTERED,
    names.CHALLENGER_REJECTED, names.MODEL_PROMOTED, names.MODEL_REJECTED, names.MODEL_SUPERSEDED,
    names.MODEL_ROLLED_BACK,
}


@cache
def project() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(PREFECT_YAML.read_text())
    return spec


def deployment(full_name: str) -> dict[str, Any]:
    found = [d for d in project()["deployments"] if d["name"] == deployment_name(full_name)]
    assert len(found) == 1, f"prefect.yaml defines {deployment_name(full_name)!r} {len(found)} times"
    return found[0]


@cache
def load(entrypoint: str) -> Flow[Any, Any]:
    """The flow as the worker loads it: the entrypoint, relative to the project directory."""
    path, _, function = entrypoint.partition(":")
    return load_flow_from_entrypoint(f"{PROJECT / path}:{function}", use_placeholder_flow=False)


def test_prefect_yaml_defines_exactly_the_shared_deployments() -> None:
    assert sorted(d["name"] for d in project()["deployments"]) == sorted(deployment_name(d) for d in DEPLOYMENTS)


@pytest.mark.parametrize("full_name", DEPLOYMENTS)
def test_entrypoint_is_a_flow_file_of_the_checkout_running_the_named_flow(full_name: str) -> None:
    entrypoint = deployment(full_name)["entrypoint"]
    path, _, function = entrypoint.partition(":")
    # Relative to the checkout (the pull step's working directory), loaded as a script.
    assert path.startswith("flows/") and path.endswith(".py") and function, entrypoint
    assert (PROJECT / path).is_file(), f"{entrypoint}: no such file"
    flow = load(entrypoint)
    assert isinstance(flow, Flow), f"{entrypoint} is not a Prefect flow"
    assert flow.name == flow_name(full_name), f"{entrypoint} runs flow {flow.name!r}, core.names says {full_name!r}"


@pytest.mark.parametrize("full_name", DEPLOYMENTS)
def test_trigger_and_schedule_parameters_are_parameters_of_the_flow(full_name: str) -> None:
    spec = deployment(full_name)
    accepted = set(inspect.signature(load(spec["entrypoint"]).fn).parameters)
    for source in [*spec.get("triggers", []), *spec.get("schedules", [])]:
        given = set(source.get("parameters", {}))
        assert given <= accepted, f"{full_name}: {sorted(given - accepted)} are not parameters of the flow"


def test_drift_checks_are_triggered_by_the_window_closed_event_of_any_model() -> None:
    [trigger] = deployment(names.DRIFT_CHECK_DEPLOYMENT)["triggers"]
    assert trigger["expect"] == [names.WINDOW_CLOSED]
    resource = names.window_resource("yield-ETCH-01", 7)
    assert fnmatch(resource["prefect.resource.id"], trigger["match"]["prefect.resource.id"])
    assert "window_id" in trigger["parameters"]


def test_every_expected_event_is_a_prefect_event_or_a_shared_fabloop_event() -> None:
    for spec in project()["deployments"]:
        for trigger in spec.get("triggers", []):
            for event in trigger["expect"]:
                assert event.startswith("prefect.") or event in FABLOOP_EVENTS, f"{spec['name']}: unknown {event!r}"


def test_failed_and_crashed_ingest_runs_are_restarted_by_their_own_deployment_with_a_delay() -> None:
    [trigger] = deployment(names.INGEST_DEPLOYMENT)["triggers"]
    assert sorted(trigger["expect"]) == ["prefect.flow-run.Crashed", "prefect.flow-run.Failed"]
    assert trigger["match_related"]["prefect.resource.name"] == deployment_name(names.INGEST_DEPLOYMENT)
    # As Prefect reads it at deploy time: the restart waits, it never loops tightly.
    parsed = TypeAdapter(DeploymentEventTrigger).validate_python(trigger)
    assert parsed.schedule_after >= timedelta(seconds=5)
    assert "prefect.flow-run.Cancelled" not in parsed.expect  # a cancelled ingest stays stopped


def test_a_run_after_repeated_failures_waits_longer_up_to_a_cap() -> None:
    from fabloop.flows.ingest import restart_delay

    waits = [restart_delay(n) for n in range(12)]
    assert waits[:2] == [0.0, 0.0]  # the first restart waits only the trigger's schedule_after
    assert waits[2:6] == [10.0, 20.0, 40.0, 80.0]
    assert max(waits) == waits[-1] == 300.0


def test_every_deployment_runs_on_the_process_pool_from_the_checkout() -> None:
    assert WORK_POOL_TYPE == "process"
    assert project()["pull"] == PULL_STEPS
    for spec in project()["deployments"]:
        assert spec["work_pool"]["name"] == WORK_POOL, spec["name"]
        # The launcher, in the venv deploy ran from: one engine process per run, forked warm.
        assert spec["work_pool"]["job_variables"]["command"] == "{{ $" + PYTHON_VAR + " }} -m fabloop.infra.launcher"


def test_deployment_names_split_into_flow_and_deployment() -> None:
    assert (flow_name("drift-check/drift-check"), deployment_name("drift-check/drift-check")) == ("drift-check",) * 2
    assert Path(PREFECT_YAML).name == "prefect.yaml"
