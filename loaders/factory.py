"""Factories for the NaFlex train/eval loaders (NaViT arXiv:2307.06304 sequence packing, FlexiViT
arXiv:2212.08013 variable patch size, SigLIP 2 arXiv:2502.14786 NaFlex): one place that turns flag values into
a dataset, a schedule and a DataLoader. See loaders/__init__.py for the API summary.
"""
from __future__ import annotations

from typing import Optional, Sequence

from augment.mixup import MixupConfig
from augment.policy import AugConfig

from .dataset import ImageFolderDataset
from .eval_loader import make_eval_loader
from .schedule import SeqLenSchedule
from .train_loader import StepDataset, TrainLoader


def _pin(pin_memory: Optional[bool]) -> bool:
    """Default: pin host batches when CUDA is available (the prefetcher then copies them asynchronously)."""
    import torch
    return torch.cuda.is_available() if pin_memory is None else bool(pin_memory)


def _as_dataset(root, split, class_order='sorted', cache_dir=None):
    if hasattr(root, 'path') and hasattr(root, 'target'):
        return root  # already a dataset (ImageFolderDataset / ListDataset)
    return ImageFolderDataset(root, split, class_order=class_order, cache_dir=cache_dir)


def create_train_loader(
        root,
        split: str = 'train',
        *,
        seq_lens: Sequence[int] = (128, 256, 576, 784, 1024),
        batch_size: int = 64,
        patch_size: int = 16,
        patch_sizes: Optional[Sequence[int]] = None,
        patch_size_probs: Optional[Sequence[float]] = None,
        num_workers: int = 4,
        seed: int = 42,
        rank: int = 0,
        world_size: int = 1,
        packing: bool = True,
        aug: Optional[AugConfig] = None,
        mixup: Optional[MixupConfig] = None,
        num_classes: Optional[int] = None,
        epoch: int = 0,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        class_order: str = 'sorted',
        cache_dir=None,
) -> TrainLoader:
    """Train loader over ``root/split``. Token budget per step = ``batch_size * max(seq_lens)``.

    ``root`` may also be a dataset object (``ImageFolderDataset`` / ``ListDataset``). ``mixup`` is a
    MixupConfig or None; its ``num_classes`` is filled from ``num_classes`` or the dataset when 0/None.
    """
    dataset = _as_dataset(root, split, class_order, cache_dir)
    sizes = list(patch_sizes) if patch_sizes else [patch_size]
    schedule = SeqLenSchedule(len(dataset), seq_lens, batch_size * max(seq_lens), seed=seed, rank=rank,
                              world_size=world_size, patch_sizes=sizes, patch_size_probs=patch_size_probs)
    if mixup is not None and not mixup.num_classes:
        mixup.num_classes = num_classes or dataset.num_classes
    step_ds = StepDataset(dataset, schedule, aug or AugConfig(), mixup, packing=packing, seed=seed)
    return TrainLoader(step_ds, num_workers=num_workers, pin_memory=_pin(pin_memory),
                       persistent_workers=persistent_workers, prefetch_factor=prefetch_factor, epoch=epoch)


def create_eval_loader(
        root,
        split: str = 'validation',
        *,
        max_seq_len: int = 576,
        batch_size: int = 64,
        patch_size: int = 16,
        num_workers: int = 4,
        rank: int = 0,
        world_size: int = 1,
        packing: bool = True,
        interpolation: str = 'bicubic',
        draft: bool = False,
        pin_memory: Optional[bool] = None,
        class_order: str = 'sorted',
        cache_dir=None,
):
    """Eval loader: every image of this rank's contiguous shard once, timm's NaFlex eval resize."""
    dataset = _as_dataset(root, split, class_order, cache_dir)
    return make_eval_loader(dataset, max_seq_len=max_seq_len, batch_size=batch_size, patch_size=patch_size,
                            num_workers=num_workers, rank=rank, world_size=world_size, packing=packing,
                            interpolation=interpolation, draft=draft, pin_memory=_pin(pin_memory))
