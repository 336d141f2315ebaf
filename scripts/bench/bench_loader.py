"""Benchmark: our NaFlex train loader vs timm 1.0.31's ``create_naflex_loader``, same flags, same folder.

Command (the documented augmentations; ~1-2 min per --repeats on 2 shared CPU cores with caltech101):
    python scripts/bench/bench_loader.py --data-dir ../shared/data/caltech101 -j 2 \
        --aa rand-m8-inc1-mstd1.0 --grayscale-prob .1 --reprob 0 --mixup 0.8 --cutmix 1.0 -b 64 \
        --naflex-train-seq-lens 128 256 576 784 1024
Add ``--steps N`` to stop each loader after N steps (default: one full epoch each).

The same images as WebDataset tar shards (``python scripts/make_shards.py ../shared/data/caltech101 /tmp/cal_wds``):
the same command with ``--data-dir /tmp/cal_wds --dataset wds/caltech101 --only ours`` (timm reads shards only
through the webdataset package, as a streaming IterableDataset, which its NaFlex loader does not take). Add
``--stream-http`` to compare our loader on those local shards with the same shards streamed over HTTP from a local
server (``python -m http.server`` on 127.0.0.1, in its own process, so its CPU is not counted; loaders.stream):
``--data-dir /tmp/cal_wds --dataset wds/caltech101 --stream-http`` (~1-2 min per --repeats).

Rows: timm, ours, and ours with ``--device-aug`` ('ours-devaug': the workers' side of that path, encoded bytes and
drawn parameters; the decode and augmentation it leaves to the training device are not in this figure, see
profile_loader.py --device-aug for their cost on this CPU). ``--only KIND`` runs one of them.
Both are measured at the output of the CPU DataLoader (what the workers produce; no device copy): timm's
float32 padded batches, our uint8 packed ones. Throughput counts the time after the first batch arrives (worker
start-up excluded for both); ``valid tokens`` = real image patches (timm: patch_valid.sum(), ours: seq_lens.sum()).
Runs each loader ``--repeats`` times, alternating, and reports the best wall-clock run of each (least
disturbed by other load on a shared machine). It also prints valid tokens per CPU-second (main process +
workers, from getrusage; all batches; median over runs), which other load on a shared machine disturbs much
less than wall-clock rates. It is exact for full-epoch runs (with --steps, batches the workers prefetched
beyond the last one counted add CPU time only).
Related: NaViT arXiv:2307.06304 (packing), SigLIP 2 arXiv:2502.14786 (NaFlex).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import loaders  # noqa: E402
from naflex.model import batch as B  # noqa: E402
from naflex.train.cli import build_parser, config_from_args  # noqa: E402

LOADER_FLAGS = ('dataset', 'aug', 'naflex', 'run')  # train.py's flag groups the loaders read
KINDS = ('timm', 'ours', 'ours-devaug')


def build_ours(args, dataset, device_aug=False):
    cfg = config_from_args(args, build_parser(LOADER_FLAGS))
    aug = dataclasses.replace(cfg.aug, device_aug=device_aug or cfg.aug.device_aug)
    return loaders.create_train_loader(dataset, cfg=cfg.loader, aug=aug, mixup=cfg.mixup,
                                       num_classes=dataset.num_classes, patch_size=16, persistent_workers=False)


def build_timm(args, num_classes):
    from timm.data import create_dataset
    from timm.data.naflex_loader import create_naflex_loader
    from timm.data.naflex_mixup import NaFlexMixup
    ds = create_dataset('', root=args.data_dir, split=args.train_split, is_training=True)
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = NaFlexMixup(num_classes=num_classes, mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                               switch_prob=args.mixup_switch_prob, prob=args.mixup_prob,
                               label_smoothing=args.smoothing)
    loader = create_naflex_loader(
        ds, patch_size=16, train_seq_lens=args.naflex_train_seq_lens, batch_size=args.batch_size,
        is_training=True, mixup_fn=mixup_fn, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip, color_jitter=args.color_jitter,
        grayscale_prob=args.grayscale_prob, auto_augment=args.aa, interpolation=args.train_interpolation,
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), num_workers=args.workers, seed=args.seed,
        use_prefetcher=True, device=torch.device('cpu'), persistent_workers=False, pin_memory=False)
    return getattr(loader, 'loader', loader)  # the DataLoader under timm's NaFlexPrefetchLoader


def _cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the DataLoader workers, once joined)."""
    tot = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        tot += r.ru_utime + r.ru_stime
    return tot


def run(loader, kind, max_steps):
    n_img = n_tok = steps = all_tok = 0
    cpu0 = _cpu_seconds()
    t_start = time.perf_counter()
    t_first = None
    it = iter(loader)
    for inputs, target in it:
        tok, img = int(B.valid_tokens(inputs)), B.num_images(inputs)
        all_tok += tok
        if t_first is None:
            t_first = time.perf_counter()
        else:  # wall-clock rates count batches after the first one
            n_tok += tok
            n_img += img
        steps += 1
        if max_steps and steps >= max_steps:
            break
    t_end = time.perf_counter()
    del it, inputs, target
    gc.collect()  # joins the (non-persistent) workers, so their CPU time is counted in RUSAGE_CHILDREN
    cpu = _cpu_seconds() - cpu0
    dt = max(1e-9, t_end - (t_first or t_end))
    return dict(img_s=n_img / dt, tok_s=n_tok / dt, steps=steps, seconds=t_end - t_start,
                tok_cpu_s=all_tok / max(1e-9, cpu), cpu=cpu, ms_cpu_img=1e3 * cpu / max(1, n_img + img))


@contextlib.contextmanager
def http_server(folder: str):
    """``python -m http.server`` serving ``folder`` on a free 127.0.0.1 port, in its own process; yields its URL."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, '-m', 'http.server', str(port), '--bind', '127.0.0.1', '--directory',
                             folder], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f'http://127.0.0.1:{port}'
    try:
        for _ in range(100):  # until it answers
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url + '/_info.json', timeout=1).close()
                break
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait()


def main(argv=None):
    p = build_parser(LOADER_FLAGS, prog='bench_loader.py')
    p.description = __doc__.split('\n')[0]
    p.add_argument('--steps', type=int, default=0, help='stop each run after N steps (0 = one epoch)')
    p.add_argument('--repeats', type=int, default=1)
    p.add_argument('--only', choices=KINDS, default=None)
    p.add_argument('--stream-http', action='store_true',
                   help='local tar shards: compare with the same shards streamed over HTTP from a local server')
    args = p.parse_args(argv)
    if not args.data_dir:
        p.error('--data-dir is required')
    torch.set_num_threads(1)
    dataset = loaders.open_dataset(args.data_dir, args.train_split, dataset=args.dataset)  # folder or shards
    if args.stream_http:
        if not isinstance(dataset, loaders.ShardDataset):
            raise SystemExit('bench_loader.py: --stream-http needs tar shards with _info.json as --data-dir')
        with http_server(args.data_dir) as url:
            streamed = loaders.open_dataset(url, args.train_split)
            return _compare(args, {'shards': dataset, 'http': streamed})
    if isinstance(dataset, loaders.ShardDataset) and args.only not in ('ours', 'ours-devaug'):
        raise SystemExit('bench_loader.py: timm reads tar shards only as a streaming webdataset pipeline: '
                         'pass --only ours (or ours-devaug)')
    return _compare(args, {k: dataset for k in ([args.only] if args.only else KINDS)})


def _compare(args, datasets: dict):
    """Runs the loader of each kind (timm, or ours over the kind's dataset) ``--repeats`` times, alternating."""
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {platform.node()} cpus={os.cpu_count()} "
          f"torch={torch.__version__} data={', '.join(type(d).__name__ for d in datasets.values())} "
          f"workers={args.workers} -b {args.batch_size} seq_lens={args.naflex_train_seq_lens} aa={args.aa} "
          f"mixup={args.mixup} cutmix={args.cutmix}")
    runs, kinds = {}, list(datasets)
    for rep in range(args.repeats):
        for kind in kinds:
            ds = datasets[kind]
            if kind == 'timm':
                loader = build_timm(args, ds.num_classes)
            else:
                loader = build_ours(args, ds, device_aug=kind == 'ours-devaug')
            r = run(loader, kind, args.steps)
            del loader
            print(f"{kind:11s} run {rep}: {r['img_s']:8.1f} img/s {r['tok_s'] / 1e3:8.1f}k valid tok/s "
                  f"{r['tok_cpu_s'] / 1e3:7.1f}k valid tok per CPU-s ({r['steps']} steps, {r['seconds']:.1f}s wall, "
                  f"{r['cpu']:.1f} CPU-s, {r['ms_cpu_img']:.1f} CPU-ms per image)", flush=True)
            runs.setdefault(kind, []).append(r)
    # wall-clock: best run (least disturbed by other load); per CPU-second: median run
    best = {k: max(v, key=lambda r: r['tok_s']) for k, v in runs.items()}
    cpu_med = {k: statistics.median(r['tok_cpu_s'] for r in v) for k, v in runs.items()}
    ms_med = {k: statistics.median(r['ms_cpu_img'] for r in v) for k, v in runs.items()}
    print("\n| loader | images/s (best) | valid tokens/s (best) | valid tokens per CPU-second (median) | "
          "loader CPU-ms per image (median) |")
    print("|---|---|---|---|---|")
    for kind in kinds:
        print(f"| {kind} | {best[kind]['img_s']:.1f} | {best[kind]['tok_s'] / 1e3:.1f}k | "
              f"{cpu_med[kind] / 1e3:.1f}k | {ms_med[kind]:.2f} |")
    b = kinds[0]
    for a in kinds[1:]:  # ours/timm and ours-devaug/timm, or http/shards
        print(f"| {a}/{b} | {best[a]['img_s'] / best[b]['img_s']:.2f}x | {best[a]['tok_s'] / best[b]['tok_s']:.2f}x | "
              f"{cpu_med[a] / cpu_med[b]:.2f}x | {ms_med[a] / ms_med[b]:.2f}x |")
    return best


if __name__ == '__main__':
    main()
