"""Build the NaFlex loaders from an argparse Namespace whose flag names are timm train.py's
(NaViT arXiv:2307.06304 / FlexiViT arXiv:2212.08013 / SigLIP 2 arXiv:2502.14786 data flags).

The trainer owns the CLI (naflex/config.py declares every flag and default once); this module only reads
attributes, falling back to ``LOADER_FLAG_DEFAULTS`` (config's defaults) for any that are missing.
``add_loader_args(parser)`` copies the same flags onto standalone tools' parsers (scripts/bench_loader.py).
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence, Tuple

from augment.mixup import MixupConfig
from augment.policy import AugConfig

from .factory import create_eval_loader, create_train_loader

# train.py flags the loaders read. Their option strings, types, help and defaults (timm's) are declared once,
# in naflex/config.py's parser; this module copies them from there.
LOADER_DESTS = (
    'data_dir', 'train_split', 'val_split', 'batch_size', 'validation_batch_size', 'scale', 'ratio', 'hflip',
    'color_jitter', 'grayscale_prob', 'aa', 'reprob', 'remode', 'recount', 'mixup', 'cutmix', 'mixup_prob',
    'mixup_switch_prob', 'mixup_off_epoch', 'smoothing', 'train_interpolation', 'naflex_train_seq_lens',
    'naflex_max_seq_len', 'naflex_patch_sizes', 'naflex_patch_size_probs', 'seed', 'workers',
)


def _loader_actions() -> list:
    from naflex.config import build_parser
    actions = [a for a in build_parser()._actions if a.dest in LOADER_DESTS]
    assert len(actions) == len(LOADER_DESTS), 'LOADER_DESTS names a flag naflex/config.py does not declare'
    return actions


LOADER_FLAG_DEFAULTS = {a.dest: a.default for a in _loader_actions()}


def add_loader_args(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Register train.py's loader flags (same names, types, help and defaults) on a standalone tool's parser."""
    for a in _loader_actions():
        if a.dest not in skip:
            parser.add_argument(*a.option_strings, dest=a.dest, default=a.default, type=a.type, nargs=a.nargs,
                                choices=a.choices, metavar=a.metavar, help=a.help)
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
        LOADER_FLAG_DEFAULTS['color_jitter'], grayscale_prob=_get(args, 'grayscale_prob') or 0.0,  # None: off
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
