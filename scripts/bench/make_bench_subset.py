#!/usr/bin/env python3
"""Prepare what scripts/bench/device_check.sh needs on a GPU machine that has no network.

Command (from the repository root; ~3-10 s on 2 shared cores, + one ~2.8 MB pip download for the timm wheel):
    python scripts/bench/make_bench_subset.py ../pytorch-image-models      # subset + timm scripts + timm wheel
    python scripts/bench/make_bench_subset.py ../pytorch-image-models --no-timm-wheel   # offline: no wheel
    python scripts/bench/make_bench_subset.py --no-timm-scripts            # no checkout: e2e then has no timm side
The argument is a clone of github.com/huggingface/pytorch-image-models kept outside this repository (timm's
train.py and validate.py are not in its pip package), ideally at the release the benchmarks compare against:
    git clone --depth 1 --branch v1.0.31 https://github.com/huggingface/pytorch-image-models ../pytorch-image-models
Without the argument the script looks for ../pytorch-image-models next to the repository.

Writes (all under the git-ignored bench/, never committed):
- bench/caltech_subset/{train,val}/<class>/*.jpg: a deterministic subset of ../shared/data/caltech101 (real JPEGs at
  native size; every one of the 101 classes in both splits, so train.py's class check passes). From each class the
  same evenly spaced fraction of its sorted file list is taken, the fraction being the largest that keeps the split
  under its byte share (train 70%, val 30% of --max-mib, default 46 MiB of JPEG bytes, ~54 MiB on disk;
  55 MiB at most).
- bench/timm_scripts/{train.py,validate.py}: timm's reference scripts from the checkout (scripts/bench/bench_e2e.sh
  takes this folder as its TIMM_CHECKOUT; they import timm from the installed package).
- bench/wheels/timm-1.0.31-py3-none-any.whl: the reference timm, installed on the GPU machine only when its own
  timm differs.

Copy these three folders to the GPU machine together with the repository's tracked files; the script prints the
total, which it keeps under 64 MiB so the whole tree travels in one small upload. NaViT arXiv:2307.06304 /
SigLIP 2 arXiv:2502.14786: native-resolution images are the point, so nothing is resized here.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SRC = REPO.parent / "shared" / "data" / "caltech101"
DEFAULT_TIMM = REPO.parent / "pytorch-image-models"
MARKER = "SUBSET.txt"
MAX_MIB = 55.0
TOTAL_MIB = 63.0  # tracked files + the three folders
IMG_EXT = (".jpg", ".jpeg", ".png")
TIMM_SCRIPTS = ("train.py", "validate.py")


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("timm_checkout", nargs="?", type=Path, default=None,
                   help=f"clone of github.com/huggingface/pytorch-image-models (default {DEFAULT_TIMM})")
    p.add_argument("--timm-dir", type=Path, default=None, help="the same as the positional argument")
    p.add_argument("--src", type=Path, default=DEFAULT_SRC, help="ImageNet-layout folder with train/ and val/")
    p.add_argument("--bench-dir", type=Path, default=REPO / "bench", help="where the three folders go")
    p.add_argument("--max-mib", type=float, default=46.0, help=f"subset size cap (<= {MAX_MIB})")
    p.add_argument("--train-share", type=float, default=0.7, help="share of the cap for train/ (rest: val/)")
    p.add_argument("--no-timm-scripts", action="store_true")
    p.add_argument("--no-timm-wheel", action="store_true", help="skip 'pip download timm==1.0.31'")
    p.add_argument("--timm-version", default="1.0.31")
    args = p.parse_args(argv)
    if args.max_mib > MAX_MIB:
        p.error(f"--max-mib {args.max_mib} > {MAX_MIB}: the whole tree must stay under 64 MiB")
    if not (args.src / "train").is_dir():
        p.error(f"{args.src}/train not found")
    args.timm_checkout = args.timm_checkout or args.timm_dir or DEFAULT_TIMM
    if not args.no_timm_scripts:
        check_timm_checkout(p, args.timm_checkout, args.timm_version)
    return args


def check_timm_checkout(parser, checkout: Path, version: str) -> None:
    """Stop (before any copying) with the way to get a checkout when ``checkout`` lacks timm's scripts; warn when
    its version is not the one measured against."""
    missing = [f for f in TIMM_SCRIPTS if not (checkout / f).is_file()]
    if missing:
        parser.error(
            f"no timm checkout at {checkout} ({', '.join(missing)} missing): timm's train.py and validate.py are not "
            f"in its pip package. Clone it outside this repository, e.g.\n"
            f"    git clone --depth 1 --branch v{version} https://github.com/huggingface/pytorch-image-models "
            f"{DEFAULT_TIMM}\n"
            f"and pass its path: python scripts/bench/make_bench_subset.py PATH "
            f"(or --no-timm-scripts: the end-to-end benchmark then has no timm side)")
    version_file = checkout / "timm" / "version.py"
    found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", version_file.read_text()) if version_file.is_file() else None
    if found and found.group(1) != version:
        print(f"warning: {checkout} is timm {found.group(1)}, not {version}: its train.py / validate.py run against "
              f"the installed timm {version} package", file=sys.stderr)


def copy_subset(src: Path, dst: Path, max_mib: float, train_share: float) -> None:
    """The deterministic per-class subset of ``src`` (see the module docstring), replacing an earlier one."""
    if dst.exists():
        if not (dst / MARKER).exists():
            sys.exit(f"error: {dst} exists and was not made by this script; remove it yourself")
        shutil.rmtree(dst)
    budget = int(max_mib * 2 ** 20)
    lines = [f"subset of {src} made by scripts/bench/make_bench_subset.py --max-mib {max_mib} "
             f"--train-share {train_share}"]
    for split, share in (("train", train_share), ("val", 1.0 - train_share)):
        if not (src / split).is_dir():
            continue
        chosen, frac = select(list_split(src / split), int(budget * share))
        n = nbytes = 0
        for c, files in chosen.items():
            (dst / split / c).mkdir(parents=True, exist_ok=True)
            for name, b in files:
                shutil.copyfile(src / split / c / name, dst / split / c / name)
                n += 1
                nbytes += b
        lines.append(f"{split}: {n} images, {len(chosen)} classes, {nbytes / 2 ** 20:.1f} MiB, fraction {frac:.4f}")
        print(lines[-1])
    (dst / MARKER).write_text("\n".join(lines) + "\n")


def copy_timm_scripts(checkout: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in TIMM_SCRIPTS:
        shutil.copyfile(checkout / f, dst / f)
    print(f"timm scripts: {checkout}/{{{','.join(TIMM_SCRIPTS)}}} -> {dst}")


def fetch_timm_wheel(version: str, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    want = f"timm-{version}-py3-none-any.whl"
    if not (dst / want).exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        f"timm=={version}", "-d", str(dst)], check=True, timeout=300)
    for other in dst.glob("timm-*.whl"):  # one version only: two would stop the install there
        if other.name != want:
            other.unlink()
    print(f"timm wheel: {dst / want}")


def check_total_size(folders) -> None:
    """Tracked files + the prepared folders must stay under TOTAL_MIB."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    tracked_bytes = sum(file_bytes(REPO / f) for f in tracked.decode().split("\0") if f and (REPO / f).is_file())
    total = tracked_bytes + sum(tree_bytes(c) for c in folders)
    names = " ".join(os.path.relpath(c, REPO) for c in folders)
    print(f"copy to the GPU machine with the repository: {names}  "
          f"({total / 2 ** 20:.1f} MiB with the tracked files; limit 64 MiB)")
    if total > TOTAL_MIB * 2 ** 20:
        sys.exit("too large to copy in one go: lower --max-mib")


def main(argv=None):
    args = parse_args(argv)
    folders = [args.bench_dir / "caltech_subset"]
    copy_subset(args.src, folders[0], args.max_mib, args.train_share)
    if not args.no_timm_scripts:
        folders.append(args.bench_dir / "timm_scripts")
        copy_timm_scripts(args.timm_checkout, folders[-1])
    if not args.no_timm_wheel:
        folders.append(args.bench_dir / "wheels")
        fetch_timm_wheel(args.timm_version, folders[-1])
    check_total_size(folders)


if __name__ == "__main__":
    main()
