#!/usr/bin/env python3
"""Generate the embedded demo dataset (ImageNet folder layout, varied sizes/aspect ratios, learnable classes).

Command:  python scripts/make_demo_data.py demo_data [--classes 10 --per-class 60 --val-per-class 20 --seed 0]
Runtime:  ~2-4 s for the defaults (800 JPEGs, 32-256 px) on one CPU core.

See loaders/demo_data.py for what the images look like and why (NaViT arXiv:2307.06304 motivates native
aspect ratios; the demo needs them without a download).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loaders.demo_data import make_demo_dataset  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output folder (train/ and val/ are created inside)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=60, help="train images per class")
    p.add_argument("--val-per-class", type=int, default=20, help="val images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=32)
    p.add_argument("--max-size", type=int, default=256)
    a = p.parse_args(argv)
    t0 = time.time()
    out = make_demo_dataset(a.out, num_classes=a.classes, per_class=a.per_class, val_per_class=a.val_per_class,
                            seed=a.seed, min_size=a.min_size, max_size=a.max_size)
    n = a.classes * (a.per_class + a.val_per_class)
    print(f"wrote {n} images ({a.classes} classes) to {out} in {time.time() - t0:.1f}s")
    return out


if __name__ == "__main__":
    main()
