"""Benchmark: the bytes a streamed epoch reads, first epoch against later ones (loaders.stream, stream_offsets).

Command (~1 min on 2 shared vCPUs for caltech101's train split, 5,784 samples in 6 shards):
    python scripts/make_shards.py ../shared/data/caltech101 /tmp/cal_wds
    python scripts/bench/bench_stream_epochs.py --shards /tmp/cal_wds --ranks 2 --workers 4 --epochs 3

Serves the shards over HTTP from a separate process on 127.0.0.1 (bench_stream.py's server, which counts the body
bytes it sends), and reads ``--epochs`` training epochs as ``--ranks`` ranks of ``--workers`` loader workers each
would: every stream's samples taken step by step in this process (the samples only: no decoding, no
augmentation). Most streams start inside a shard. The first epoch reads the heads of those shards only to pass over
them and remembers where each sample starts (an offsets cache in a temporary folder here); later epochs open each
piece of a shard at its first sample and ask for its bytes only. Reported per epoch: the bytes served, and that as a
multiple of the split's shard bytes. Each epoch has its own shard order.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
BENCH_STREAM = Path(__file__).resolve().with_name('bench_stream.py')


def read_epoch(source, epoch: int, ranks: int, workers: int, batch_size: int, seq_lens) -> int:
    """Every rank's streams of ``epoch``, step by step; returns the samples read."""
    import loaders
    samples = 0
    for rank in range(ranks):
        cfg = loaders.TrainLoaderConfig(seq_lens=tuple(seq_lens), batch_size=batch_size, num_workers=workers)
        ds = loaders.create_train_loader(source, cfg=cfg, rank=rank, world_size=ranks).step_dataset
        plan = ds.plan(epoch)
        for step in range(len(ds.schedule.steps(epoch))):
            stream, slot, count = plan.step_part[step]
            samples += len(ds.reader(epoch, stream, slot).take(count))
        for reader in ds._readers.values():
            reader.close()
    return samples


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--shards', required=True, help='a folder of tar shards + _info.json')
    p.add_argument('--split', default='train')
    p.add_argument('--ranks', type=int, default=2)
    p.add_argument('--workers', type=int, default=4)
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('-b', '--batch-size', type=int, default=64)
    p.add_argument('--seq-lens', type=int, nargs='+', default=[128, 256, 576])
    args = p.parse_args(argv)
    root = Path(args.shards)
    cache_dir = os.environ.get('NAFLEX_CACHE_DIR')
    with tempfile.TemporaryDirectory() as cache:
        os.environ['NAFLEX_CACHE_DIR'] = cache  # a cold start: no offsets remembered yet
        server = subprocess.Popen([sys.executable, str(BENCH_STREAM), '--shards', str(root), '--serve'],
                                  stdout=subprocess.PIPE, text=True)
        try:
            base = f'http://127.0.0.1:{int(server.stdout.readline())}'
            import loaders
            source = loaders.open_dataset(base, args.split)
            total = sum((root / url.rsplit('/', 1)[1]).stat().st_size for url in source.urls)
            print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {platform.node()} cpus={os.cpu_count()} "
                  f"{len(source.urls)} shards, {len(source)} samples, {total / 2**20:.1f} MiB; {args.ranks} ranks x "
                  f"{args.workers} workers")
            rows, before = [], 0
            direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 whatever the proxy
            for epoch in range(args.epochs):
                samples = read_epoch(source, epoch, args.ranks, args.workers, args.batch_size, args.seq_lens)
                with direct.open(f'{base}/__bytes_sent__', timeout=30) as r:
                    sent = int(r.read())
                rows.append((epoch, samples, sent - before))
                before = sent
        finally:
            server.kill()
            server.wait()
            if cache_dir is None:
                del os.environ['NAFLEX_CACHE_DIR']
            else:
                os.environ['NAFLEX_CACHE_DIR'] = cache_dir
    print('\n| epoch | samples | MiB served | x the shards |')
    print('|---:|---:|---:|---:|')
    for epoch, samples, sent in rows:
        print(f'| {epoch} | {samples:,} | {sent / 2**20:.1f} | {sent / total:.2f} |')
    return rows, total


if __name__ == '__main__':
    main()
