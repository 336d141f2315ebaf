"""The one factory for NaFlex loaders (NaViT arXiv:2307.06304 sequence packing, FlexiViT arXiv:2212.08013
variable patch size, SigLIP 2 arXiv:2502.14786 NaFlex): a dataset plus a config in, a loader out.

``create_train_loader(root_or_dataset, split, cfg, aug=..., mixup=..., rank=, world_size=)`` and
``create_eval_loader(...)``; any config field can also be given as a keyword (``seq_lens=(64, 128)``), which
overrides ``cfg``. The configs (loaders.config, augment.config, augment.mixup) are never modified.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from augment.config import AugConfig
from augment.mixup import MixupConfig

from .config import EvalLoaderConfig, TrainLoaderConfig, resolve_pin_memory
from .dataset import ImageFolderDataset
from .eval_loader import make_eval_loader
from .schedule import SeqLenSchedule
from .shards import ShardDataset, dataset_kind, is_shard_source
from .stream import StreamSource, open_stream, wants_stream
from .stream_loader import create_stream_eval_loader, create_stream_train_loader
from .train_loader import StepDataset, TrainLoader


def open_dataset(root, split: str, classes=None, cache_dir=None, dataset: str = '', input_key=None,
                 target_key=None, num_classes=None):
    """``root`` itself when it already is a dataset (``ImageFolderDataset`` / ``ShardDataset`` / ``ListDataset`` /
    any object with ``path(i)``, ``target(i)``, ``len``), else the split's tar shards (``dataset='wds/NAME'``, or
    shards found in ``root`` where it has no folder for the split: loaders.shards.is_shard_source), a Hugging Face
    dataset (``dataset='hfds/NAME'``, NAME a Hub id or a local folder; ``root`` its cache folder: loaders.hfds),
    a URL, bucket or ``file://`` root (or ``dataset='hfids/NAME'``) as streamed shards (loaders.stream.StreamSource),
    else the image folder ``root/split``. ``classes``: a class map (class names in index order), else timm's order.
    ``input_key`` / ``target_key``: which members of a tar shard's sample are the image and the label (timm's
    ``--input-key`` / ``--target-key``; loaders.shards.SampleKeys); an image folder takes neither. ``num_classes``:
    the class count of streamed shards whose ``_info.json`` names no classes (``--num-classes``)."""
    if hasattr(root, 'path') and hasattr(root, 'target') or isinstance(root, StreamSource):
        return root
    if wants_stream(root):  # a URL, bucket or file:// folder: read front to back (loaders.stream)
        if dataset_kind(dataset) not in ('', 'wds'):
            raise ValueError(f'--dataset {dataset}: a --data-dir URL streams WebDataset tar shards (wds/NAME)')
        return open_stream(os.fspath(root), split, classes=classes, input_key=input_key, target_key=target_key,
                           num_classes=num_classes)
    if dataset_kind(dataset) == 'hfids':  # streamed: its parquet files are the shards (loaders.hfids)
        from .hfids import open_hfids
        return open_hfids(dataset.partition('/')[2], split, cache_dir=os.fspath(root) if root else None,
                          classes=classes, input_key=input_key, target_key=target_key)
    if dataset_kind(dataset) == 'hfds':  # root: the datasets cache folder (timm's --data-dir for hfds/)
        from .hfds import HfDataset
        return HfDataset(dataset.partition('/')[2], split, cache_dir=os.fspath(root) if root else None,
                         classes=classes, input_key=input_key, target_key=target_key)
    if is_shard_source(root, split, dataset):
        return ShardDataset(root, split, classes=classes, cache_dir=cache_dir, input_key=input_key,
                            target_key=target_key)
    if input_key or target_key:
        raise ValueError(f'{root}: --input-key / --target-key name members of tar shards; an image folder has '
                         'none (its labels are its class folders)')
    return ImageFolderDataset(root, split, classes=classes, cache_dir=cache_dir)


def create_train_loader(root, split: str = 'train', cfg: Optional[TrainLoaderConfig] = None, *,
                        aug: Optional[AugConfig] = None, mixup: Optional[MixupConfig] = None,
                        num_classes: Optional[int] = None, rank: int = 0, world_size: int = 1, epoch: int = 0,
                        **fields) -> TrainLoader:
    """Train loader over ``root/split`` (or a dataset object). ``mixup``: a MixupConfig or None; a
    ``num_classes`` of 0 there means ``num_classes`` here, else the dataset's class count."""
    cfg = dataclasses.replace(cfg or TrainLoaderConfig(), **fields)
    cfg.validate()
    aug = aug or AugConfig()
    aug.validate()  # a bad spec fails here, in one line, not as a failure inside every worker
    if mixup is not None:
        mixup.validate()
    dataset = open_dataset(root, split)
    if mixup is not None and not mixup.num_classes:
        mixup = dataclasses.replace(mixup, num_classes=num_classes or dataset.num_classes)
    if isinstance(dataset, StreamSource):
        if aug.device_aug:
            raise ValueError('--device-aug reads image folders, tar shards and Hugging Face datasets by index; '
                             'streamed shards are augmented on the workers (drop --device-aug)')
        return create_stream_train_loader(dataset, cfg, aug, mixup, rank, world_size, epoch)
    sizes = list(cfg.patch_sizes) if cfg.patch_sizes else [cfg.patch_size]
    schedule = SeqLenSchedule(len(dataset), cfg.seq_lens, cfg.batch_size * max(cfg.seq_lens), seed=cfg.seed,
                              rank=rank, world_size=world_size, patch_sizes=sizes,
                              patch_size_probs=cfg.patch_size_probs, epoch_samples=cfg.num_samples,
                              repeats=max(1, cfg.aug_repeats))
    step_ds = StepDataset(dataset, schedule, aug, mixup, packing=cfg.packing, seed=cfg.seed, device_aug=aug.device_aug)
    return TrainLoader(step_ds, num_workers=cfg.num_workers, pin_memory=resolve_pin_memory(cfg.pin_memory),
                       persistent_workers=cfg.persistent_workers, prefetch_factor=cfg.prefetch_factor, epoch=epoch)


def create_eval_loader(root, split: str = 'validation', cfg: Optional[EvalLoaderConfig] = None, *, rank: int = 0,
                       world_size: int = 1, **fields):
    """Eval loader: every image of this rank's contiguous shard once, timm's NaFlex eval resize."""
    dataset = open_dataset(root, split)
    if isinstance(dataset, StreamSource):
        return create_stream_eval_loader(dataset, cfg, rank=rank, world_size=world_size, **fields)
    return make_eval_loader(dataset, cfg, rank=rank, world_size=world_size, **fields)
