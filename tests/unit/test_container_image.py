"""The container path without Docker: the Dockerfile's invariants, the rendered container
deployments, and the structure of the compose and Kubernetes examples.

No image is built here (no Docker daemon on this machine): these tests read the files.
Each invariant is a function that returns its violations, and the checks are also run
on a Dockerfile known to break them, so a checker that sees nothing cannot pass.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from fabloop.deployments import DEPLOYMENTS, PREFECT_YAML, deployment_name
from fabloop.deployments.container import (
    ENGINE_COMMAND,
    IMAGE_WORKDIR,
    KUBERNETES_JOB_TEMPLATE,
    ContainerTarget,
    render,
)

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
RUNTIME_LOCK = "requirements.lock"
TEST_TOOLS = ("pytest", "playwright", "ruff", "mypy", "import-linter")


@dataclass(frozen=True)
class Instruction:
    stage: int
    keyword: str
    args: str


def parse(text: str) -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped, per stage."""
    out: list[Instruction] = []
    stage, pending = -1, ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(stage, keyword, args.strip()))
    return out


def violations(text: str) -> list[str]:
    """Everything that would make the image other than slim, locked, runtime-only and non-root."""
    found: list[str] = []
    steps = parse(text)
    stages = [s.args for s in steps if s.keyword == "FROM"]
    args = dict(a.args.split("=", 1) for a in steps if a.keyword == "ARG" and a.stage == -1 and "=" in a.args)
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), s.split()[0]) for s in stages]
    if len(stages) < 2:
        found.append("not multi-stage")
    if not all(re.fullmatch(r"python:3\.11-slim(-\w+)?", b) for b in bases):
        found.append(f"bases are not Python 3.11 slim: {bases}")
    last = len(stages) - 1
    users = [s.args for s in steps if s.keyword == "USER" and s.stage == last]
    if not users or users[-1].split(":")[0] in {"root", "0"}:
        found.append(f"the final stage runs as root (USER {users[-1] if users else 'unset'})")
    # Each command of a RUN on its own: the install commands are what decides the image's content.
    commands = [c.strip() for s in steps if s.keyword == "RUN" for c in s.args.split("&&")]
    installs = [c for c in commands if re.search(r"\binstall\b", c)]
    lock = rf"(--requirement|-r)\s+{re.escape(RUNTIME_LOCK)}(\s|$)"
    if not any(re.search(lock, c) and "--no-deps" in c for c in installs):
        found.append(f"no RUN installs {RUNTIME_LOCK} with --no-deps (exactly the locked set)")
    if not any(re.search(r"--no-deps.*\s\.$", c) for c in installs):
        found.append("fabloop is not installed with --no-deps after the locked dependencies")
    # The runtime user cannot write bytecode (PYTHONDONTWRITEBYTECODE, a root-owned venv):
    # without it compiled in the image, every flow run compiles its imports from source.
    venv_installs = [c for c in installs if re.search(lock, c) or re.search(r"\s\.$", c)]
    uncompiled = [c for c in venv_installs if "--compile-bytecode" not in c]
    if uncompiled:
        found.append(f"installs without --compile-bytecode: {uncompiled}")
    if not any(re.search(rf"compileall\b.*\s{re.escape(IMAGE_WORKDIR)}(/\S*)?$", c) for c in commands):
        found.append(f"the code at {IMAGE_WORKDIR} is not compiled (python -m compileall)")
    if not any(s.keyword == "COPY" and RUNTIME_LOCK in s.args.split() for s in steps):
        found.append(f"{RUNTIME_LOCK} is not copied in")
    everything = " ".join(s.args for s in steps)
    for other in ("requirements-test.lock", "requirements-embedded.lock"):
        if other in everything:
            found.append(f"mentions {other}: the image is runtime only")
    for needle in ("[test]", "--extra", "-e ", "--editable", *TEST_TOOLS):
        if any(needle in c for c in installs):
            found.append(f"installs with {needle.strip()!r}: the image is runtime only")
    workdirs = [s.args for s in steps if s.keyword == "WORKDIR" and s.stage == last]
    if not workdirs or workdirs[-1] != IMAGE_WORKDIR:
        found.append(f"the final WORKDIR is not {IMAGE_WORKDIR} (the container deployments' pull step)")
    return found


def test_the_dockerfile_is_slim_multi_stage_locked_runtime_only_and_non_root() -> None:
    assert violations(DOCKERFILE.read_text()) == []


BAD = """
FROM python:3.12 AS build
COPY requirements-test.lock ./
RUN pip install -r requirements-test.lock && pip install -e .
WORKDIR /src
USER root
"""


def test_the_checker_finds_each_broken_invariant() -> None:
    found = "\n".join(violations(BAD))
    for expected in ("not multi-stage", "not Python 3.11 slim", "runs as root", "no RUN installs requirements.lock",
                     "not installed with --no-deps", "requirements.lock is not copied", "requirements-test.lock",
                     "'-e'", "final WORKDIR", "without --compile-bytecode", "/app is not compiled"):
        assert expected in found, f"{expected!r} not reported in:\n{found}"
    fine = DOCKERFILE.read_text()
    assert "runs as root" in "\n".join(violations(fine + "\nUSER 0\n"))
    assert "runs as root" in "\n".join(violations(fine.replace("USER 10001:10001", "")))


def test_the_runtime_lock_the_image_installs_has_no_test_tool() -> None:
    pinned = {line.split("==")[0].lower() for line in (REPO / RUNTIME_LOCK).read_text().splitlines()
              if "==" in line and not line.startswith((" ", "#"))}
    assert "prefect" in pinned and "lightgbm" in pinned
    assert sorted(pinned & set(TEST_TOOLS)) == []


def test_dockerignore_keeps_out_the_venv_and_tests_and_keeps_what_the_build_needs() -> None:
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert {".git", ".venv", "tests"} <= set(patterns)
    needed = ["pyproject.toml", "README.md", RUNTIME_LOCK, "prefect.yaml",
              "fabloop", "flows", "tasks", "blocks", "deployments", "infra"]
    assert [n for n in needed if n in patterns or f"/{n}" in patterns] == []


# --- the rendered container deployments --------------------------------------------------

PROJECT: dict[str, Any] = yaml.safe_load(PREFECT_YAML.read_text())


@pytest.mark.parametrize("pool_type", ["docker", "kubernetes"])
def test_container_deployments_are_prefect_yamls_with_only_pool_and_pull_replaced(pool_type: str) -> None:
    target = ContainerTarget(pool_type=pool_type, image="reg.example/fabloop:1")
    rendered = render(target)
    assert [d["name"] for d in rendered["deployments"]] == [deployment_name(d) for d in DEPLOYMENTS]
    for mine, theirs in zip(rendered["deployments"], PROJECT["deployments"], strict=True):
        assert {k: v for k, v in mine.items() if k != "work_pool"} == {k: v for k, v in theirs.items()
                                                                     if k not in ("work_pool", "pull")}
        assert mine["work_pool"]["name"] == f"fabloop-{pool_type}"
        assert mine["work_pool"]["job_variables"]["command"] == ENGINE_COMMAND
    text = json.dumps(rendered)
    # Nothing that names the deploying machine's checkout or interpreter survives.
    assert "FABLOOP_PROJECT_DIR" not in text and "FABLOOP_PYTHON" not in text
    assert rendered["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": IMAGE_WORKDIR}}]


def test_a_git_repository_replaces_the_image_code_with_a_clone() -> None:
    target = ContainerTarget(git_repository="https://git.fab.example/fabloop.git", git_branch="v1",
                             git_token_block="fab-git-token")
    assert render(target)["pull"] == [{"prefect.deployments.steps.git_clone": {
        "repository": "https://git.fab.example/fabloop.git", "branch": "v1",
        "access_token": "{{ prefect.blocks.secret.fab-git-token }}"}}]


# --- compose and Kubernetes examples ------------------------------------------------------

def test_compose_runs_server_worker_mlflow_and_postgres_on_the_network_the_runs_join() -> None:
    compose = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "mlflow", "worker", "setup"} <= set(services)
    assert all("image" in s for s in services.values())
    worker = services["worker"]["command"]
    assert worker[worker.index("--pool") + 1] == ContainerTarget(pool_type="docker").pool_name
    assert worker[worker.index("--type") + 1] == "docker"
    networks = json.loads(services["setup"]["environment"]["FABLOOP_CONTAINER_DOCKER_NETWORKS"])
    assert networks == [compose["networks"]["default"]["name"]]
    assert "python -m fabloop.deployments.container deploy --pool-type docker" in services["setup"]["command"][-1]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_kubernetes_worker_serves_the_pool_and_flow_run_pods_run_as_the_images_user() -> None:
    docs = list(yaml.safe_load_all((REPO / "infra" / "k8s" / "worker.yaml").read_text()))
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Deployment"} <= kinds
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--pool") + 1] == ContainerTarget(pool_type="kubernetes").pool_name
    template = json.loads(KUBERNETES_JOB_TEMPLATE.read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    uid = re.search(r"^USER (\d+)", DOCKERFILE.read_text(), re.M)
    assert uid is not None and pod["securityContext"]["runAsUser"] == int(uid.group(1))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {"image", "namespace", "cpu_request", "memory_limit"} <= set(template["variables"]["properties"])
