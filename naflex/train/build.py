"""Builds a training run's parts from its ``Config``: datasets, model, loaders, optimizer and friends, the run
folder. train.py calls these in order; each turns the mistakes a user can make into one-line ``UserError``s.
NaFlex: SigLIP 2 (arXiv:2502.14786); packed sequences: NaViT (arXiv:2307.06304).
"""
from __future__ import annotations

import dataclasses
import logging
from datetime import datetime
from pathlib import Path
from typing import Optional, Tuple

import torch

import loaders
import naflex
from loaders.shards import classes_compatible

from .checkpoint import load_weights
from .config import Config
from .distributed import DistInfo, broadcast_object, primary_first

_logger = logging.getLogger('train')


class UserError(Exception):
    """A problem the user can fix; reported as one line without a traceback."""


def open_datasets(cfg: Config):
    """(train dataset, val dataset or None), checked: both exist, hold images and the same classes. Image folders
    or tar shards (``--dataset wds/NAME``, or shards found in ``--data-dir``); rank 0 opens them first, so an index
    it builds and caches is read, not rebuilt, by the other ranks."""
    root, data = Path(cfg.data.root), cfg.data
    if not root.is_dir():
        raise UserError(f'--data-dir {root} does not exist')
    with primary_first():
        train_ds = _open_split(data, data.train_split, 'no training images')
        val_ds = _open_split(data, data.val_split, 'no validation images',
                             ' (pass --val-split "" to train without evaluation)') if data.val_split else None
    if len(train_ds) == 0:
        raise UserError(f'--data-dir {root}: split {data.train_split!r} holds no images')
    if val_ds is not None and not classes_compatible(train_ds, val_ds):
        only_t = sorted(set(train_ds.classes) - set(val_ds.classes))[:5]
        only_v = sorted(set(val_ds.classes) - set(train_ds.classes))[:5]
        raise UserError(f'class folders differ between {data.train_split!r} and {data.val_split!r}: '
                        f'only in train {only_t}, only in val {only_v}')
    return train_ds, val_ds


def _open_split(data, split: str, what: str, hint: str = ''):
    try:
        return loaders.open_dataset(data.root, split, class_order=data.class_order, cache_dir=data.cache_dir,
                                    dataset=data.dataset)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f'{what}: {e}{hint}') from None


def num_classes_for(cfg: Config, train_ds) -> int:
    num_classes = cfg.model.num_classes or len(train_ds.classes)
    if num_classes < len(train_ds.classes):
        raise UserError(f'--num-classes {num_classes} is below the {len(train_ds.classes)} class folders in '
                        f'{cfg.data.root}/{cfg.data.train_split}')
    return num_classes


def build_model(cfg: Config, num_classes: int) -> torch.nn.Module:
    """The model with its start weights (--initial-checkpoint / --pretrained-path), on the CPU."""
    m = cfg.model
    if m.pretrained and not m.pretrained_path:
        raise UserError('--pretrained needs local weights (nothing is downloaded): pass --pretrained-path FILE')
    try:
        model = naflex.create_model(m.name, **m.overrides(num_classes))
    except ValueError as e:
        raise UserError(str(e)) from None
    for path, use_ema in ((m.initial_checkpoint, False), (m.pretrained_path, True)):
        if path:
            try:
                load_weights(model, path, use_ema=use_ema)
            except (FileNotFoundError, ValueError) as e:  # WeightsMismatch is a ValueError
                raise UserError(str(e)) from None
            _logger.info(f'loaded weights from {path}')
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.set_attn_backend(m.attn_backend)
    if cfg.loader.patch_sizes and m.torchcompile:
        model.prewarm_patch_sizes(cfg.loader.patch_sizes)  # resampling matrices built outside the graph
    return model


def resolve_data_config(cfg: Config, model: torch.nn.Module) -> Config:
    """The configs with the model's patch size, normalization and eval interpolation filled in."""
    norm = naflex.data_config(model)
    mean, std = tuple(cfg.model.mean or norm['mean']), tuple(cfg.model.std or norm['std'])
    return dataclasses.replace(
        cfg, aug=dataclasses.replace(cfg.aug, mean=mean, std=std),
        model=dataclasses.replace(cfg.model, mean=mean, std=std),
        loader=dataclasses.replace(cfg.loader, patch_size=model.patch_size),
        eval=dataclasses.replace(cfg.eval, patch_size=model.patch_size, interpolation=norm['interpolation']))


def build_loaders(cfg: Config, train_ds, val_ds, num_classes: int, dist: DistInfo) -> Tuple[object, Optional[object]]:
    """(train loader, eval loader or None) for this rank; host memory is pinned on CUDA."""
    pin = True if dist.device.type == 'cuda' else cfg.loader.pin_memory
    train = loaders.create_train_loader(
        train_ds, cfg=dataclasses.replace(cfg.loader, pin_memory=pin), aug=cfg.aug, mixup=cfg.mixup,
        num_classes=num_classes, rank=dist.rank, world_size=dist.world_size)
    val = None
    if val_ds is not None:
        val = loaders.make_eval_loader(val_ds, dataclasses.replace(cfg.eval, pin_memory=pin), rank=dist.rank,
                                       world_size=dist.world_size)
    return train, val


def output_dir(cfg: Config, dist: DistInfo) -> Path:
    """The run folder (created by rank 0; every rank gets its path)."""
    out = None
    if dist.is_primary:
        name = cfg.run.experiment or f'{datetime.now():%Y%m%d-%H%M%S}-{cfg.model.name}'
        out = Path(cfg.run.output) / name
        out.mkdir(parents=True, exist_ok=True)
    return Path(broadcast_object(str(out) if out else None))


__all__ = ['UserError', 'build_loaders', 'build_model', 'num_classes_for', 'open_datasets',
           'output_dir', 'resolve_data_config']
