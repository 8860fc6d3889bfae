#!/usr/bin/env bash
# The test command: set up a fresh clone and run the whole suite against real
# components (broker, Prefect server + worker, MLflow server, SQLite and
# PostgreSQL, headless Chromium), all started by the tests on loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system-deps.sh
exec .venv/bin/python -m pytest "$@"
