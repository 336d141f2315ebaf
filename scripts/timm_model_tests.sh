#!/usr/bin/env bash
# timm's own model tests (tests/test_models.py of a timm 1.0.31 source tree), run against naflex.create_model:
# a pytest plugin written to a temporary folder routes timm.create_model for 'naflexvit*' names to
# naflex.create_model (other names still reach timm), then the tests whose id contains 'naflexvit' run.
#   pip download timm==1.0.31 --no-binary timm --no-deps -d /tmp/timm_src && tar xzf /tmp/timm_src/*.tar.gz -C /tmp
#   nice -n 10 bash scripts/timm_model_tests.sh /tmp/timm-1.0.31 [extra pytest args, e.g. -x or -k forward]
# Nothing of timm is copied into this repository. Runtime: over an hour on 2 shared CPU cores (141 tests, most
# build a full-size variant); `-k 'test_naflexvit_ or test_radio_checkpoint'` (the 25 NaFlexViT-specific tests)
# takes ~2 min. The summary line at the end gives the pass count.
set -euo pipefail
SRC="${1:?usage: timm_model_tests.sh PATH_TO_TIMM_SRC [pytest args]}"
shift
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${NAFLEX_PY:-$REPO/.venv/bin/python}"
SRC="$(cd "$SRC" && pwd)"
if [ ! -f "$SRC/tests/test_models.py" ]; then
    echo "error: $SRC/tests/test_models.py not found (not a timm source tree?)"
    exit 2
fi

PLUGIN_DIR="$(mktemp -d)"
trap 'rm -rf "$PLUGIN_DIR"' EXIT
cat > "$PLUGIN_DIR/naflex_route.py" <<'EOF'
"""Route timm.create_model('naflexvit*', ...) to naflex.create_model before timm's test modules import it."""
import timm
import timm.models

import naflex

_timm_create_model = timm.create_model


def _is_naflex(name: str) -> bool:
    return name.split(':')[-1].split('/')[-1].startswith('naflexvit')


def create_model(model_name, *args, **kwargs):
    if _is_naflex(model_name):
        return naflex.create_model(model_name, *args, **kwargs)
    return _timm_create_model(model_name, *args, **kwargs)


timm.create_model = timm.models.create_model = create_model
EOF

cd "$SRC"
# the repository first on the path (naflex), then the plugin; timm itself resolves to the source tree's copy
PYTHONPATH="$REPO:$PLUGIN_DIR${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest tests/test_models.py -p naflex_route \
    -p no:cacheprovider -q -k naflexvit -rf "$@"
