"""NaFlex training loader: one DataLoader item = one whole step (variable sequence length, NaViT
arXiv:2307.06304; variable patch size per step, FlexiViT arXiv:2212.08013; SigLIP 2 arXiv:2502.14786 NaFlex).

Design: the sampler lives in the main process and yields step keys ``(epoch, step)``; a map-style dataset
builds the whole batch for a key inside a worker. So
- DataLoader workers split steps round-robin with no duplicates, and batches come back in step order;
- ``set_epoch`` only changes the sampler, so it works with persistent workers;
- ``set_start_step(k)`` makes the next epoch iteration start at step k (exact mid-epoch resume);
- MixUp/CutMix stops at ``MixupConfig.off_epoch`` (``--mixup-off-epoch``); targets stay soft after that;
- every random choice is a pure function of the run's seed, so a batch is identical whatever the number of
  workers, and re-runs and resumes are exact:
  - a sample's draws (crop, interpolation, flips, RandAugment, grayscale, erasing) come from ``random.Random``
    seeded by (seed, epoch, dataset index, copy number): an image is augmented the same way whatever its rank,
    slot or the world size, and the images of one global step, on every rank, draw independently (as timm's
    per-rank, per-worker seeding gives). A repeated copy (``--aug-repeats``, the wrap-around that evens the ranks
    out, an epoch longer than the dataset) draws its own augmentation;
  - a step's MixUp/CutMix draws (mode, lambda, pairing, boxes) come from (seed, epoch, step, rank).

A file that fails to decode is replaced (the step keeps its shape) and its path is listed in
``inputs['bad_files']``; reporting it is the consumer's job (the trainer logs each path once per run), so workers
stay silent instead of repeating the warning per worker and epoch. The replacement is also a pure function of the
scheduled index: indices are drawn from (seed, epoch, index, 'replace'), and the k-th replacement's augmentation
from (seed, epoch, index, k). When ``MAX_REPLACEMENTS`` files in a row fail for one sample the data is broken,
not a file: iterating the loader raises ``UndecodableFiles`` (in the main process, with the paths, not as a
worker traceback). It carries the step all the same (``batch``), with a grey one-patch stand-in for that sample and
the rest of the step, read no further: with several ranks the trainer steps on it until the ranks agree to stop,
since a rank that left at once would leave the others waiting for it in a collective.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from augment.config import AugConfig
from augment.mixup import MixupConfig, mix_variable_size
from augment.stages import StageHook, stage

from .decode import UndecodableImage, pil_to_hwc
from .device_worker import build_host_step, prepare_sample, stand_in
from .packing import collate
from .pipeline import TrainSampleBuilder
from .schedule import SeqLenSchedule
from .workers import worker_init

MAX_REPLACEMENTS = 20


class UndecodableFiles(RuntimeError):
    """``MAX_REPLACEMENTS`` files in a row failed to decode for one sample; ``paths``: every failure of its step;
    ``batch``: the step's (inputs, target) with stand-ins from that sample on."""

    def __init__(self, paths: List[str], epoch: int, step: int, batch=None):
        self.paths, self.epoch, self.step, self.batch = list(paths), epoch, step, batch
        super().__init__(f'{MAX_REPLACEMENTS} files in a row failed to decode for one sample of step {step} '
                         f'(epoch {epoch}), e.g. {", ".join(self.paths[-3:])}')


@dataclass
class _StepFailed:
    """What a worker returns for a step it gave up on: an exception raised in a worker reaches the main process
    as text inside torch's re-raised copy, while this object arrives intact."""
    paths: List[str]
    epoch: int
    step: int
    batch: tuple


class StepSampler(Sampler):
    def __init__(self, schedule: SeqLenSchedule):
        self.schedule = schedule
        self.epoch = 0
        self.start_step = 0

    def __len__(self) -> int:
        return self.schedule.num_steps - self.start_step

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch, start = self.epoch, self.start_step
        self.start_step = 0  # resume offset applies to one pass only
        for s in range(start, self.schedule.num_steps):
            yield (epoch, s)


class StepDataset(Dataset):
    """Map-style: ``ds[(epoch, step)] -> (inputs, target)`` for the whole step. ``schedule`` gives each step's
    L, patch size and dataset indices (``.step(epoch, i)``, ``.num_steps``) and this process's ``.rank``;
    ``timer`` is an optional stage hook (augment.stages) called around every stage."""

    def __init__(self, dataset, schedule: SeqLenSchedule, aug: AugConfig, mixup: Optional[MixupConfig], *,
                 packing: bool, seed: int, timer: Optional[StageHook] = None, device_aug: bool = False):
        self.dataset = dataset
        self.schedule = schedule
        self.builder = TrainSampleBuilder(aug, timer=timer)
        self.mixup = mixup if (mixup is not None and mixup.active) else None
        self.packing = packing
        self.seed = seed
        self.timer = timer
        self.device_aug = device_aug  # steps as bytes + draws for loaders.device_step (loaders.device_worker)

    def __len__(self) -> int:
        return self.schedule.num_steps

    def _load(self, epoch: int, idx: int, copy: int, L: int, P: int, bad: List[str]):
        """(PIL image, target, the sample's RNG) for copy ``copy`` of dataset index ``idx``, or for its replacement
        if it fails; None when ``MAX_REPLACEMENTS`` files in a row failed."""
        n, picked = len(self.dataset), idx
        replacements = None
        key = f"{idx}#{copy}" if copy else f"{idx}"
        for attempt in range(MAX_REPLACEMENTS):
            suffix = f"/{attempt}" if attempt else ""
            rng = random.Random(f"sample/{self.seed}/{epoch}/{key}{suffix}")
            path = self.dataset.path(picked)
            try:
                if self.device_aug:
                    sample = prepare_sample(self.builder, self.builder.augment.erasing, path, L, P, rng, self.timer)
                    return sample, self.dataset.target(picked), rng
                return self.builder.build_pil(path, L, P, rng), self.dataset.target(picked), rng
            except UndecodableImage:  # only a file that cannot be read or decoded is replaced (reported
                bad.append(path)      # through the batch's bad_files: the trainer logs each path once)
                replacements = replacements or random.Random(f"replace/{self.seed}/{epoch}/{key}")
                picked = replacements.randrange(n)
        return None

    def _stand_in(self, epoch: int, idx: int, P: int):
        """A grey one-patch image in place of a sample the loader gave up on (UndecodableFiles.batch)."""
        rng = random.Random(f"stand-in/{self.seed}/{epoch}/{idx}")
        if self.device_aug:
            return stand_in(self.builder, self.builder.augment.erasing, P, rng), self.dataset.target(idx), rng
        return Image.new('RGB', (P, P), (128, 128, 128)), self.dataset.target(idx), rng

    def __getitem__(self, key: Tuple[int, int]):
        epoch, step_idx = key
        step = self.schedule.step(epoch, step_idx)
        L, P = step.seq_len, step.patch_size
        imgs, targets, bad, rngs = [], [], [], []
        gave_up = False
        copies = step.copies.tolist() if step.copies is not None else [0] * len(step.indices)
        for idx, copy in zip(step.indices.tolist(), copies):
            loaded = None if gave_up else self._load(epoch, idx, copy, L, P, bad)
            gave_up = loaded is None
            img, t, rng = loaded or self._stand_in(epoch, idx, P)
            imgs.append(img)
            targets.append(t)
            rngs.append(rng)
        return self._assemble(epoch, step_idx, L, P, imgs, targets, rngs, bad, gave_up)

    def _assemble(self, epoch: int, step_idx: int, L: int, P: int, imgs, targets, rngs, bad: List[str],
                  gave_up: bool):
        """The step from its loaded images: MixUp/CutMix, random erasing, packing (or padding); with ``device_aug``
        the device path's step of bytes and parameters instead (loaders.device_worker)."""
        mix_rng = random.Random(f"mix/{self.seed}/{epoch}/{step_idx}/{self.schedule.rank}")
        if self.device_aug:  # MixUp/CutMix draws, targets and the parameter tensors (loaders.device_worker)
            with stage(self.timer, 'pack'):
                batch = build_host_step(imgs, targets, self.builder, self.mixup, mix_rng, epoch=epoch, seq_len=L,
                                        patch_size=P, bad_files=bad)
            return _StepFailed(bad, epoch, step_idx, batch) if gave_up else batch
        if self.mixup is not None:
            # From MixupConfig.off_epoch on, targets keep the soft format (smoothed one-hot) so the loss keeps its type.
            with stage(self.timer, 'MixUp/CutMix'):
                imgs, target, _, _ = mix_variable_size(imgs, targets, self.mixup, mix_rng, inplace=True,
                                                       epoch=epoch)
        else:
            target = torch.tensor(targets, dtype=torch.int64)
        tensors = []
        for img, rng in zip(imgs, rngs):
            with stage(self.timer, 'to uint8 tensor'):
                x = pil_to_hwc(img)
            tensors.append(self.builder.augment.after_mix(x, rng, P))  # random erasing
        with stage(self.timer, 'pack'):
            inputs = collate(tensors, P, self.packing, L, bad)
        return _StepFailed(bad, epoch, step_idx, (inputs, target)) if gave_up else (inputs, target)


@dataclass
class SourceLost:
    """What a worker returns when the data source itself is gone (loaders.stream_io.DataSourceError): the
    main process raises ``error`` as it is, one line, instead of torch's re-raised copy with a worker traceback."""
    error: Exception


class TrainLoader:
    """Iterable of ``(inputs, target)`` steps. ``len()`` = steps per epoch (same on every rank)."""

    def __init__(self, step_dataset: StepDataset, *, num_workers: int, pin_memory: bool, persistent_workers: bool,
                 prefetch_factor: Optional[int], epoch: int = 0):
        self.step_dataset = step_dataset
        self.schedule = step_dataset.schedule
        self.sampler = StepSampler(self.schedule)
        self.sampler.epoch = epoch
        kwargs = {}
        if num_workers > 0:
            kwargs = dict(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor)
        self.loader = DataLoader(step_dataset, batch_size=None, sampler=self.sampler, num_workers=num_workers,
                                 pin_memory=pin_memory, worker_init_fn=worker_init(), **kwargs)

    def __len__(self) -> int:
        return self.schedule.num_steps

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = int(epoch)

    def set_start_step(self, step: int) -> None:
        """The next iteration yields steps ``step .. len(self)-1`` of the current epoch."""
        if not 0 <= step <= self.schedule.num_steps:
            raise ValueError(f"start step {step} outside [0, {self.schedule.num_steps}]")
        self.sampler.start_step = int(step)

    def __iter__(self):
        for item in self.loader:
            if isinstance(item, _StepFailed):
                raise UndecodableFiles(item.paths, item.epoch, item.step, item.batch)
            if isinstance(item, SourceLost):
                raise item.error
            yield item

    @property
    def dataset(self):
        return self.step_dataset.dataset
