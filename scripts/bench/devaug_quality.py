#!/usr/bin/env python3
"""Does ``--device-aug`` train as well as the CPU path? The same short run (generated demo data, tiny model, the
card's augmentations) with the augmentation on the workers and on the device, for a few seeds; prints per run the
last epoch's train loss and eval loss / top-1, and each path's mean.

Command (~6-10 min on 2 shared cores with the defaults; the device side runs on the CPU here, slowly):
    python scripts/bench/devaug_quality.py [--seeds 0 1 2] [--epochs 8] [--out /tmp/devaug_quality]
The two paths draw the same augmentation parameters (same seed), so their differences come from the pixels where a
large JPEG is reduced before the resize (loaders.device_step) and from random erasing's fill values; across seeds
the spread shows the noise those differences are to be compared with.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import train  # noqa: E402
from loaders.demo_data import make_demo_dataset  # noqa: E402

CARD_AUG = '--aa rand-m8-inc1-mstd1.0 --grayscale-prob .1 --mixup 0.8 --cutmix 1.0 --reprob 0.25'.split()


def run(data: Path, out: Path, name: str, seed: int, epochs: int, device_aug: bool):
    argv = ['--data-dir', str(data), '--model', 'naflexvit_tiny_test', '-b', '16', '-j', '2', '--device', 'cpu',
            '--epochs', str(epochs), '--warmup-epochs', '1', '--lr', '2e-3', '--naflex-train-seq-lens', '64', '128',
            '--naflex-max-seq-len', '128', '--seed', str(seed), '--log-interval', '50', '--output', str(out),
            '--experiment', name, *CARD_AUG] + (['--device-aug'] if device_aug else [])
    return train.main(argv)[-1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--epochs', type=int, default=8)
    p.add_argument('--out', default='/tmp/devaug_quality')
    args = p.parse_args(argv)
    out = Path(args.out)
    data = make_demo_dataset(out / 'data', num_classes=4, per_class=48, val_per_class=16, seed=0, min_size=64,
                             max_size=400)
    rows = {False: [], True: []}
    for seed in args.seeds:
        for device_aug in (False, True):
            r = run(data, out, f'seed{seed}-{"device" if device_aug else "cpu"}', seed, args.epochs, device_aug)
            rows[device_aug].append(r)
            print(f"seed {seed} {'device' if device_aug else 'cpu   '}: train loss {r['train_loss']:.4f}  eval loss "
                  f"{r['eval_loss']:.4f}  top1 {r['eval_top1']:.2f}", flush=True)
    for device_aug, rs in rows.items():
        top1 = [r['eval_top1'] for r in rs]
        print(f"{'--device-aug' if device_aug else 'CPU path    '}: mean train loss "
              f"{statistics.mean(r['train_loss'] for r in rs):.4f}, eval loss "
              f"{statistics.mean(r['eval_loss'] for r in rs):.4f}, top1 {statistics.mean(top1):.2f} "
              f"(seeds: {', '.join(f'{t:.1f}' for t in top1)})")
    return rows


if __name__ == '__main__':
    main()
