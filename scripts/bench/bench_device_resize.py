#!/usr/bin/env python3
"""Time the device-side crop + resize into the packed layout (augment.device_resize) on one batch of the model
card's size, beside the CPU path's per-image Pillow resize of the same crops.

Command (the card's step at L=576: 64 images x ~576 tokens of 16x16 patches; CUDA when present, else the CPU):
    python scripts/bench/bench_device_resize.py [--device cpu|cuda] [--images 64 --tokens 576 --patch-size 16] \
        [--max-downscale 2.0] [--repeats 3] [--threads N] [--pil] [--json out.json]
Runtime: CPU, the default batch: ~1-3 min on 2 shared cores; one GPU: seconds.

What is timed: ``resize_to_packed`` on the whole batch with its inputs already on the device: the decoded sources
(random sizes around what a JPEG draft decode leaves for the card's step: each source 0.6-2x its output per side),
the loader's random-resized crops (augment.geometry.sample_rrc, scale 0.08-1, so both up- and downscales), the
filter drawn per image (timm's 'random' = bilinear or bicubic), flips on half the images, and
``taps = taps_for(--max-downscale)`` (8 for 2x: the tap count is a setting, every image of the batch pays it).
Each call is made once untimed, then ``--repeats`` times (synchronised on CUDA); median and best in ms per batch.
``--pil``: Pillow's ``resize(box=...)`` + flip per image on one thread, what the loader workers spend on the same
crops today. The run also checks the batch against Pillow bit for bit (``exact``).
"""
from __future__ import annotations

import json
import math
import random
import statistics
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark's timer

from augment import device_resize as R  # noqa: E402
from bench_device_ops import batch_parser, time_call  # noqa: E402
from augment.geometry import sample_rrc  # noqa: E402
from loaders.packing import pack  # noqa: E402

FILTERS = {'bilinear': Image.Resampling.BILINEAR, 'bicubic': Image.Resampling.BICUBIC}


def parse_args(argv=None):
    p = batch_parser("Milliseconds per batch of the device-side crop + resize.", repeats=3,
                     tokens_help='the step\'s sequence length (each crop fits it)')
    p.add_argument('--max-downscale', type=float, default=2.0, help='sets the tap count (taps_for)')
    p.add_argument('--pil', action='store_true', help='also time Pillow per image on the same crops')
    return p.parse_args(argv)


def make_batch(n: int, tokens: int, P: int, max_downscale: float, seed: int = 0):
    """Sources (uint8 HWC: smooth colour fields + noise) and per-image crops, grids, filters and flips."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    imgs, boxes, grids, filters, flips = [], [], [], [], []
    side = math.sqrt(tokens) * P
    for i in range(n):
        h = max(P, int(side * rng.uniform(0.6, 2.0)))
        w = max(P, int(side * rng.uniform(0.6, 2.0)))
        low = torch.rand(1, 3, 6, 6, generator=g) * 255
        img = torch.nn.functional.interpolate(low, size=(h, w), mode='bilinear', align_corners=False)[0]
        img = img + torch.randn(3, h, w, generator=g) * 8
        imgs.append(img.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).contiguous())
        crop = sample_rrc(h, w, rng, patch_size=P, max_seq_len=tokens)
        box, grid = (crop.top, crop.left, crop.height, crop.width), (crop.grid_h, crop.grid_w)
        if R.downscale(box[2:], (grid[0] * P, grid[1] * P)) > max_downscale:  # a draft decode would reduce it
            box, grid = (0, 0, h, w), (max(1, round(h / side * math.sqrt(tokens) / 2)),
                                       max(1, round(w / side * math.sqrt(tokens) / 2)))
        boxes.append(box)
        grids.append(grid)
        filters.append(rng.choice(sorted(FILTERS)))
        flips.append(i % 2 == 0)
    return imgs, boxes, grids, filters, flips


def pil_resize(imgs, boxes, grids, filters, flips, P) -> List[torch.Tensor]:
    out = []
    for img, (top, left, ch, cw), (gh, gw), name, flip in zip(imgs, boxes, grids, filters, flips):
        im = Image.fromarray(img.numpy()).resize((gw * P, gh * P), FILTERS[name], box=(left, top, left + cw, top + ch))
        out.append(torch.from_numpy(np.array(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im)))
    return out


def main(argv=None) -> Dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, P = torch.device(args.device), args.patch_size
    imgs, boxes, grids, filters, flips = make_batch(args.images, args.tokens, P, args.max_downscale)
    taps = R.taps_for(args.max_downscale)
    params = R.stack_resize_params([tuple(x.shape[:2]) for x in imgs], boxes, grids, filters, flips, P)
    src = torch.cat([x.reshape(-1) for x in imgs]).to(device)
    dev_params = params.to(device)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    T = params.num_tokens
    print(f"resize: {args.images} images -> {T} tokens of {P}x{P} ({T * P * P * 3 / 1e6:.1f}M uint8 values) from "
          f"{src.numel() / 1e6:.1f}M source values, {taps} taps, on {name}; torch {torch.__version__}")
    out = {}

    def call():
        out['batch'] = R.resize_to_packed(src, dev_params, taps)

    times = time_call(call, device, args.repeats)
    row = {'op': 'resize', 'ms': statistics.median(times), 'best_ms': min(times), 'device': name, 'tokens': T,
           'images': args.images, 'taps': taps}
    refs = pil_resize(imgs, boxes, grids, filters, flips, P)
    row['exact'] = bool(torch.equal(out['batch']['patches'].cpu(), pack(refs, P)['patches']))
    line = f"resize {row['ms']:10.1f} ms/batch (median) {row['best_ms']:10.1f} (best)  exact vs Pillow: {row['exact']}"
    if args.pil:
        row['pil_ms'] = min(time_call(lambda: pil_resize(imgs, boxes, grids, filters, flips, P),
                                      torch.device('cpu'), args.repeats))
        line += f"   Pillow, one thread: {row['pil_ms']:9.1f} (best)"
    print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))
    return row


if __name__ == '__main__':
    main()
