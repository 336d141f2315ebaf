#!/usr/bin/env bash
# Run the whole test suite: creates .venv if missing, installs the project with its dev extra, runs pytest.
#   bash scripts/test.sh [pytest args...]        e.g.  bash scripts/test.sh -m "not slow" -x
# Runtime: ~100 s install on the first run (torch is large), then ~6 min of tests on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
naflex_venv dev
exec "$PY" -m pytest "$@"
