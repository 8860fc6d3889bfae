#!/usr/bin/env bash
# The main job on the embedded default stack: set up a fresh clone, start the
# stack, stream a simulated fab, bootstrap champions, inject drift, and end with a
# challenger paused for approval. Extra arguments go to `fabloop run`
# (e.g. --approve-as NAME to finish the loop unattended).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh embedded
exec .venv/bin/fabloop run "$@"
