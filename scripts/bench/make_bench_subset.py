#!/usr/bin/env python3
"""Prepare what the one-call GPU check (scripts/bench/device_check.sh) carries to the device machine.

Command (from the repo root; ~1-5 s, copying ~46 MiB):
    python scripts/bench/make_bench_subset.py                       # subset + timm scripts + timm wheel
    python scripts/bench/make_bench_subset.py --no-timm-wheel       # offline: subset + timm scripts only
Runtime: ~3-10 s on 2 shared cores (+ one ~2.8 MB pip download for the wheel).

Writes (all under the git-ignored bench/, never committed):
- bench/caltech_subset/{train,val}/<class>/*.jpg: a deterministic subset of ../shared/data/caltech101 (real JPEGs at
  native size; every one of the 101 classes in both splits, so train.py's class check passes). From each class the
  same evenly spaced fraction of its sorted file list is taken, the fraction being the largest that keeps the split
  under its byte share (train 70%, val 30% of --max-mib, default 46 MiB of JPEG bytes, ~54 MiB on disk;
  55 MiB at most).
- bench/timm_scripts/{train.py,validate.py}: timm's reference scripts from a pytorch-image-models checkout
  (scripts/bench/bench_e2e.sh takes this folder as TIMM_CHECKOUT; they import timm from the installed package).
- bench/wheels/timm-1.0.31-py3-none-any.whl: the reference timm, installed on the device only when its own timm
  differs (the device has no network).

The device call carries bench/caltech_subset, bench/timm_scripts and bench/wheels: together with the tracked files
they must stay under the 64 MiB working-tree limit; the script prints the total. NaViT arXiv:2307.06304 /
SigLIP 2 arXiv:2502.14786: native-resolution images are the point, so nothing is resized here.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SRC = REPO.parent / "shared" / "data" / "caltech101"
DEFAULT_TIMM = REPO.parent / ".snapshots" / "pytorch-image-models"
MARKER = "SUBSET.txt"
MAX_MIB = 55.0
IMG_EXT = (".jpg", ".jpeg", ".png")


def list_split(split_dir: Path):
    """{class: [(name, bytes), ...]} with classes and names sorted (deterministic)."""
    out = {}
    for c in sorted(e.name for e in os.scandir(split_dir) if e.is_dir()):
        files = sorted((e.name, e.stat().st_size) for e in os.scandir(split_dir / c)
                       if e.is_file() and e.name.lower().endswith(IMG_EXT))
        out[c] = files
    return out


def pick(files, frac: float):
    """Evenly spaced ~frac of a sorted list, at least one file (index i taken when floor((i+1)f) > floor(i f))."""
    if not files:
        return []
    chosen = [f for i, f in enumerate(files) if int((i + 1) * frac) > int(i * frac)]
    return chosen or files[:1]


def select(classes, budget_bytes: int):
    """Largest fraction (bisection, 1/1000 resolution) whose per-class picks fit ``budget_bytes``."""
    def size(frac):
        return sum(b for files in classes.values() for _, b in pick(files, frac))

    lo, hi = 0.0, 1.0
    if size(1.0) <= budget_bytes:
        lo = 1.0
    else:
        for _ in range(14):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if size(mid) <= budget_bytes else (lo, mid)
    return {c: pick(files, lo) for c, files in classes.items()}, lo


def file_bytes(path: Path) -> int:
    """Larger of the apparent and the allocated size (a transfer may count either; ~4,000 small files)."""
    st = path.stat()
    return max(st.st_size, getattr(st, "st_blocks", 0) * 512)


def tree_bytes(path: Path) -> int:
    return sum(file_bytes(p) for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", type=Path, default=DEFAULT_SRC, help="ImageNet-layout folder with train/ and val/")
    p.add_argument("--dst", type=Path, default=REPO / "bench" / "caltech_subset")
    p.add_argument("--max-mib", type=float, default=46.0, help=f"subset size cap (<= {MAX_MIB})")
    p.add_argument("--train-share", type=float, default=0.7, help="share of the cap for train/ (rest: val/)")
    p.add_argument("--timm-dir", type=Path, default=DEFAULT_TIMM, help="pytorch-image-models checkout")
    p.add_argument("--no-timm-scripts", action="store_true")
    p.add_argument("--no-timm-wheel", action="store_true", help="skip 'pip download timm==1.0.31'")
    p.add_argument("--timm-version", default="1.0.31")
    args = p.parse_args(argv)
    if args.max_mib > MAX_MIB:
        p.error(f"--max-mib {args.max_mib} > {MAX_MIB}: the device call carries at most 64 MiB in all")
    if not (args.src / "train").is_dir():
        p.error(f"{args.src}/train not found")
    dst = args.dst
    if dst.exists():
        if not (dst / MARKER).exists():
            p.error(f"{dst} exists and was not made by this script; remove it yourself")
        shutil.rmtree(dst)
    budget = int(args.max_mib * 2 ** 20)
    lines = [f"subset of {args.src} made by scripts/bench/make_bench_subset.py --max-mib {args.max_mib} "
             f"--train-share {args.train_share}"]
    for split, share in (("train", args.train_share), ("val", 1.0 - args.train_share)):
        if not (args.src / split).is_dir():
            continue
        chosen, frac = select(list_split(args.src / split), int(budget * share))
        n = nbytes = 0
        for c, files in chosen.items():
            (dst / split / c).mkdir(parents=True, exist_ok=True)
            for name, b in files:
                shutil.copyfile(args.src / split / c / name, dst / split / c / name)
                n += 1
                nbytes += b
        lines.append(f"{split}: {n} images, {len(chosen)} classes, {nbytes / 2 ** 20:.1f} MiB, fraction {frac:.4f}")
        print(lines[-1])
    (dst / MARKER).write_text("\n".join(lines) + "\n")

    carry = [dst]
    if not args.no_timm_scripts:
        tdst = REPO / "bench" / "timm_scripts"
        tdst.mkdir(parents=True, exist_ok=True)
        for f in ("train.py", "validate.py"):
            if not (args.timm_dir / f).is_file():
                p.error(f"{args.timm_dir / f} not found (pass --timm-dir or --no-timm-scripts)")
            shutil.copyfile(args.timm_dir / f, tdst / f)
        carry.append(tdst)
        print(f"timm scripts: {args.timm_dir}/{{train,validate}}.py -> {tdst}")
    if not args.no_timm_wheel:
        wdst = REPO / "bench" / "wheels"
        wdst.mkdir(parents=True, exist_ok=True)
        want = f"timm-{args.timm_version}-py3-none-any.whl"
        if not (wdst / want).exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            f"timm=={args.timm_version}", "-d", str(wdst)], check=True, timeout=300)
        for other in wdst.glob("timm-*.whl"):  # one version only: two would stop the install there
            if other.name != want:
                other.unlink()
        carry.append(wdst)
        print(f"timm wheel: {wdst / want}")

    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    tracked_bytes = sum(file_bytes(REPO / f) for f in tracked.decode().split("\0") if f and (REPO / f).is_file())
    total = tracked_bytes + sum(tree_bytes(c) for c in carry)
    rel = " ".join(str(c.relative_to(REPO)) for c in carry)
    print(f"carry: {rel}  ({total / 2 ** 20:.1f} MiB with the tracked files; limit 64 MiB)")
    if total > 63 * 2 ** 20:
        sys.exit("too large for the device call: lower --max-mib")


if __name__ == "__main__":
    main()
