#!/usr/bin/env bash
# The test command: set up a fresh clone and run the whole suite against real
# components (broker, Prefect server + worker, MLflow server, SQLite and
# PostgreSQL, headless Chromium), all started by the tests on loopback ports.
# The static checks come first: ruff, the import-layer contracts, then mypy.
# pytest ends with the 30 slowest tests, and the last line is the time each stage
# took, so a slowdown shows in every run (CI stops a run at 90 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
bash scripts/setup.sh test
bash scripts/system-deps.sh
t_setup=$((SECONDS - t0))
echo "test: ruff";        .venv/bin/ruff check .
echo "test: lint-imports"; .venv/bin/lint-imports
echo "test: mypy";        .venv/bin/mypy
t_static=$((SECONDS - t0 - t_setup))
rc=0
.venv/bin/python -m pytest --durations=30 "$@" || rc=$?
t_pytest=$((SECONDS - t0 - t_setup - t_static))
echo "test: setup ${t_setup}s, static checks ${t_static}s, pytest ${t_pytest}s, total $((SECONDS - t0))s (exit ${rc})"
exit "$rc"
