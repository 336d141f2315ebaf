"""Training steps and evaluation batches from streamed shards (loaders.stream lays out who reads what).

Training: ``StreamStepDataset`` is loaders.train_loader's StepDataset with another source of images: the
DataLoader still asks for step keys ``(epoch, step)`` in order and a worker builds the whole step, taking its
images from the stream its steps belong to (kept open between its steps; reopened at the right slot when a key
does not follow on, e.g. after ``set_start_step``). So TrainLoader, its sampler, ``set_epoch`` /
``set_start_step``, MixUp/CutMix, packing and the failure protocol are the random-access path's.

A sample that fails to decode is replaced by another image of the same step, else by one of the next images of
the stream (peeked, still read in their own steps), augmented with the local path's replacement keys; the step
keeps its shape and the file is reported through ``bad_files``. Samples a failed shard could not deliver are
reported there too, once per missing sample (the bad-file limit counts them), under the shard's URL and reason.
A source that is gone (``stream_io.DataSourceError``) reaches the main process as that one-line error.

Evaluation: ``StreamEvalLoader`` gives rank ``r`` the positions ``[r*n//W, (r+1)*n//W)`` of the split in listed
order (no shuffle), each worker a contiguous part of them; every sample is scored once, a bad one (undecodable, or
not delivered by a failed shard) is counted as a bad file instead, so images + bad files = the split's size.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from augment.config import AugConfig
from augment.mixup import MixupConfig

from .config import EvalLoaderConfig, TrainLoaderConfig, resolve_pin_memory
from .decode import UndecodableImage
from .eval_loader import EvalCollate
from .pipeline import eval_sample
from .schedule import SeqLenSchedule
from .stream import (DataSourceError, Item, StreamPart, StreamReader, StreamSource, rank_range, rank_step_sizes,
                     segments, shard_order, split_streams)
from .train_loader import MAX_REPLACEMENTS, SourceLost, StepDataset, TrainLoader
from .workers import worker_init


class StreamMember(str):
    """A streamed sample where the pipeline expects a file: its name (``SHARD.tar:MEMBER``), which reads the bytes
    already in memory. Pickled (in a batch's bad-file list) it is just that name."""

    def __new__(cls, item: Item):
        self = super().__new__(cls, item.sample.name)
        self.data = item.sample.image
        return self

    def read_bytes(self) -> bytes:
        return self.data

    def __reduce__(self):
        return str, (str(self),)


@dataclasses.dataclass(frozen=True)
class _EpochPlan:
    order: object            # the shard order (np.ndarray)
    parts: Tuple[StreamPart, ...]
    step_part: Dict[int, Tuple[int, int, int]]  # step -> (stream, first slot, images)


class StreamStepDataset(StepDataset):
    """``ds[(epoch, step)]`` -> the step's (inputs, target) from streamed shards; ``num_streams``: the DataLoader's
    workers (1 without), ``shuffle_buffer``: the sample shuffle window (<= 1: off)."""

    def __init__(self, source: StreamSource, schedule: SeqLenSchedule, aug: AugConfig,
                 mixup: Optional[MixupConfig], *, packing: bool, seed: int, num_streams: int, shuffle_buffer: int,
                 epoch_samples: Optional[int] = None, timer=None):
        super().__init__(source, schedule, aug, mixup, packing=packing, seed=seed, timer=timer)
        self.num_streams, self.shuffle_buffer = max(1, num_streams), shuffle_buffer
        self.epoch_samples = int(epoch_samples or len(source))
        self._plans: Dict[int, _EpochPlan] = {}
        self._readers: Dict[int, StreamReader] = {}
        self._reader_epoch: Optional[int] = None

    def plan(self, epoch: int) -> _EpochPlan:
        """Who reads what in ``epoch`` on this rank (loaders.stream)."""
        if epoch not in self._plans:
            sched = self.schedule
            lo, hi = rank_range(self.epoch_samples, sched.rank, sched.world_size)
            # a rank that reads one sample past its range has it in ``sizes`` already: its parts reach hi + 1
            sizes, _ = rank_step_sizes([len(s.indices) for s in sched.steps(epoch)], hi - lo)
            parts = tuple(split_streams(sizes, lo, self.num_streams))
            step_part = {s: (p.index, slot, n) for p in parts for s, slot, n in p.steps}
            self._plans = {epoch: _EpochPlan(shard_order(len(self.dataset.urls), self.seed, epoch), parts, step_part)}
        return self._plans[epoch]

    def reader(self, epoch: int, stream: int, slot: int) -> StreamReader:
        """The stream's open reader when it stands at ``slot`` of ``epoch``, else a new one started there."""
        if self._reader_epoch != epoch:
            for r in self._readers.values():
                r.close()
            self._readers, self._reader_epoch = {}, epoch
        r = self._readers.get(stream)
        if r is None or r.slot != slot:
            if r is not None:
                r.close()
            plan, source = self.plan(epoch), self.dataset
            order = plan.order
            r = self._readers[stream] = StreamReader(
                source, lambda lo, hi: segments(source.lengths, order, lo, hi), plan.parts[stream], slot,
                self.shuffle_buffer, (self.seed, epoch, self.schedule.rank, stream), extent=len(source))
        return r

    def __getitem__(self, key: Tuple[int, int]):
        epoch, step_idx = key
        step = self.schedule.step(epoch, step_idx)
        L, P = step.seq_len, step.patch_size
        stream, slot, count = self.plan(epoch).step_part[step_idx]
        try:
            reader = self.reader(epoch, stream, slot)
            items = reader.take(count)
            bad = [m.what for m in reader.missing() for _ in range(m.count)]
            imgs, targets, rngs, gave_up = [], [], [], False
            for i, item in enumerate(items):
                loaded = None if gave_up else self._load_item(epoch, items, i, reader, L, P, bad)
                gave_up = loaded is None
                img, target, rng = loaded or self._stand_in_item(epoch, item, P)
                imgs.append(img)
                targets.append(target)
                rngs.append(rng)
            bad.extend(m.what for m in reader.missing() for _ in range(m.count))  # read while peeking
        except DataSourceError as e:
            return SourceLost(DataSourceError(str(e)))
        if not items:
            return SourceLost(DataSourceError(f'{self.dataset.root}: the stream of step {step_idx} (epoch {epoch}) '
                                              'delivered no sample'))
        return self._assemble(epoch, step_idx, L, P, imgs, targets, rngs, bad, gave_up)

    def _load_item(self, epoch: int, items: List[Item], i: int, reader: StreamReader, L: int, P: int,
                   bad: List[str]):
        """(PIL image, target, RNG) for ``items[i]``, or for its replacement (another image of the step in an
        order drawn from the local path's replacement key, then the stream's next images); None when
        ``MAX_REPLACEMENTS`` in a row fail."""
        item, pool = items[i], None
        for attempt in range(MAX_REPLACEMENTS):
            rng = random.Random(f"sample/{self.seed}/{epoch}/{items[i].key}" + (f"/{attempt}" if attempt else ""))
            target = self.dataset.target(item.sample.target)
            try:
                if target < 0:
                    raise UndecodableImage(f'its class {item.sample.target} is not among the classes read')
                return self.builder.build_pil(StreamMember(item), L, P, rng), target, rng
            except UndecodableImage:
                bad.append(item.sample.name)
            if pool is None:
                others = [x for j, x in enumerate(items) if j != i]
                random.Random(f"replace/{self.seed}/{epoch}/{items[i].key}").shuffle(others)
                pool = iter(others + reader.peek(MAX_REPLACEMENTS))
            item = next(pool, None)
            if item is None:
                return None
        return None

    def _stand_in_item(self, epoch: int, item: Item, P: int):
        return Image.new('RGB', (P, P), (128, 128, 128)), max(0, self.dataset.target(item.sample.target)), \
            random.Random(f"stand-in/{self.seed}/{epoch}/{item.key}")


def create_stream_train_loader(source: StreamSource, cfg: TrainLoaderConfig, aug: AugConfig,
                               mixup: Optional[MixupConfig], rank: int, world_size: int, epoch: int) -> TrainLoader:
    """The train loader over a streamed split (loaders.factory.create_train_loader calls it)."""
    if cfg.aug_repeats > 1:
        raise ValueError('--aug-repeats needs random access to the samples; streamed shards are read in order')
    if (cfg.num_samples or len(source)) < world_size:
        raise ValueError(f'{len(source)} samples cannot be shared by {world_size} ranks')
    sizes = list(cfg.patch_sizes) if cfg.patch_sizes else [cfg.patch_size]
    schedule = SeqLenSchedule(len(source), cfg.seq_lens, cfg.batch_size * max(cfg.seq_lens), seed=cfg.seed,
                              rank=rank, world_size=world_size, patch_sizes=sizes,
                              patch_size_probs=cfg.patch_size_probs, epoch_samples=cfg.num_samples)
    step_ds = StreamStepDataset(source, schedule, aug, mixup, packing=cfg.packing, seed=cfg.seed,
                                num_streams=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer,
                                epoch_samples=cfg.num_samples)
    return TrainLoader(step_ds, num_workers=cfg.num_workers, pin_memory=resolve_pin_memory(cfg.pin_memory),
                       persistent_workers=cfg.persistent_workers, prefetch_factor=cfg.prefetch_factor, epoch=epoch)


# --- evaluation ---------------------------------------------------------------------------------------------------

class _StreamEvalBatches(IterableDataset):
    """This rank's positions of the split in listed order, split contiguously over the DataLoader's workers, as
    collated eval batches."""

    def __init__(self, source: StreamSource, lo: int, hi: int, cfg: EvalLoaderConfig):
        self.source, self.lo, self.hi, self.cfg = source, lo, hi, cfg
        self.collate = EvalCollate(cfg.patch_size, cfg.packing, cfg.max_seq_len)

    def part(self, worker: int, num_workers: int) -> Tuple[int, int]:
        n = self.hi - self.lo
        return self.lo + worker * n // num_workers, self.lo + (worker + 1) * n // num_workers

    def __iter__(self):
        info = get_worker_info()
        lo, hi = self.part(info.id, info.num_workers) if info is not None else (self.lo, self.hi)
        if hi <= lo:
            return
        listed = np.arange(len(self.source.urls))
        reader = StreamReader(self.source, lambda a, b: segments(self.source.lengths, listed, a, b),
                              StreamPart(0, lo, hi, ()), 0, 1, (), extent=0)
        try:
            while True:
                items = reader.take(self.cfg.batch_size)
                missing = [m.what for m in reader.missing() for _ in range(m.count)]  # counted, never made up
                if not items and not missing:
                    return
                yield self.collate([self._score(item) for item in items] + [(None, 0, m) for m in missing])
        except DataSourceError as e:
            yield SourceLost(DataSourceError(str(e)))

    def _score(self, item: Item):
        cfg, name = self.cfg, StreamMember(item)
        target = self.source.target(item.sample.target)
        try:
            if target < 0:
                raise UndecodableImage(f'its class {item.sample.target} is not among the classes read')
            img = eval_sample(name, cfg.max_seq_len, cfg.patch_size, cfg.interpolation, cfg.draft,
                              cfg.exif_orientation)
        except UndecodableImage:
            return None, max(target, 0), str(name)
        return img, target, str(name)


class StreamEvalLoader:
    """Iterable of this rank's eval batches of a streamed split (``len``: batches, an upper bound)."""

    def __init__(self, source: StreamSource, cfg: EvalLoaderConfig, rank: int, world_size: int):
        n = len(source) if cfg.num_samples is None else min(cfg.num_samples, len(source))
        lo, hi = rank * n // world_size, (rank + 1) * n // world_size
        self.batches = _StreamEvalBatches(source, lo, hi, cfg)
        workers = cfg.num_workers
        self.num_batches = sum(-(-(b - a) // cfg.batch_size) for a, b in
                               (self.batches.part(w, max(1, workers)) for w in range(max(1, workers))))
        self.loader = DataLoader(self.batches, batch_size=None, num_workers=workers,
                                 pin_memory=resolve_pin_memory(cfg.pin_memory), worker_init_fn=worker_init())

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for item in self.loader:
            if isinstance(item, SourceLost):
                raise item.error
            yield item


def create_stream_eval_loader(source: StreamSource, cfg: Optional[EvalLoaderConfig] = None, *, rank: int = 0,
                              world_size: int = 1, **fields) -> StreamEvalLoader:
    cfg = dataclasses.replace(cfg or EvalLoaderConfig(), **fields)
    cfg.validate()
    return StreamEvalLoader(source, cfg, rank, world_size)


__all__ = ['StreamEvalLoader', 'StreamMember', 'StreamStepDataset', 'create_stream_eval_loader',
           'create_stream_train_loader']
