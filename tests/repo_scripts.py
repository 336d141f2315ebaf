"""The repository's scripts (scripts/, scripts/bench/) imported as modules, for the tests that run them."""
import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath: str):
    """A script of the repository (e.g. ``scripts/bench/bench_device_ops.py``) imported as a module, run afresh."""
    path = REPO_ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
