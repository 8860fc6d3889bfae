#!/usr/bin/env bash
# Regenerate the three lock files from pyproject.toml. The test lock (everything)
# is resolved first; the embedded and runtime locks are resolved under it as
# constraints, so a package has the same version in all three.
#   requirements.lock           runtime only: containers, production installs
#   requirements-embedded.lock  + the embedded stack's broker: `bash scripts/run.sh`
#   requirements-test.lock      + the test tools: `bash scripts/test.sh`
# Pass --upgrade to move every pin; without it the current pins are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=(-c requirements-test.lock)
[ "${1:-}" = "--upgrade" ] && keep=(--upgrade)
uv=.venv/bin/uv
$uv pip compile -q pyproject.toml --extra embedded --extra test "${keep[@]}" -o requirements-test.lock
$uv pip compile -q pyproject.toml --extra embedded -c requirements-test.lock -o requirements-embedded.lock
$uv pip compile -q pyproject.toml -c requirements-test.lock -o requirements.lock
