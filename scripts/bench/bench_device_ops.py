#!/usr/bin/env python3
"""Time each batched device-side photometric op (augment.device_ops) on one packed batch of the model card's size.

Command (the card's step at L=576: 64 images x 576 tokens of 16x16 patches; CUDA when present, else the CPU):
    python scripts/bench/bench_device_ops.py [--device cpu|cuda] [--images 64 --tokens 576 --patch-size 16] \
        [--repeats 5] [--threads N] [--pil] [--json out.json]
Runtime: CPU, the default batch: ~3-4 min on 2 shared cores (hue and the jitter with hue are the slow rows), ~1 min
more with --pil; one GPU: seconds.

What is timed: one call of each op on the whole batch (the images' patch grids keep a few aspect ratios, each with
about ``--tokens`` patches: 36-37k tokens, ~28M uint8 values for the default), with the apply mask set on half the
images (the work does not depend on it: every op processes every token) and the per-image parameters already on
the device. ``layout`` is PackedLayout.from_batch (made once per step and shared by the ops); ``color_jitter`` is
brightness/contrast/saturation in per-image order (the default --color-jitter 0.4), ``color_jitter_hue`` adds hue;
``normalize`` is the uint8 -> bf16 step the prefetcher already runs. Each op is called once untimed, then
``--repeats`` times; on CUDA each call is synchronised before and after, so a row is that op's device time plus its
launches. Prints milliseconds per batch, the median and the best call (on a shared machine the best is the steadier
figure). ``--pil`` adds the CPU path's time for the same work (PIL per image, one thread, on the images the op is
applied to): what the loader workers spend on it today. CPU thread pools: on a loaded 2-core machine each parallel
region can wait milliseconds for its threads to wake, so ``--threads 1`` gives the steadier CPU figures.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from augment import device_ops as D  # noqa: E402
from augment.photometric import apply_color_jitter, random_grayscale, sample_color_jitter  # noqa: E402
from augment.randaugment import OPS as RA_OPS, OpContext  # noqa: E402
from loaders.packing import pack  # noqa: E402

OPS = ('layout', 'brightness', 'contrast', 'saturation', 'sharpness', 'posterize', 'solarize', 'solarize_add',
       'invert', 'equalize', 'autocontrast', 'grayscale', 'hue', 'hflip', 'vflip', 'color_jitter',
       'color_jitter_hue', 'normalize')
JITTER, JITTER_HUE = (0.4, 0.4, 0.4, 0.0), (0.4, 0.4, 0.4, 0.1)  # --color-jitter 0.4, and with hue 0.1
ASPECTS = (1.0, 0.75, 4 / 3, 9 / 16, 16 / 9)  # w / h of the images' patch grids, in turn


def batch_parser(description: str, repeats: int,
                 tokens_help: str = 'patches per image (about: grids keep their aspect)') -> argparse.ArgumentParser:
    """The arguments every device-op bench takes: where, how big a batch, how many timed calls, the JSON file."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--images', type=int, default=64, help='images per batch')
    p.add_argument('--tokens', type=int, default=576, help=tokens_help)
    p.add_argument('--patch-size', type=int, default=16)
    p.add_argument('--repeats', type=int, default=repeats, help='timed calls (the median is reported)')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s)')
    p.add_argument('--json', default=None, help='write the results here')
    return p


def parse_args(argv=None):
    p = batch_parser("Milliseconds per batch of each device-side photometric op.", repeats=5)
    p.add_argument('--ops', nargs='+', default=list(OPS), choices=OPS)
    p.add_argument('--pil', action='store_true', help='also time the CPU path (PIL, per image) on the same images')
    return p.parse_args(argv)


def make_images(num_images: int, tokens: int, patch_size: int, seed: int = 0) -> List[torch.Tensor]:
    """uint8 HWC images: smooth random colour fields with noise (photo-like histograms)."""
    g = torch.Generator().manual_seed(seed)
    imgs = []
    for i in range(num_images):
        aspect = ASPECTS[i % len(ASPECTS)]
        gh = max(1, round(math.sqrt(tokens / aspect)))
        gw = max(1, tokens // gh)
        h, w = gh * patch_size, gw * patch_size
        low = torch.rand(1, 3, 6, 6, generator=g) * 255
        img = torch.nn.functional.interpolate(low, size=(h, w), mode='bilinear', align_corners=False)[0]
        img = img + torch.randn(3, h, w, generator=g) * 8
        imgs.append(img.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).contiguous())
    return imgs


def draw_params(n: int) -> Dict[str, list]:
    """Per-image parameters as the workers would draw them (RandAugment's ranges, the default jitter)."""
    rng = random.Random(0)
    return {
        'apply': [i % 2 == 0 for i in range(n)],
        'factor': [rng.uniform(0.1, 1.9) for _ in range(n)],
        'bits': [rng.randint(0, 8) for _ in range(n)],
        'threshold': [rng.randint(0, 256) for _ in range(n)],
        'add': [rng.randint(0, 110) for _ in range(n)],
        'hue': [rng.uniform(-0.5, 0.5) for _ in range(n)],
        'jitter': [sample_color_jitter(JITTER, random.Random(i)) for i in range(n)],
        'jitter_hue': [sample_color_jitter(JITTER_HUE, random.Random(i)) for i in range(n)],
    }


def op_calls(batch: Dict, params: Dict[str, list], device: torch.device) -> Dict[str, Callable[[], object]]:
    """One zero-argument call per op on the whole batch, with its inputs already on ``device``."""
    dev = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    x = dev['patches']
    layout = D.PackedLayout.from_batch(dev)
    apply = torch.tensor(params['apply']).to(device)
    factor, bits, threshold, add, hue = (torch.tensor(params[k], dtype=dtype).to(device) for k, dtype in (
        ('factor', torch.float64), ('bits', torch.int64), ('threshold', torch.int64), ('add', torch.int64),
        ('hue', torch.float64)))
    jitter = [t.to(device) for t in D.stack_color_jitter(params['jitter'])]
    jitter_hue = [t.to(device) for t in D.stack_color_jitter(params['jitter_hue'])]
    mean = torch.full((3,), 0.5, device=device)
    return {
        'layout': lambda: D.PackedLayout.from_batch(dev),
        'brightness': lambda: D.brightness(x, layout, apply, factor),
        'contrast': lambda: D.contrast(x, layout, apply, factor),
        'saturation': lambda: D.saturation(x, layout, apply, factor),
        'sharpness': lambda: D.sharpness(x, layout, apply, factor),
        'posterize': lambda: D.posterize(x, layout, apply, bits),
        'solarize': lambda: D.solarize(x, layout, apply, threshold),
        'solarize_add': lambda: D.solarize_add(x, layout, apply, add),
        'invert': lambda: D.invert(x, layout, apply),
        'equalize': lambda: D.equalize(x, layout, apply),
        'autocontrast': lambda: D.autocontrast(x, layout, apply),
        'grayscale': lambda: D.grayscale(x, layout, apply),
        'hue': lambda: D.hue(x, layout, apply, hue),
        'hflip': lambda: D.hflip(x, layout, apply),
        'vflip': lambda: D.vflip(x, layout, apply),
        'color_jitter': lambda: D.color_jitter(x, layout, *jitter, with_hue=False),
        'color_jitter_hue': lambda: D.color_jitter(x, layout, *jitter_hue, with_hue=True),
        'normalize': lambda: D.normalize_patches(x, mean, mean, torch.bfloat16),
    }


def pil_calls(imgs: List[torch.Tensor], params: Dict[str, list]) -> Dict[str, Callable[[], object]]:
    """The CPU path's per-image calls (augment.randaugment.OPS, augment.photometric on PIL images) on the images
    the device call applies the op to: the work the device path takes off the loader workers."""
    ctx = OpContext((128, 128, 128), InterpolationMode.BILINEAR)
    chosen = [(Image.fromarray(x.numpy()), i) for i, x in enumerate(imgs) if params['apply'][i]]

    def each(fn):
        return lambda: [fn(img, i) for img, i in chosen]

    def ra(name, key=None):
        return each(lambda img, i: RA_OPS[name](img, params[key][i] if key else None, ctx))

    return {
        'brightness': ra('Brightness', 'factor'), 'contrast': ra('Contrast', 'factor'),
        'saturation': ra('Color', 'factor'), 'sharpness': ra('Sharpness', 'factor'),
        'posterize': ra('Posterize', 'bits'), 'solarize': ra('Solarize', 'threshold'),
        'solarize_add': ra('SolarizeAdd', 'add'), 'invert': ra('Invert'), 'equalize': ra('Equalize'),
        'autocontrast': ra('AutoContrast'),
        'grayscale': each(lambda img, i: random_grayscale(img, 1.0, random.Random())),
        'hue': each(lambda img, i: F.adjust_hue(img, params['hue'][i])),
        'hflip': each(lambda img, i: F.horizontal_flip(img)), 'vflip': each(lambda img, i: F.vertical_flip(img)),
        'color_jitter': each(lambda img, i: apply_color_jitter(img, *params['jitter'][i])),
        'color_jitter_hue': each(lambda img, i: apply_color_jitter(img, *params['jitter_hue'][i])),
    }


def time_call(fn: Callable[[], object], device: torch.device, repeats: int) -> List[float]:
    """Milliseconds of each of ``repeats`` calls after one untimed call."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'


def time_table(calls: Dict[str, Callable[[], object]], pil: Dict[str, Callable[[], object]], args, device: torch.device,
               tokens: int, pil_label: str = 'CPU path, one thread:') -> List[Dict]:
    """Times ``calls[op]`` for each of ``args.ops`` (and ``pil[op]`` where there is one): one printed line and one
    row each; the rows also go to ``args.json`` when it is set."""
    name = device_name(device)
    width = max(map(len, args.ops)) + 2
    rows = []
    for op in args.ops:
        times = time_call(calls[op], device, args.repeats)
        row = {'op': op, 'ms': statistics.median(times), 'best_ms': min(times), 'device': name, 'tokens': tokens,
               'images': args.images}
        line = f"{op:{width}s} {row['ms']:10.2f} ms/batch (median) {row['best_ms']:10.2f} (best)"
        if op in pil:
            row['pil_best_ms'] = min(time_call(pil[op], torch.device('cpu'), args.repeats))
            line += f"   {pil_label} {row['pil_best_ms']:9.2f} (best)"
        rows.append(row)
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


def main(argv=None) -> List[Dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    imgs = make_images(args.images, args.tokens, args.patch_size)
    batch = pack(imgs, args.patch_size)
    params = draw_params(args.images)
    T, D_ = batch['patches'].shape
    print(f"{args.images} images, {T} tokens of {args.patch_size}x{args.patch_size} ({T * D_ / 1e6:.1f}M uint8 values) "
          f"on {device_name(device)}; torch {torch.__version__}; median and best of {args.repeats} calls")
    pil = pil_calls(imgs, params) if args.pil else {}
    return time_table(op_calls(batch, params, device), pil, args, device, T,
                      pil_label=f"PIL, one thread, {sum(params['apply'])} images:")

if __name__ == '__main__':
    main()
