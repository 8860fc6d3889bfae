#!/usr/bin/env bash
# The test command: set up a fresh clone and run the whole suite against real
# components (broker, Prefect server + worker, MLflow server, SQLite and
# PostgreSQL, headless Chromium), all started by the tests on loopback ports.
# The static checks come first: ruff, the import-layer contracts, then mypy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system-deps.sh
echo "test: ruff";        .venv/bin/ruff check .
echo "test: lint-imports"; .venv/bin/lint-imports
echo "test: mypy";        .venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
