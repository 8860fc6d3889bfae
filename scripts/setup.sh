#!/usr/bin/env bash
# Idempotent set-up of a fresh clone: a .venv with the locked dependencies and
# fabloop installed in editable mode. Needs only Python 3.11 and the registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY="$candidate"; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup: Python >= 3.11 is required" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# uv resolves nothing here: it installs the exact set in requirements.lock (made by
# `uv pip compile pyproject.toml --extra test -o requirements.lock`), only faster than pip.
.venv/bin/python -m pip install -q --disable-pip-version-check "uv==0.13.9" 2>/dev/null \
  || .venv/bin/python -m pip install -q --disable-pip-version-check uv
.venv/bin/uv pip install -q --python .venv/bin/python -r requirements.lock
.venv/bin/uv pip install -q --python .venv/bin/python --no-deps -e .
echo "setup: .venv ready ($(.venv/bin/python --version), prefect $(.venv/bin/python -c 'import prefect; print(prefect.__version__)'))"
