#!/usr/bin/env python3
"""Time the device-side geometric RandAugment ops (augment.device_geometry), MixUp / CutMix and random erasing
(augment.device_mix) on one packed batch of the model card's size, beside the CPU path's per-image work.

Command (the card's step at L=576: 64 images x ~576 tokens of 16x16 patches; CUDA when present, else the CPU):
    python scripts/bench/bench_device_geometry_mix.py [--device cpu|cuda] [--images 64 --tokens 576 \
        --patch-size 16] [--repeats 3] [--threads N] [--pil] [--ops ...] [--json out.json]
Runtime: CPU, the default batch: ~3-6 min on 2 shared cores (the affine rows are most of it); one GPU: seconds.

What is timed, each with its inputs already on the device (the images of bench_device_ops.make_images):
``affine_bilinear``: ``affine`` with ``filters=('bilinear',)`` (4 taps per pixel), a RandAugment Rotate of every
other image; ``affine_random``: the same with timm's 'random' interpolation (bilinear or bicubic per image: 16 taps
read for every pixel); ``mixup`` / ``cutmix``: ``mix`` with every image paired (lambda 0.7, CutMix boxes of
sqrt(0.3) x the overlap); ``mix_targets``: the soft targets for 1000 classes; ``erase_pixel`` / ``erase_rand`` /
``erase_const``: ``erase`` with up to 3 rectangles per image (--recount 3) on 1 image in 4 (--reprob 0.25).
Each call is made once untimed, then ``--repeats`` times (synchronised on CUDA); median and best in ms per batch.
``--pil``: the CPU path on the same work, one thread (PIL Rotate on the applied images, mix_variable_size on the
batch of PIL images, RandomErasing on uint8 tensors): what the loader workers spend on it today.
"""
from __future__ import annotations

import math
import random
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark's images and timer

from augment import device_geometry as G, device_mix as M  # noqa: E402
from augment.device_ops import PackedLayout  # noqa: E402
from augment.erasing import RandomErasing  # noqa: E402
from augment.mixup import MixupConfig, mix_variable_size, smooth_one_hot  # noqa: E402
from augment.randaugment import OPS as RA_OPS, OpContext  # noqa: E402
from bench_device_ops import batch_parser, device_name, make_images, time_table  # noqa: E402
from loaders.packing import pack  # noqa: E402

OPS = ('affine_bilinear', 'affine_random', 'mixup', 'cutmix', 'mix_targets', 'erase_pixel', 'erase_rand',
       'erase_const')
LAM, NUM_CLASSES, RECOUNT, REPROB = 0.7, 1000, 3, 0.25
FILL = (128, 128, 128)


def parse_args(argv=None):
    p = batch_parser("Milliseconds per batch of the device-side geometric, mixing and erasing ops.", repeats=3)
    p.add_argument('--ops', nargs='+', default=list(OPS), choices=OPS)
    p.add_argument('--pil', action='store_true', help='also time the CPU path on the same work')
    return p.parse_args(argv)


def draws(imgs: List[torch.Tensor], patch_size: int) -> Dict[str, object]:
    """Per-image parameters as the workers would draw them."""
    rng = random.Random(0)
    n = len(imgs)
    angles = [rng.uniform(-30, 30) if i % 2 == 0 else None for i in range(n)]
    partners = [i ^ 1 if (i ^ 1) < n else None for i in range(n)]
    boxes = []
    for i, j in enumerate(partners):
        if j is None:
            boxes.append(None)
            continue
        oh, ow = (min(imgs[i].shape[k], imgs[j].shape[k]) for k in (0, 1))
        ch, cw = int(oh * math.sqrt(1 - LAM)), int(ow * math.sqrt(1 - LAM))
        boxes.append((rng.randint(0, oh - ch), rng.randint(0, ow - cw), ch, cw))
    erase = []
    for img in imgs:
        gh, gw = img.shape[0] // patch_size, img.shape[1] // patch_size
        rects = []
        if rng.random() < REPROB:
            for _ in range(rng.randint(1, RECOUNT)):
                h, w = rng.randint(1, max(1, gh // 2)), rng.randint(1, max(1, gw // 2))
                rects.append((rng.randint(0, gh - h), rng.randint(0, gw - w), h, w))
        erase.append(rects)
    return {'angles': angles, 'interps': [rng.choice(G.FILTERS) for _ in imgs], 'partners': partners,
            'boxes': boxes, 'erase': erase, 'targets': [rng.randrange(NUM_CLASSES) for _ in imgs]}


def device_calls(batch: Dict, imgs: List[torch.Tensor], d: Dict, device: torch.device) -> Dict[str, Callable]:
    dev = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    x = dev['patches']
    layout = PackedLayout.from_batch(dev)
    matrices = [G.rotate_matrix(a, im.shape[1], im.shape[0]) if a is not None else None
                for a, im in zip(d['angles'], imgs)]
    affine_random = [t.to(device) for t in G.stack_affine(matrices, d['interps'], [FILL] * len(imgs))]
    affine_bilinear = [t.to(device) for t in G.stack_affine(matrices, ['bilinear'] * len(imgs), [FILL] * len(imgs))]
    mixup = [t.to(device) for t in M.stack_mix(d['partners'], False, LAM, d['boxes'])]
    cutmix = [t.to(device) for t in M.stack_mix(d['partners'], True, LAM, d['boxes'])]
    base = smooth_one_hot(d['targets'], NUM_CLASSES, 0.1).to(device)
    rects = M.stack_erase_boxes(d['erase'], RECOUNT).to(device)
    half = torch.full((3,), 0.5, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    return {
        'affine_bilinear': lambda: G.affine(x, layout, *affine_bilinear, filters=('bilinear',)),
        'affine_random': lambda: G.affine(x, layout, *affine_random),
        'mixup': lambda: M.mix(x, layout, *mixup),
        'cutmix': lambda: M.mix(x, layout, *cutmix),
        'mix_targets': lambda: M.mix_targets(base, layout, *cutmix),
        'erase_pixel': lambda: M.erase(x, layout, rects, 'pixel', half, half, gen),
        'erase_rand': lambda: M.erase(x, layout, rects, 'rand', half, half, gen),
        'erase_const': lambda: M.erase(x, layout, rects, 'const', half, half, gen),
    }


def pil_calls(imgs: List[torch.Tensor], d: Dict, patch_size: int) -> Dict[str, Callable]:
    """The CPU path's work for the same draws (its own RNG draws where it makes them itself)."""
    pil = [Image.fromarray(x.numpy()) for x in imgs]
    modes = {'bilinear': InterpolationMode.BILINEAR, 'bicubic': InterpolationMode.BICUBIC}

    def rotate(interps):
        todo = [(im, a, OpContext(FILL, modes[f])) for im, a, f in zip(pil, d['angles'], interps) if a is not None]
        return lambda: [RA_OPS['Rotate'](im, a, ctx) for im, a, ctx in todo]

    def mix(mixup_alpha, cutmix_alpha):
        cfg = MixupConfig(num_classes=NUM_CLASSES, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha)
        return lambda: mix_variable_size(list(pil), d['targets'], cfg, random.Random(0))

    def erase(mode):
        eraser = RandomErasing(prob=REPROB, mode=mode, max_count=RECOUNT)
        return lambda: [eraser(x.clone(), random.Random(i), patch_size) for i, x in enumerate(imgs)]

    return {'affine_bilinear': rotate(['bilinear'] * len(imgs)), 'affine_random': rotate(d['interps']),
            'mixup': mix(0.8, 0.0), 'cutmix': mix(0.0, 1.0), 'erase_pixel': erase('pixel'),
            'erase_rand': erase('rand'), 'erase_const': erase('const')}


def main(argv=None) -> List[Dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    imgs = make_images(args.images, args.tokens, args.patch_size)
    batch = pack(imgs, args.patch_size)
    d = draws(imgs, args.patch_size)
    T, D_ = batch['patches'].shape
    print(f"{args.images} images, {T} tokens of {args.patch_size}x{args.patch_size} ({T * D_ / 1e6:.1f}M uint8 values) "
          f"on {device_name(device)}; torch {torch.__version__}; median and best of {args.repeats} calls")
    pil = pil_calls(imgs, d, args.patch_size) if args.pil else {}
    return time_table(device_calls(batch, imgs, d, device), pil, args, device, T)

if __name__ == '__main__':
    main()
