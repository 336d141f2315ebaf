#!/usr/bin/env bash
# Run the whole test suite: creates .venv if missing, installs the project with its dev extra, runs pytest.
#   bash scripts/test.sh [pytest args...]        e.g.  bash scripts/test.sh -m "not slow" -x
# Runtime: ~80 s install on the first run (torch is large), then ~4 min of tests on 2 quiet CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${NAFLEX_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[dev]"
exec "$VENV/bin/python" -m pytest "$@"
