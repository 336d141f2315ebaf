"""NaFlex evaluation loader: timm's NaFlex eval resize (aspect kept, largest grid fitting ``max_seq_len``,
no crop; NaViT arXiv:2307.06304 / SigLIP 2 arXiv:2502.14786), packed or padded batches.

Each rank gets a contiguous shard ``[r*n//W, (r+1)*n//W)`` with no padding duplicates, so every image is
scored exactly once across ranks (sum the per-rank counts); ``num_samples`` (``--val-num-samples``) limits the
split to its first N images. A file that fails to decode is dropped from its
batch (it cannot be replaced without double counting) and listed in ``inputs['bad_files']`` (the consumer
reports it: a warning from each worker would repeat per worker and epoch); a batch whose files all fail is
yielded with B = 0. So images + bad files is the split's size, and a split where that cannot hold (a tar shard
cut short: its samples after the cut are unknown) is refused with ``IncompleteSplit`` (``require_whole``).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from .config import EvalLoaderConfig, resolve_pin_memory
from .decode import UndecodableImage
from .packing import collate
from .pipeline import eval_sample
from .stream import StreamSource
from .workers import worker_init


class IncompleteSplit(ValueError):
    """The split holds samples that can be neither read nor counted: a tar shard cut short (a copy or download that
    stopped), after whose cut the number of samples is unknown."""


def require_whole(dataset) -> None:
    """Raise ``IncompleteSplit`` unless every sample of ``dataset`` is either scored or counted as a bad file, so
    an evaluation never reports fewer samples than its split holds as the split's result."""
    cut = list(getattr(dataset, 'cut_short', ()))
    if cut:
        more = f' (+{len(cut) - 3} more shards)' if len(cut) > 3 else ''
        raise IncompleteSplit(f'split {dataset.split!r} of {dataset.root} cannot be scored whole: {"; ".join(cut[:3])}'
                              f'{more}; the samples from the cut on can be neither read nor counted: copy the '
                              f'shard{"s" * (len(cut) > 1)} again')


class EvalImages(Dataset):
    def __init__(self, dataset, max_seq_len: int, patch_size: int, interpolation: str, draft: bool,
                 rank: int = 0, world_size: int = 1, exif_orientation: bool = EvalLoaderConfig.exif_orientation,
                 num_samples: Optional[int] = None):
        n = len(dataset) if num_samples is None else min(num_samples, len(dataset))
        self.dataset = dataset
        self.lo, self.hi = rank * n // world_size, (rank + 1) * n // world_size
        self.max_seq_len, self.patch_size = max_seq_len, patch_size
        self.interpolation, self.draft, self.exif_orientation = interpolation, draft, exif_orientation

    def __len__(self):
        return self.hi - self.lo

    def __getitem__(self, i):
        idx = self.lo + i
        path = self.dataset.path(idx)
        try:
            img = eval_sample(path, self.max_seq_len, self.patch_size, self.interpolation, self.draft,
                              self.exif_orientation)
        except UndecodableImage:  # a bad setting or a bug propagates instead of blaming the file
            return None, self.dataset.target(idx), path
        return img, self.dataset.target(idx), path


class EvalCollate:
    def __init__(self, patch_size: int, packing: bool, max_seq_len: int):
        self.patch_size, self.packing, self.max_seq_len = patch_size, packing, max_seq_len

    def __call__(self, items):
        imgs = [x for x, _, _ in items if x is not None]
        targets = [t for x, t, _ in items if x is not None]
        bad: List[str] = [p for x, _, p in items if x is None]
        inputs = collate(imgs, self.patch_size, self.packing, self.max_seq_len, bad)
        return inputs, torch.tensor(targets, dtype=torch.int64)


def make_eval_loader(dataset, cfg: Optional[EvalLoaderConfig] = None, *, rank: int = 0, world_size: int = 1,
                     persistent_workers: bool = False, **fields) -> DataLoader:
    """DataLoader over this rank's shard of ``dataset`` (IncompleteSplit unless it is whole); config fields may
    be given as keywords."""
    if isinstance(dataset, StreamSource):  # streamed shards: read front to back, not by index
        from .stream_loader import create_stream_eval_loader
        return create_stream_eval_loader(dataset, cfg, rank=rank, world_size=world_size, **fields)
    cfg = dataclasses.replace(cfg or EvalLoaderConfig(), **fields)
    cfg.validate()
    require_whole(dataset)
    images = EvalImages(dataset, cfg.max_seq_len, cfg.patch_size, cfg.interpolation, cfg.draft, rank, world_size,
                        exif_orientation=cfg.exif_orientation, num_samples=cfg.num_samples)
    kwargs = dict(persistent_workers=persistent_workers) if cfg.num_workers > 0 else {}
    return DataLoader(images, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                      collate_fn=EvalCollate(cfg.patch_size, cfg.packing, cfg.max_seq_len),
                      pin_memory=resolve_pin_memory(cfg.pin_memory), worker_init_fn=worker_init(),
                      drop_last=False, **kwargs)
