"""Shared pytest fixtures and markers.

- ``shared_data``: path to ``../shared/data/caltech101`` (real JPEGs; ``NAFLEX_CALTECH101=DIR`` points elsewhere,
  e.g. from a worktree that is not next to ``shared/``); tests using it skip when it is absent.
- ``demo_shards``: ``demo_dataset`` as WebDataset tar shards; the shard index cache of the tests goes to a tmp dir.
- ``cuda`` marker: skipped without a CUDA device.
- Threads are capped so the suite behaves on a 2-core machine, and restored after every test.
"""
import os
from pathlib import Path

import pytest
import torch

from repo_scripts import load_script

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NAFLEX_CALTECH101", REPO_ROOT.parent / "shared" / "data" / "caltech101"))


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _restore_num_threads():
    """Scripts called in-process (profile_loader, bench_loader) set torch's thread count; tests that compare
    runs bit for bit must not inherit it from an earlier test."""
    num_threads = torch.get_num_threads()
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "train").is_dir():
        pytest.skip("../shared/data/caltech101 not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    """A tiny generated ImageNet-layout set: 4 classes, 6 train + 4 val JPEGs each, 24-120 px, varied aspect.

    Layout: <root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg (see loaders/demo_data.py).
    """
    from loaders.demo_data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo_data"), num_classes=4, per_class=6, val_per_class=4,
                             seed=0, min_size=24, max_size=120)


@pytest.fixture(scope="session", autouse=True)
def _shard_index_cache_in_tmp(tmp_path_factory):
    """Tests never write the default shard index cache (~/.cache/naflex, loaders.shards). Session-scoped, so it is
    in place before module- and session-scoped fixtures that train on shards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAFLEX_CACHE_DIR", str(tmp_path_factory.mktemp("index-cache")))
        yield


@pytest.fixture
def hf_offline(monkeypatch, tmp_path):
    """The Hugging Face libraries offline, with a fresh datasets cache: nothing a test does reaches the Hub."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="session")
def demo_shards(demo_dataset, tmp_path_factory) -> Path:
    """``demo_dataset`` as shards of 5 samples + _info.json (scripts/make_shards.py), folder order kept: sample i
    of a split is image i of its folder, so a run on the shards is the same run as on the folder."""
    make_shards = load_script("scripts/make_shards.py")
    out = tmp_path_factory.mktemp("demo_wds")
    make_shards.make_shards(demo_dataset, out, name="demo", samples_per_shard=5, shuffle=False)
    return out
