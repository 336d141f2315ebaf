"""Benchmark: reading the same images from an image folder and from WebDataset tar shards (loaders.shards).

Command (~1 min on 2 shared vCPUs for caltech101's train split, 5,784 JPEGs in 6 shards):
    python scripts/make_shards.py ../shared/data/caltech101 /tmp/cal_wds
    python scripts/bench/bench_shards.py --folder ../shared/data/caltech101 --shards /tmp/cal_wds --repeats 3

Measures, in one process (best of ``--repeats``; the files are read once first, so all runs read from the page
cache: these are CPU costs, not disk or network latency):
- building the member index of the shards: our header scanner, ``tarfile`` (what it falls back to), and loading
  the cached index;
- reading every sample's bytes in a random order (what the train loader does): files of the folder
  (open + read + close) vs members of the shards (one ``pread`` each), and for reference reading the shards
  front to back with ``tarfile`` as a streaming reader does (webdataset's pipeline).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from loaders import shards as S  # noqa: E402
from loaders.dataset import ImageFolderDataset  # noqa: E402
from loaders.decode import read_encoded  # noqa: E402


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def index_with_tarfile(paths):
    """The index through tarfile alone (the fallback for headers the scanner leaves to it)."""
    total = 0
    for path in paths:
        with open(path, 'rb') as f:
            samples, problems = [], []
            S._group_samples(S._tarfile_members(path, f.fileno(), os.path.getsize(path)), f.fileno(),
                             os.path.basename(path), samples, problems)
            total += len(samples)
    return total


def stream_shards(paths):
    """Every member's bytes, front to back (a streaming reader's I/O pattern)."""
    total = 0
    for path in paths:
        with tarfile.open(path, 'r:') as tf:
            for m in tf:
                if m.isfile():
                    total += len(tf.extractfile(m).read())
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--folder', required=True, help='image folder root (ROOT/<split>/<class>/...)')
    p.add_argument('--shards', required=True, help='the same images as shards + _info.json')
    p.add_argument('--split', default='train')
    p.add_argument('--repeats', type=int, default=3)
    args = p.parse_args(argv)
    folder = ImageFolderDataset(args.folder, args.split)
    cache = tempfile.mkdtemp(prefix='naflex-bench-index-')
    shards = S.ShardDataset(args.shards, args.split, cache_dir=cache)
    n = len(shards)
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {platform.node()} cpus={os.cpu_count()} "
          f"python={platform.python_version()} {n} samples in {len(shards.shards)} shards, {len(folder)} files")
    rows = []
    t, count = best_of(args.repeats, lambda: len(S.build_index(shards.shards)))
    rows.append(('index: header scanner (no cache)', t, count))
    t, count = best_of(args.repeats, lambda: index_with_tarfile(shards.shards))
    rows.append(('index: tarfile (no cache)', t, count))
    t, count = best_of(args.repeats, lambda: len(S.load_index(shards.shards, cache)))
    rows.append(('index: load the cached index', t, count))
    order = np.random.default_rng(0).permutation(n)
    folder_paths = [folder.path(i) for i in range(len(folder))]
    members = [shards.path(i) for i in range(n)]
    stream_shards(shards.shards)  # warm the page cache for every reader alike
    t, nbytes = best_of(args.repeats, lambda: sum(len(read_encoded(folder_paths[i])) for i in order))
    rows.append(('read every sample, random order: folder files', t, nbytes))
    t, nbytes = best_of(args.repeats, lambda: sum(len(members[i].read_bytes()) for i in order))
    rows.append(('read every sample, random order: shard members (pread)', t, nbytes))
    t, nbytes = best_of(args.repeats, lambda: stream_shards(shards.shards))
    rows.append(('read the shards front to back (tarfile streaming)', t, nbytes))
    print('\n| what | best time | per sample | rate |')
    print('|---|---:|---:|---:|')
    for what, t, amount in rows:
        rate = f'{amount / t / 2**20:.0f} MiB/s' if what.startswith('read') else f'{n / t:,.0f} samples/s'
        print(f'| {what} | {t * 1e3:.1f} ms | {t / n * 1e6:.1f} us | {rate} |')
    return rows


if __name__ == '__main__':
    main()
