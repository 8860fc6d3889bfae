#!/usr/bin/env bash
# Idempotent set-up of a fresh clone: a .venv with the locked dependencies and
# fabloop installed in editable mode. Needs only Python 3.11 and the registries.
#   bash scripts/setup.sh [runtime|embedded|test]   (default: embedded)
# runtime: fabloop alone (an external Kafka); embedded: + the embedded stack's
# broker (what `scripts/run.sh` needs); test: + the test tools (`scripts/test.sh`).
# Nothing is uninstalled: a venv set up for the tests keeps its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-embedded}"
case "$profile" in
  runtime) lock=requirements.lock ;;
  embedded) lock=requirements-embedded.lock ;;
  test) lock=requirements-test.lock ;;
  *) echo "setup: unknown profile '$profile' (runtime, embedded or test)" >&2; exit 2 ;;
esac
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
# uv resolves nothing here: it installs the exact set in the lock file (made by
# scripts/lock.sh), only faster than pip.
.venv/bin/python -m pip install -q --disable-pip-version-check "uv==0.13.9" 2>/dev/null \
  || .venv/bin/python -m pip install -q --disable-pip-version-check uv
.venv/bin/uv pip install -q --python .venv/bin/python --compile-bytecode -r "$lock"
.venv/bin/uv pip install -q --python .venv/bin/python --no-deps -e .
echo "setup: .venv ready, $profile ($(.venv/bin/python --version), prefect $(.venv/bin/python -c 'import prefect; print(prefect.__version__)'))"
