"""Sequence-length / batch-size schedule for NaFlex training (NaViT arXiv:2307.06304 token budgets,
FlexiViT arXiv:2212.08013 patch-size randomisation), with timm 1.0.31's semantics.

- Token budget per step: ``tokens_per_batch = -b x max(seq_lens)``; a step at length L holds
  ``max(1, floor(budget / L / divisor) * divisor)`` images (divisor 8), the last step of the epoch fewer.
- The multiset of (L, batch size) steps is fixed from ``seed`` (one L drawn uniformly per step until the
  rank's samples are covered; the same draws as timm's NaFlex loader for the same seed; timm's train.py never
  passes its ``--seed`` to that loader, which then uses 42, so a timm run's schedule is ours at seed 42), so
  every epoch has the same number of steps on every rank.
- Each epoch: the indices are shuffled from (seed, epoch), padded by wrapping to a multiple of world_size
  (the only duplicates: ``ceil(n / W) * W - n`` per epoch) and dealt rank-strided, so ranks hold disjoint
  shards. ``epoch_samples`` (``--train-num-samples``) sets the epoch's length instead of n: a shorter epoch takes
  the first samples of the shuffled order (another subset each epoch), a longer one wraps around it.
  ``repeats`` R > 1 (timm's ``--aug-repeats``, RepeatAugSampler) repeats every index R times in a row before
  dealing, so its copies go to R consecutive ranks; the epoch keeps its length, so it sees n / R distinct
  images. Each slot carries its copy number (``Step.copies``: 0 for an index's first occurrence in the epoch),
  which keys a repeated image's augmentation apart from its first copy's. The step order is permuted from
  (seed, epoch) and a patch size is drawn per step — all identical on every rank. Everything is a pure function
  of (seed, epoch, rank, world_size, n): re-runs and resumes are exact.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import TrainLoaderConfig


def batch_size_for(seq_len: int, tokens_per_batch: int, divisor: int = 8) -> int:
    """``max(1, floor(tokens_per_batch / seq_len / divisor) * divisor)`` (timm's floor rounding)."""
    raw = tokens_per_batch / seq_len
    bs = math.floor(raw / divisor) * divisor if divisor > 1 else int(raw)
    return max(1, bs)


@dataclass(frozen=True)
class Step:
    seq_len: int
    patch_size: int
    indices: np.ndarray  # dataset indices of this rank's images for the step
    copies: Optional[np.ndarray] = None  # each index's occurrence number in the epoch (None: all first copies)


class SeqLenSchedule:
    def __init__(
            self,
            num_samples: int,
            seq_lens: Sequence[int],
            tokens_per_batch: int,
            *,
            seed: int = TrainLoaderConfig.seed,
            rank: int = 0,
            world_size: int = 1,
            patch_sizes: Sequence[int] = (16,),
            patch_size_probs: Optional[Sequence[float]] = None,
            divisor: int = 8,
            shuffle: bool = True,
            epoch_samples: Optional[int] = None,
            repeats: int = 1,
    ):
        if num_samples <= 0:
            raise ValueError("empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if epoch_samples is not None and epoch_samples <= 0:
            raise ValueError("epoch_samples must be > 0")
        if repeats < 1:
            raise ValueError("repeats must be >= 1")
        self.num_samples = num_samples
        self.epoch_samples = int(epoch_samples or num_samples)
        self.repeats = int(repeats)
        self.seq_lens = sorted(set(int(s) for s in seq_lens))
        self.tokens_per_batch = int(tokens_per_batch)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.patch_sizes = [int(p) for p in patch_sizes]
        if patch_size_probs is None:
            probs = [1.0] * len(self.patch_sizes)
        else:
            if len(patch_size_probs) != len(self.patch_sizes):
                raise ValueError("patch_size_probs must have one entry per patch size")
            probs = [float(p) for p in patch_size_probs]
        if sum(probs) <= 0:
            raise ValueError("patch_size_probs sum to zero")
        self.patch_size_probs = [p / sum(probs) for p in probs]
        self.divisor = divisor
        self.shuffle = shuffle
        self.samples_per_rank = -(-self.epoch_samples // world_size)
        self.canonical: List[Tuple[int, int]] = self._canonical()
        self._cache_epoch = None
        self._cache_steps: List[Step] = []

    def _canonical(self) -> List[Tuple[int, int]]:
        # Same draws as timm (torch.Generator seeded with ``seed``, one randint per step), so for a given
        # seed the epoch's multiset of (L, batch size) equals timm's and benchmarks compare like with like.
        g = torch.Generator()
        g.manual_seed(self.seed)
        steps, remaining = [], self.samples_per_rank
        while remaining > 0:
            L = self.seq_lens[int(torch.randint(0, len(self.seq_lens), (1,), generator=g))]
            bs = min(batch_size_for(L, self.tokens_per_batch, self.divisor), remaining)
            steps.append((L, bs))
            remaining -= bs
        return steps

    @property
    def num_steps(self) -> int:
        return len(self.canonical)

    def __len__(self) -> int:
        return self.num_steps

    def epoch_indices(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """(dataset indices, copy numbers) of this rank for ``epoch``, in consumption order (samples_per_rank each).

        The epoch's stream is the shuffled order with each index repeated ``repeats`` times, wrapped around
        (cyclically, if W or ``epoch_samples`` exceed it) to samples_per_rank x W slots and dealt rank-strided."""
        n, R, W = self.num_samples, self.repeats, self.world_size
        if self.shuffle:
            perm = np.random.default_rng([self.seed, int(epoch), 0x6E61666C]).permutation(n)
        else:
            perm = np.arange(n)
        pos = np.arange(self.samples_per_rank * W)[self.rank::W]
        cycle = n * R
        return perm[(pos % cycle) // R], (pos // cycle) * R + pos % R

    def steps(self, epoch: int) -> List[Step]:
        if self._cache_epoch == epoch:
            return self._cache_steps
        rng = random.Random(f"naflex-epoch/{self.seed}/{int(epoch)}")
        order = list(range(self.num_steps))
        if self.shuffle:
            rng.shuffle(order)
        indices, copies = self.epoch_indices(epoch)
        steps, pos = [], 0
        for k in order:
            L, bs = self.canonical[k]
            p = self.patch_sizes[0] if len(self.patch_sizes) == 1 else \
                rng.choices(self.patch_sizes, weights=self.patch_size_probs)[0]
            steps.append(Step(L, p, indices[pos:pos + bs], copies[pos:pos + bs]))
            pos += bs
        self._cache_epoch, self._cache_steps = epoch, steps
        return steps

    def step(self, epoch: int, step: int) -> Step:
        return self.steps(epoch)[step]
