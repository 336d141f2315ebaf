"""Tests for the generated demo dataset (loaders/demo_data.py, scripts/make_demo_data.py)."""
import hashlib
import subprocess
import sys
from pathlib import Path

from PIL import Image

from loaders.demo_data import class_names, make_demo_dataset

REPO = Path(__file__).resolve().parents[1]


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.jpg")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_fixture_layout_and_sizes(demo_dataset):
    for split, n in (("train", 6), ("val", 4)):
        dirs = sorted(p.name for p in (demo_dataset / split).iterdir())
        assert dirs == class_names(4)
        for d in dirs:
            files = sorted((demo_dataset / split / d).glob("*.jpg"))
            assert len(files) == n
    sizes = set()
    for f in demo_dataset.rglob("*.jpg"):
        with Image.open(f) as im:
            assert im.mode == "RGB"
            w, h = im.size
        assert 24 <= w <= 120 and 24 <= h <= 120 and max(w, h) <= 4 * min(w, h)
        sizes.add((w, h))
    aspects = [w / h for w, h in sizes]
    assert len(sizes) > 30 and min(aspects) < 0.75 and max(aspects) > 1.33


def test_deterministic_and_seed_dependent(tmp_path):
    a = make_demo_dataset(tmp_path / "a", num_classes=3, per_class=2, val_per_class=1, seed=1, max_size=64)
    b = make_demo_dataset(tmp_path / "b", num_classes=3, per_class=2, val_per_class=1, seed=1, max_size=64)
    c = make_demo_dataset(tmp_path / "c", num_classes=3, per_class=2, val_per_class=1, seed=2, max_size=64)
    assert _digest(a) == _digest(b) != _digest(c)


def test_classes_are_separable_by_colour(tmp_path):
    """Learnability sanity check: a nearest-centroid classifier on mean hue beats chance by far."""
    import colorsys
    import numpy as np

    root = make_demo_dataset(tmp_path, num_classes=10, per_class=8, val_per_class=4, seed=0, max_size=96)

    def feat(f):
        # Hue of the most saturated pixels (the foreground pattern), as a point on the unit circle.
        a = np.asarray(Image.open(f).convert("HSV"), dtype=np.float32) / 255.0
        sel = a[..., 1] >= np.quantile(a[..., 1], 0.8)
        ang = 2 * np.pi * a[..., 0][sel]
        return np.array([np.cos(ang).mean(), np.sin(ang).mean()])

    names = class_names(10)
    cent = np.stack([np.mean([feat(f) for f in (root / "train" / n).glob("*.jpg")], 0) for n in names])
    correct = total = 0
    for i, n in enumerate(names):
        for f in (root / "val" / n).glob("*.jpg"):
            correct += int(np.argmin(((cent - feat(f)) ** 2).sum(1)) == i)
            total += 1
    assert correct / total > 0.5  # chance is 0.1


def test_cli(tmp_path):
    out = tmp_path / "d"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_data.py"), str(out), "--classes", "2",
                        "--per-class", "2", "--val-per-class", "1", "--max-size", "48"],
                       capture_output=True, text=True, check=True)
    assert "wrote 6 images" in r.stdout
    assert len(list(out.rglob("*.jpg"))) == 6
