"""Shared pytest fixtures and markers.

- ``shared_data``: path to ``../shared/data/caltech101`` (real JPEGs); tests using it skip when it is absent.
- ``cuda`` marker: skipped without a CUDA device.
- Threads are capped so the suite behaves on a 2-core machine.
"""
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "caltech101"


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "train").is_dir():
        pytest.skip("../shared/data/caltech101 not present")
    return SHARED_DATA
