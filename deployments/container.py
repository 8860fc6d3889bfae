"""Docker and Kubernetes work pools: prefect.yaml's deployments, run in the fabloop image.

``prefect.yaml`` stays the one list of deployments (entrypoints, triggers, schedules,
concurrency, tags). For a container pool :func:`render` keeps all of it and replaces
only what depends on where a run executes:

- the work pool and its job variables: the image and its pull policy, the run's
  environment (each deployment's own ``env`` from prefect.yaml is kept), for Docker the
  network, for Kubernetes the namespace, service account and resources;
- the pull step: the code baked into the image (``set_working_directory`` to ``/app``,
  the image's working directory, see ``Dockerfile``) or, with a repository set, a
  ``git_clone`` of it. Nothing refers to a checkout path on the deploying machine.

Runs need no address but the Prefect API's, which the worker gives them: Kafka,
MLflow and the event store come from fabloop's blocks on that server.

    python -m fabloop.deployments.container render --pool-type kubernetes --image REG/fabloop:0.1.0
    python -m fabloop.deployments.container deploy --pool-type docker --image fabloop:0.1.0
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from fabloop.deployments.process import PREFECT_YAML, ensure_silent_ingest_automation
from fabloop.infra.process import clean_env
from fabloop.infra.settings import StackEndpoints, StackSettings, prefect_env
from fabloop.infra.stack import PROJECT_DIR, executable

PoolType = Literal["docker", "kubernetes"]
POOL_TYPES: tuple[PoolType, ...] = ("docker", "kubernetes")

IMAGE_WORKDIR = "/app"
"""Where the Dockerfile puts the project tree (``WORKDIR``): the entrypoints' ``flows/`` is there."""

KUBERNETES_JOB_TEMPLATE = PROJECT_DIR / "infra" / "k8s" / "base-job-template.json"
"""prefect-kubernetes' default base job template with a non-root pod security context (the image's user)."""

ENGINE_COMMAND = "python -m prefect.engine"
"""One process per run, as on the process pool (prefect.yaml explains why); ``python`` is the image's venv."""

__all__ = [
    "ENGINE_COMMAND", "IMAGE_WORKDIR", "KUBERNETES_JOB_TEMPLATE", "POOL_TYPES", "ContainerTarget", "PoolType",
    "create_work_pool", "deploy", "dump", "pull_steps", "render",
]


class ContainerTarget(BaseSettings):
    """Where container runs go and what they run; ``FABLOOP_CONTAINER_*`` variables or CLI options."""

    model_config = SettingsConfigDict(env_prefix="FABLOOP_CONTAINER_", extra="ignore")

    pool_type: PoolType = "docker"
    work_pool: str | None = Field(default=None, description="default: fabloop-<pool type>")
    image: str = Field(default_factory=lambda: f"fabloop:{version('fabloop')}", description="the built image's tag")
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    env: dict[str, str] = Field(default_factory=dict, description="added to every run's environment")
    git_repository: str | None = Field(default=None, description="clone this instead of using the image's /app")
    git_branch: str = "main"
    git_token_block: str | None = Field(default=None, description="a Prefect Secret block holding the clone's token")
    # Docker
    docker_networks: list[str] = Field(default_factory=list, description="e.g. the compose network, to reach the stack")
    docker_mem_limit: str | None = None
    # Kubernetes
    namespace: str = "fabloop"
    service_account_name: str | None = None
    cpu_request: str = "500m"
    memory_request: str = "1Gi"
    cpu_limit: str = "2"
    memory_limit: str = "4Gi"
    finished_job_ttl: int = Field(default=3600, description="seconds a finished Job (and its logs) is kept")

    @property
    def pool_name(self) -> str:
        return self.work_pool or f"fabloop-{self.pool_type}"

    def job_variables(self, env: dict[str, str] | None = None) -> dict[str, Any]:
        """The deployment's job variables: this target's, with ``env`` (the deployment's own) merged in."""
        values: dict[str, Any] = {
            "image": self.image,
            "image_pull_policy": self.image_pull_policy,
            "command": ENGINE_COMMAND,
            "env": {**self.env, **(env or {})},
        }
        if self.pool_type == "docker":
            values["auto_remove"] = True
            if self.docker_networks:
                values["networks"] = list(self.docker_networks)
            if self.docker_mem_limit:
                values["mem_limit"] = self.docker_mem_limit
        else:
            values |= {
                "namespace": self.namespace,
                "cpu_request": self.cpu_request, "memory_request": self.memory_request,
                "cpu_limit": self.cpu_limit, "memory_limit": self.memory_limit,
                "finished_job_ttl": self.finished_job_ttl,
            }
            if self.service_account_name:
                values["service_account_name"] = self.service_account_name
        return values


def pull_steps(target: ContainerTarget) -> list[dict[str, Any]]:
    """The code in the image, or a clone of the repository: never a path on the deploying machine."""
    if target.git_repository is None:
        return [{"prefect.deployments.steps.set_working_directory": {"directory": IMAGE_WORKDIR}}]
    clone: dict[str, Any] = {"repository": target.git_repository, "branch": target.git_branch}
    if target.git_token_block:
        clone["access_token"] = "{{ prefect.blocks.secret." + target.git_token_block + " }}"
    return [{"prefect.deployments.steps.git_clone": clone}]


def render(target: ContainerTarget, project: dict[str, Any] | None = None) -> dict[str, Any]:
    """prefect.yaml's deployments for ``target``'s pool: a file ``prefect deploy --prefect-file`` takes."""
    source = project if project is not None else yaml.safe_load(PREFECT_YAML.read_text())
    deployments = []
    for spec in source["deployments"]:
        spec = copy.deepcopy(spec)
        spec.pop("pull", None)  # one pull for all, below
        pool = spec.get("work_pool") or {}
        # Only the run's environment carries over: the rest of the process pool's job
        # variables (its interpreter path) belongs to the deploying machine.
        own_env = (pool.get("job_variables") or {}).get("env") or {}
        spec["work_pool"] = {
            "name": target.pool_name,
            "work_queue_name": pool.get("work_queue_name", "default"),
            "job_variables": target.job_variables({k: str(v) for k, v in own_env.items()}),
        }
        deployments.append(spec)
    return {
        "name": f"{source['name']}-{target.pool_type}",
        "prefect-version": source.get("prefect-version"),
        "build": None,
        "push": None,
        "pull": pull_steps(target),
        "deployments": deployments,
    }


def dump(spec: dict[str, Any]) -> str:
    """YAML as a person reads it (the order of prefect.yaml, unicode as is)."""
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=120)


def _prefect(ep: StackEndpoints, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [executable("prefect"), "--no-prompt", *args], cwd=PROJECT_DIR, env=clean_env(prefect_env(ep)),
        capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args[:2])} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def create_work_pool(ep: StackEndpoints, target: ContainerTarget, timeout: float = 120) -> bool:
    """``prefect work-pool create --type docker|kubernetes`` unless the pool exists; True if created.

    A Docker pool gets Prefect's default base job template, which the server knows
    without prefect-docker installed (its copy of the collections registry); a
    Kubernetes pool gets :data:`KUBERNETES_JOB_TEMPLATE`. The workers that serve the
    pools need prefect-docker or prefect-kubernetes. An existing pool, and any
    template edited in the UI, is left as it is.
    """
    try:
        _prefect(ep, "work-pool", "inspect", target.pool_name, timeout=timeout)
        return False
    except RuntimeError:
        template = ["--base-job-template", str(KUBERNETES_JOB_TEMPLATE)] if target.pool_type == "kubernetes" else []
        _prefect(ep, "work-pool", "create", target.pool_name, "--type", target.pool_type, *template, timeout=timeout)
        return True


def deploy(ep: StackEndpoints, target: ContainerTarget, timeout: float = 300) -> str:
    """``prefect deploy --all`` of the rendered file, from the project directory (entrypoints are relative to it)."""
    with tempfile.TemporaryDirectory(prefix="fabloop-deploy-") as tmp:
        prefect_file = Path(tmp) / f"prefect.{target.pool_type}.yaml"
        prefect_file.write_text(dump(render(target)))
        out = _prefect(ep, "deploy", "--all", "--prefect-file", str(prefect_file), timeout=timeout).stdout
    ensure_silent_ingest_automation(ep)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fabloop.deployments.container", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["render", "deploy"],
                        help="render: print the prefect file; deploy: create the pool if missing and deploy")
    parser.add_argument("--pool-type", choices=POOL_TYPES)
    parser.add_argument("--image")
    parser.add_argument("--work-pool")
    parser.add_argument("--git-repository")
    parser.add_argument("--prefect-api-url", help="default: the stack of FABLOOP_HOME, else FABLOOP_PREFECT_API_URL")
    parser.add_argument("-o", "--output", type=Path, help="render: write here instead of stdout")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in {"pool_type": args.pool_type, "image": args.image, "work_pool": args.work_pool,
                                   "git_repository": args.git_repository}.items() if v is not None}
    target = ContainerTarget(**overrides)
    if args.action == "render":
        text = dump(render(target))
        if args.output:
            args.output.write_text(text)
        else:
            sys.stdout.write(text)
        return 0
    if args.prefect_api_url:
        ep = StackSettings(prefect_api_url=args.prefect_api_url).resolve()
    else:
        try:
            ep = StackEndpoints.load()
        except FileNotFoundError:
            ep = StackSettings().resolve()
    create_work_pool(ep, target)
    print(deploy(ep, target))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
