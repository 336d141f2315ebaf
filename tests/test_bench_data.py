"""scripts/bench/make_bench_data.py: ImageNet layout, decodable JPEGs, the same bytes for any worker count,
ImageNet-like sizes and JPEG bytes per pixel, and no writing into a folder that has files."""
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "make_bench_data.py"
TRAIN, VAL, CLASSES = 24, 8, 4


@pytest.fixture(scope="module")
def mbd():
    spec = importlib.util.spec_from_file_location("make_bench_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the worker processes unpickle its functions by module name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def small(mbd, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_data") / "data"
    stats = mbd.make_dataset(out, train=TRAIN, val=VAL, classes=CLASSES, seed=0, workers=1)
    return out, stats


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*.JPEG"))


def test_layout_and_jpegs(small):
    out, stats = small
    for split, n in (("train", TRAIN), ("val", VAL)):
        classes = sorted(p.name for p in (out / split).iterdir())
        assert classes == [f"c{k:03d}" for k in range(CLASSES)]
        for k, name in enumerate(classes):
            indices = sorted(int(p.stem) for p in (out / split / name).iterdir())
            assert indices == list(range(k, n, CLASSES))  # balanced: image i is in class i % classes
    sizes = []
    for rel in _files(out):
        with Image.open(out / rel) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            im.load()
            sizes.append(im.size)
    assert len(sizes) == TRAIN + VAL
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk == stats
    assert (stats["train"], stats["val"], stats["classes"], stats["images"]) == (TRAIN, VAL, CLASSES, TRAIN + VAL)
    assert stats["mean_width"] == pytest.approx(np.mean([w for w, _ in sizes]))
    assert stats["mean_height"] == pytest.approx(np.mean([h for _, h in sizes]))
    total = sum((out / rel).stat().st_size for rel in _files(out))
    assert stats["total_bytes"] == total
    assert stats["bytes_per_pixel"] == pytest.approx(total / sum(w * h for w, h in sizes))
    assert stats["parameters"]["quality_range"] == [75, 95]


def test_same_bytes_for_any_worker_count(mbd, small, tmp_path):
    out1, _ = small
    mbd.make_dataset(tmp_path / "j2", train=TRAIN, val=VAL, classes=CLASSES, seed=0, workers=2)
    files = _files(out1)
    assert files == _files(tmp_path / "j2")
    for rel in files:
        assert (out1 / rel).read_bytes() == (tmp_path / "j2" / rel).read_bytes(), rel
    # another seed gives other images (so the comparison above can fail)
    mbd.make_dataset(tmp_path / "seed1", train=2, val=0, classes=CLASSES, seed=1, workers=1)
    rel = "train/c000/000000.JPEG"
    assert (tmp_path / "seed1" / rel).read_bytes() != (out1 / rel).read_bytes()


def test_size_distribution_is_imagenet_like(mbd):
    rng = np.random.default_rng(0)
    sizes = np.array([mbd.image_size(rng) for _ in range(20_000)])
    w, h = sizes[:, 0], sizes[:, 1]
    long_side, short_side = sizes.max(axis=1), sizes.min(axis=1)
    assert sizes.dtype.kind == "i" and short_side.min() >= 32 and long_side.max() <= 1600
    assert 0.56 <= (long_side == 500).mean() <= 0.64
    assert 0.22 <= (h[w != h] > w[w != h]).mean() <= 0.28  # portrait, among the images that are not square
    assert 300 <= w.mean() <= 480 and 300 <= h.mean() <= 480
    assert np.median(w) == 500 and np.median(h) == 375  # 500x375 (4:3 landscape) is the typical image
    assert 0.05 <= (long_side < 300).mean() and (long_side > 1000).mean() <= 0.1  # a small tail, a few large


def test_bytes_per_pixel_like_photos(mbd):
    num_bytes = num_pixels = 0
    for index in range(6):
        data, w, h = mbd.encode_image(seed=0, split="val", index=index, num_classes=CLASSES)
        pixels = np.asarray(Image.open(io.BytesIO(data)))
        assert pixels.shape == (h, w, 3) and pixels.std() > 10  # not flat
        num_bytes, num_pixels = num_bytes + len(data), num_pixels + w * h
    assert 0.3 <= num_bytes / num_pixels <= 1.5


def test_refuses_folder_with_files(mbd, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SystemExit) as stop:
        mbd.main([str(out), "--train", "2", "--val", "0", "-j", "1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "not an empty folder" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    stats = mbd.main([str(empty), "--train", "2", "--val", "1", "--classes", "2", "-j", "1"])
    assert stats["images"] == 3 and len(_files(empty)) == 3
    assert capsys.readouterr().out.startswith("wrote 3 JPEGs")
