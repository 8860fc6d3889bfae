"""The container files pass the linters of their formats: hadolint on the Dockerfile, the
Compose Specification's schema on ``infra/compose.yaml``, Kubernetes' own schemas on the
worker manifest. No Docker or cluster is needed; each check is shown to fail on a broken copy."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return _run("hadolint", "--failure-threshold", "warning", str(path))


def _compose(path: Path) -> subprocess.CompletedProcess[str]:
    return _run("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(path))


def _kubernetes(path: Path) -> subprocess.CompletedProcess[str]:
    return _run("kubernetes-validate", "--strict", str(path))


@pytest.mark.parametrize(("check", "path"), [
    (_hadolint, "Dockerfile"), (_compose, "infra/compose.yaml"), (_kubernetes, "infra/k8s/worker.yaml"),
])
def test_the_container_files_pass_their_linters(
    check: Callable[[Path], subprocess.CompletedProcess[str]], path: str
) -> None:
    result = check(ROOT / path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_linter_refuses_a_broken_copy(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text((ROOT / "Dockerfile").read_text() + "\nRUN cd /tmp && apt-get install curl\n")
    assert _hadolint(dockerfile).returncode != 0
    compose = tmp_path / "compose.yaml"
    compose.write_text((ROOT / "infra/compose.yaml").read_text() + "\nnot_a_compose_key: 1\n")
    assert _compose(compose).returncode != 0
    manifest = tmp_path / "worker.yaml"
    manifest.write_text((ROOT / "infra/k8s/worker.yaml").read_text().replace("containers:", "containerz:", 1))
    assert _kubernetes(manifest).returncode != 0
