"""The project's layers import in one direction only: augment/ <- loaders/ <- naflex.train <- train.py / validate.py,
and the model library naflex.model (with ``import naflex``) beside them, importing neither the data side nor the
trainer. Each layer is imported whole (every module of it) in a fresh interpreter, and the project modules that
got loaded are checked against what the layer may use."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT = ('augment', 'loaders', 'naflex', 'train', 'validate')


def _modules(package: str):
    """Every module of a package folder, by dotted name."""
    root = REPO.joinpath(*package.split('.'))
    return [package] + sorted('.'.join((package, *p.relative_to(root).with_suffix('').parts))
                              for p in root.rglob('*.py') if p.name != '__init__.py')


def _loaded_after_importing(modules):
    code = (f'import importlib, json, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n'
            f'print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {PROJECT!r})))')
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _allowed(name, prefixes):
    return any(name == p or name.startswith(p + '.') for p in prefixes)


@pytest.mark.parametrize('layer, may_use', [
    ('augment', ('augment',)),
    ('loaders', ('loaders', 'augment')),
    ('naflex.model', ('naflex.model',)),
])
def test_layer_imports_only_what_it_may(layer, may_use):
    loaded = _loaded_after_importing(_modules(layer))
    assert set(_modules(layer)) <= set(loaded)
    # 'naflex' itself is the package holding naflex.model; its __init__ loads the model library only
    stray = [m for m in loaded if not _allowed(m, may_use) and m != 'naflex']
    assert stray == [], f'{layer} pulls in {stray}'


def test_import_naflex_loads_the_model_library_only():
    loaded = _loaded_after_importing(['naflex'])
    assert [m for m in loaded if not _allowed(m, ('naflex.model',)) and m != 'naflex'] == []


def test_trainer_uses_the_libraries_and_no_cli():
    loaded = _loaded_after_importing(_modules('naflex.train'))
    assert {'naflex.model', 'loaders', 'augment'} <= set(loaded)
    assert 'train' not in loaded and 'validate' not in loaded


def test_clis_import_without_side_effects():
    """train.py / validate.py import cheaply: nothing of the project is loaded until main() runs."""
    loaded = _loaded_after_importing(['train', 'validate'])
    assert sorted(loaded) == ['train', 'validate']
