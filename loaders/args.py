"""Build the NaFlex loaders from an argparse Namespace whose flag names are timm train.py's
(NaViT arXiv:2307.06304 / FlexiViT arXiv:2212.08013 / SigLIP 2 arXiv:2502.14786 data flags).

The trainer owns the CLI (naflex/config.py); this module only reads attributes, falling back to
``LOADER_FLAG_DEFAULTS`` (timm's defaults) for any that are missing. ``add_loader_args(parser)`` registers the
same flags for standalone tools (scripts/bench_loader.py) so names and defaults live in one place.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence, Tuple

from augment.mixup import MixupConfig
from augment.policy import AugConfig

from .factory import create_eval_loader, create_train_loader

# dest name -> (flag, default, argparse kwargs)
LOADER_FLAGS = {
    'data_dir': ('--data-dir', None, dict(help='dataset root holding the split folders')),
    'train_split': ('--train-split', 'train', dict(help='train split folder or .txt list of <class>/<file>')),
    'val_split': ('--val-split', 'validation', dict(help='validation split folder or .txt list')),
    'scale': ('--scale', [0.08, 1.0], dict(type=float, nargs=2, help='RRC area fraction range')),
    'ratio': ('--ratio', [3. / 4., 4. / 3.], dict(type=float, nargs=2, help='RRC aspect multiplier range')),
    'hflip': ('--hflip', 0.5, dict(type=float, help='horizontal flip probability')),
    'aa': ('--aa', None, dict(help="RandAugment spec, e.g. 'rand-m8-inc1-mstd1.0'")),
    'color_jitter': ('--color-jitter', 0.4, dict(type=float, help='colour jitter (only without --aa)')),
    'grayscale_prob': ('--grayscale-prob', 0.0, dict(type=float, help='random grayscale probability')),
    'reprob': ('--reprob', 0.0, dict(type=float, help='random erasing probability')),
    'remode': ('--remode', 'pixel', dict(help='random erasing mode: pixel|rand|const')),
    'recount': ('--recount', 1, dict(type=int, help='random erasing max rectangles')),
    'mixup': ('--mixup', 0.0, dict(type=float, help='MixUp alpha (0 = off)')),
    'cutmix': ('--cutmix', 0.0, dict(type=float, help='CutMix alpha (0 = off)')),
    'mixup_prob': ('--mixup-prob', 1.0, dict(type=float, help='probability a step is mixed')),
    'mixup_switch_prob': ('--mixup-switch-prob', 0.5, dict(type=float, help='CutMix vs MixUp when both on')),
    'mixup_off_epoch': ('--mixup-off-epoch', 0, dict(type=int, help='turn MixUp/CutMix off from this epoch')),
    'smoothing': ('--smoothing', 0.1, dict(type=float, help='label smoothing')),
    'train_interpolation': ('--train-interpolation', 'random', dict(help='random|bilinear|bicubic')),
    'naflex_train_seq_lens': ('--naflex-train-seq-lens', [128, 256, 576, 784, 1024],
                              dict(type=int, nargs='+', help='train sequence lengths')),
    'naflex_max_seq_len': ('--naflex-max-seq-len', 576, dict(type=int, help='eval sequence length')),
    'naflex_patch_sizes': ('--naflex-patch-sizes', None, dict(type=int, nargs='+', help='per-step patch sizes')),
    'naflex_patch_size_probs': ('--naflex-patch-size-probs', None, dict(type=float, nargs='+')),
    'batch_size': ('--batch-size', 128, dict(type=int, help='images per step at max(seq_lens) (token budget)')),
    'validation_batch_size': ('--validation-batch-size', None, dict(type=int)),
    'workers': ('--workers', 4, dict(type=int, help='DataLoader workers')),
    'seed': ('--seed', 42, dict(type=int)),
}
LOADER_FLAG_DEFAULTS = {k: v[1] for k, v in LOADER_FLAGS.items()}
_SHORT = {'batch_size': '-b', 'workers': '-j'}


def add_loader_args(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> argparse.ArgumentParser:
    for dest, (flag, default, kw) in LOADER_FLAGS.items():
        if dest in skip:
            continue
        names = [_SHORT[dest], flag] if dest in _SHORT else [flag]
        parser.add_argument(*names, dest=dest, default=default, **kw)
    return parser


def _get(args, name):
    v = getattr(args, name, None)
    return LOADER_FLAG_DEFAULTS.get(name) if v is None else v


def aug_config_from_args(args, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> AugConfig:
    return AugConfig(
        scale=tuple(_get(args, 'scale')), ratio=tuple(_get(args, 'ratio')),
        interpolation=_get(args, 'train_interpolation'), hflip=_get(args, 'hflip'), aa=getattr(args, 'aa', None),
        # timm: --color-jitter None means no jitter (not the default), so read it as given when present.
        color_jitter=getattr(args, 'color_jitter') if hasattr(args, 'color_jitter') else
        LOADER_FLAG_DEFAULTS['color_jitter'], grayscale_prob=_get(args, 'grayscale_prob'),
        reprob=_get(args, 'reprob'), remode=_get(args, 'remode'), recount=_get(args, 'recount'),
        mean=tuple(mean), std=tuple(std))


def mixup_config_from_args(args, num_classes: int = 0) -> Optional[MixupConfig]:
    mixup, cutmix = _get(args, 'mixup'), _get(args, 'cutmix')
    if not (mixup > 0 or cutmix > 0):
        return None
    return MixupConfig(num_classes=num_classes, mixup_alpha=mixup, cutmix_alpha=cutmix,
                       prob=_get(args, 'mixup_prob'), switch_prob=_get(args, 'mixup_switch_prob'),
                       smoothing=_get(args, 'smoothing'), off_epoch=_get(args, 'mixup_off_epoch'))


def create_loaders_from_args(args, *, rank: int = 0, world_size: int = 1, num_classes: Optional[int] = None,
                             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), patch_size: int = 16,
                             eval_interpolation: str = 'bicubic', pin_memory: Optional[bool] = None,
                             root=None) -> Tuple[object, object]:
    """(train_loader, eval_loader) from timm-named flags. ``root`` overrides args.data_dir / args.data."""
    root = root or getattr(args, 'data_dir', None) or getattr(args, 'data', None)
    if root is None:
        raise ValueError('no data directory: set --data-dir')
    patch_sizes = getattr(args, 'naflex_patch_sizes', None)
    workers = _get(args, 'workers')
    train = create_train_loader(
        root, _get(args, 'train_split'), seq_lens=_get(args, 'naflex_train_seq_lens'),
        batch_size=_get(args, 'batch_size'), patch_size=patch_size, patch_sizes=patch_sizes,
        patch_size_probs=getattr(args, 'naflex_patch_size_probs', None), num_workers=workers,
        seed=_get(args, 'seed'), rank=rank, world_size=world_size, aug=aug_config_from_args(args, mean, std),
        mixup=mixup_config_from_args(args, num_classes or 0), num_classes=num_classes, pin_memory=pin_memory)
    eval_bs = getattr(args, 'validation_batch_size', None) or _get(args, 'batch_size')
    val = create_eval_loader(
        root, _get(args, 'val_split'), max_seq_len=_get(args, 'naflex_max_seq_len'), batch_size=eval_bs,
        patch_size=patch_size, num_workers=workers, rank=rank, world_size=world_size,
        interpolation=eval_interpolation, pin_memory=pin_memory)
    return train, val
