"""The Docker and Kubernetes deployments, applied to a real Prefect server and read back.

There is no Docker daemon or cluster here, so no run executes; what is checked is
everything up to the worker: the server knows both pool types offline (the pools
are created with ``prefect work-pool create --type``), ``prefect deploy`` accepts the
rendered files, and what the server keeps (entrypoints, job variables, pull steps,
triggers) is what prefect.yaml and ``deployments/container.py`` say, and fits the
pool's base job template.

Its own Prefect server, not the session stack's: these deployments carry the same
names as the process pool's, and would take them over for the rest of the session.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jsonschema
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import WorkPool
from prefect.client.schemas.responses import DeploymentResponse
from prefect.events.schemas.automations import Automation
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.templating import apply_values

from fabloop.deployments import DEPLOYMENTS, PREFECT_YAML, deployment_name
from fabloop.deployments.container import (
    IMAGE_WORKDIR,
    KUBERNETES_JOB_TEMPLATE,
    ContainerTarget,
    create_work_pool,
    deploy,
    pull_steps,
)
from fabloop.infra.process import ProcessManager, clean_env, free_port, wait_until
from fabloop.infra.settings import StackEndpoints
from fabloop.infra.stack import PROJECT_DIR, components

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TARGETS = {
    "docker": ContainerTarget(pool_type="docker", image="registry.fab.example/fabloop:0.1.0",
                              docker_networks=["fabloop"], env={"TZ": "UTC"}),
    "kubernetes": ContainerTarget(pool_type="kubernetes", image="registry.fab.example/fabloop:0.1.0",
                                  image_pull_policy="Always", namespace="fab-ml", memory_limit="6Gi",
                                  git_repository="https://git.fab.example/ml/fabloop.git", git_branch="release"),
}
PROJECT: dict[str, Any] = yaml.safe_load(PREFECT_YAML.read_text())


@dataclass
class Applied:
    """What the server kept after one pool type's deploy."""

    pool: WorkPool
    created: bool
    deployments: dict[str, DeploymentResponse]
    triggers: dict[str, list[Automation]]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackEndpoints]:
    home = tmp_path_factory.mktemp("container-pools")
    (home / "prefect").mkdir()
    ep = StackEndpoints(home=home, prefect_api_url=f"http://127.0.0.1:{free_port()}/api",
                        mlflow_tracking_uri="http://127.0.0.1:9", kafka_bootstrap_servers="127.0.0.1:9",
                        database_url=f"sqlite+aiosqlite:///{home / 'fabloop.db'}")
    [server] = [c for c in components(ep) if c.name == "prefect"]
    pm = ProcessManager(home)
    pm.start("prefect", server.command(ep), clean_env(server.env(ep)), cwd=PROJECT_DIR)
    try:
        wait_until(lambda: server.healthy(ep), 120, what="prefect server")
        yield ep
    finally:
        pm.stop("prefect")


@pytest.fixture(scope="module")
def applied(prefect_server: StackEndpoints) -> dict[str, Applied]:
    """Each pool type deployed in turn (same deployment names), and read back before the next."""
    out = {}
    for kind, target in TARGETS.items():
        created = create_work_pool(prefect_server, target)
        deploy(prefect_server, target)
        with temporary_settings(updates={PREFECT_API_URL: prefect_server.prefect_api_url}), \
                get_client(sync_client=True) as client:
            deployments = {name: client.read_deployment_by_name(name) for name in DEPLOYMENTS}
            triggers = {name: client.read_resource_related_automations(f"prefect.deployment.{d.id}")
                        for name, d in deployments.items()}
            out[kind] = Applied(client.read_work_pool(target.pool_name), created, deployments, triggers)
    return out


def source(full_name: str) -> dict[str, Any]:
    [spec] = [d for d in PROJECT["deployments"] if d["name"] == deployment_name(full_name)]
    return spec


@pytest.mark.parametrize("kind", TARGETS)
def test_the_server_knows_the_pool_type_and_its_job_template_without_the_worker_packages(
    applied: dict[str, Applied], kind: str
) -> None:
    got = applied[kind]
    assert got.created and got.pool.type == kind and got.pool.name == TARGETS[kind].pool_name
    variables = got.pool.base_job_template["variables"]["properties"]
    assert {"image", "image_pull_policy", "env", "command"} <= set(variables)
    if kind == "kubernetes":
        assert got.pool.base_job_template == json.loads(KUBERNETES_JOB_TEMPLATE.read_text())


@pytest.mark.parametrize("kind", TARGETS)
def test_every_deployment_runs_prefect_yamls_entrypoint_on_the_container_pool(
    applied: dict[str, Applied], kind: str
) -> None:
    target = TARGETS[kind]
    for full_name, dep in applied[kind].deployments.items():
        spec = source(full_name)
        assert dep.entrypoint == spec["entrypoint"], full_name
        assert dep.work_pool_name == target.pool_name, full_name
        assert sorted(dep.tags) == sorted(spec["tags"]), full_name
        assert len(dep.schedules) == len(spec.get("schedules", [])), full_name
        # Code from the image's /app or a git clone: nothing of the deploying machine.
        assert dep.pull_steps == pull_steps(target), full_name
        assert str(PROJECT_DIR) not in json.dumps([dep.pull_steps, dep.job_variables]), full_name
    for full_name in ("drift-check/drift-check", "retrain/retrain"):
        limit = applied[kind].deployments[full_name].global_concurrency_limit
        assert limit is not None and limit.limit == source(full_name)["concurrency_limit"], full_name
    if kind == "docker":
        assert pull_steps(target) == [{"prefect.deployments.steps.set_working_directory": {"directory": IMAGE_WORKDIR}}]
    else:
        [step] = pull_steps(target)
        assert step["prefect.deployments.steps.git_clone"]["repository"] == target.git_repository


@pytest.mark.parametrize("kind", TARGETS)
def test_job_variables_carry_the_image_and_each_deployments_env_and_fit_the_pool_template(
    applied: dict[str, Applied], kind: str
) -> None:
    target, got = TARGETS[kind], applied[kind]
    schema = got.pool.base_job_template["variables"]
    for full_name, dep in got.deployments.items():
        variables = dep.job_variables
        assert variables["image"] == target.image and variables["image_pull_policy"] == target.image_pull_policy
        own_env = ((source(full_name).get("work_pool") or {}).get("job_variables") or {}).get("env") or {}
        assert variables["env"] == {**target.env, **own_env}, full_name
        jsonschema.validate(variables, schema)  # what the worker will accept for this pool
    # Ingest and retrain keep their 30 s heartbeat (the crash detection depends on it).
    for name in ("ingest/ingest", "retrain/retrain"):
        assert got.deployments[name].job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"


def test_the_kubernetes_job_is_the_image_as_non_root_in_its_namespace_with_resources(
    applied: dict[str, Applied],
) -> None:
    """The Job the worker would submit: the pool's template with the deployment's variables."""
    got, target = applied["kubernetes"], TARGETS["kubernetes"]
    dep = got.deployments["retrain/retrain"]
    template = got.pool.base_job_template
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    job = apply_values(template["job_configuration"], {**defaults, **dep.job_variables})["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert job["metadata"]["namespace"] == "fab-ml"
    assert container["image"] == target.image and container["imagePullPolicy"] == "Always"
    assert container["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"},
                                      "limits": {"cpu": "2", "memory": "6Gi"}}
    assert container["args"] == "python -m prefect.engine"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("kind", TARGETS)
def test_each_deployment_keeps_prefect_yamls_triggers(applied: dict[str, Applied], kind: str) -> None:
    for full_name, automations in applied[kind].triggers.items():
        wanted = source(full_name).get("triggers", [])
        assert sorted(a.name for a in automations) == sorted(t["name"] for t in wanted), full_name
        for automation in automations:
            [spec] = [t for t in wanted if t["name"] == automation.name]
            assert automation.enabled and sorted(automation.trigger.expect) == sorted(spec["expect"])  # type: ignore[union-attr]
            [action] = automation.actions
            assert action.type == "run-deployment"
            assert action.deployment_id == applied[kind].deployments[full_name].id
            assert action.parameters == spec.get("parameters"), full_name
