# Sourced by scripts/test.sh, scripts/demo.sh and scripts/bench/device_check.sh --cpu-smoke (not run on its own):
#   source scripts/venv.sh; naflex_venv [EXTRA]
# creates the virtual environment $NAFLEX_VENV (default .venv) if missing, installs the project into it with
# `pip install -e .[EXTRA]` and sets PY to its python. ~80 s the first time (PyTorch), seconds afterwards.
naflex_venv() {
    local venv="${NAFLEX_VENV:-.venv}" spec="."
    [ -n "${1:-}" ] && spec=".[$1]"
    if [ ! -x "$venv/bin/python" ]; then
        echo "== creating $venv"
        python3 -m venv "$venv"
    fi
    PY="$(cd "$venv" && pwd)/bin/python"
    echo "== installing the project into $venv (pip install -e $spec)"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -e "$spec"
}
