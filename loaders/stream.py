"""Streamed shards: which samples each rank and DataLoader worker reads, in which order, for every epoch.

Tar shards on URLs and in buckets cannot be read by offset (loaders.shards does that for local files), only front
to back (loaders.stream_io). The layout here keeps what the random-access path gives, as far as a stream allows:

- The epoch's shard order is a permutation drawn from (seed, epoch). Concatenated, the shards are one sequence of
  ``N = sum(shard_lengths)`` samples (``_info.json``'s lengths); an epoch of ``E`` samples (``--train-num-samples``,
  default N) is positions ``0..E-1`` of it, position ``p`` being sample ``p mod N`` of the order (copy ``p // N``).
- Rank ``r`` of ``W`` reads the contiguous positions ``[r*E//W, (r+1)*E//W)``: every sample exactly once per epoch
  across all ranks, whatever the shard lengths. A range that starts inside a shard streams it from there
  (``skip=``), so each rank and worker pays at most one partial shard per epoch.
- Steps: the random-access path's schedule (loaders.schedule.SeqLenSchedule for N samples): the same sequence
  lengths, patch sizes, step order and step count on every rank. A rank whose range is one sample short of
  ``ceil(E/W)`` takes one image fewer in its largest step (DDP weighs images, not ranks, so nothing is biased);
  only when every step holds one image does it read one sample of the next range instead.
- DataLoader workers: step ``s`` belongs to stream ``s mod K`` (K = max(1, workers)), the order in which the
  DataLoader hands steps to its workers; stream ``j`` is a contiguous part of the rank's range, sized by its steps.
- The sample shuffle (``--wds-shuffle-buffer B``): the samples of each window of B consecutive positions of a
  stream come out in an order drawn from (seed, epoch, rank, stream, window) -- what a shuffle buffer of B does to
  a stream, but a pure function of the position, so a resumed epoch starts at any step exactly.
- Resume at step k: each stream starts at its first step >= k; it skips whole shards without reading them, streams
  the shard it starts in from the start of the shuffle window (up to B samples are read again) and goes on from
  there: the rest of the epoch is the uninterrupted run's, sample for sample.
- A shard that fails (``stream_io.ShardFailed``) or ends before its listed length is reported with its missing
  samples counted as bad files; the stream reads as many samples further on (the next range's first ones) so
  every step keeps its shape. The samples after it are then one shard later than planned: that epoch is no longer
  exactly reproducible (the failure was not either).

Augmentation draws are keyed by the sample's index in the split's listed order (shard offset + position in its
shard), as loaders.train_loader keys them by dataset index, so an image draws what it would draw on the random-
access path in the same epoch; the step's MixUp/CutMix draws are keyed by (seed, epoch, step, rank) alike.
"""
from __future__ import annotations

import os
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .shards import SampleKeys, expand_braces, is_shard_pattern, split_candidates
from . import stream_io
from .stream_io import DataSourceError, ShardFailed, StreamSample

_ORDER_TAG = 0x73747265  # keeps the shard order's draws apart from the other (seed, epoch) streams


def stream_settings() -> Tuple[int, float]:
    """(retries, timeout in s) for every shard read: ``NAFLEX_STREAM_RETRIES`` / ``NAFLEX_STREAM_TIMEOUT``, else
    3 and 30 s."""
    return int(os.environ.get('NAFLEX_STREAM_RETRIES', 3)), float(os.environ.get('NAFLEX_STREAM_TIMEOUT', 30.0))


def wants_stream(root) -> bool:
    """Whether ``--data-dir`` is read as a stream: a URL or bucket (``stream_io.is_remote``) or ``file://PATH``,
    which streams a local folder the same way (to try a streamed run, or where seeking is slow)."""
    root = os.fspath(root) if root is not None else ''
    return root.startswith('file://') or stream_io.is_remote(root)


@dataclass
class StreamSource:
    """One split of streamed shards: their URLs and lengths in listed order, the classes, how a shard is opened.
    ``len()`` is the number of samples; ``path`` / ``targets`` do not exist (nothing is read by index)."""
    root: str
    split: str
    urls: List[str]
    lengths: np.ndarray                     # int64 samples per shard, as listed
    classes: List[str]
    class_names_known: bool
    keys: SampleKeys = SampleKeys()
    remap: Optional[np.ndarray] = None      # listed class index -> index in ``classes`` (a class map), -1: not in it
    open_shard: Optional[Callable[..., Iterator[StreamSample]]] = None  # (url, skip) -> samples; default: tar
    skipped_classes: List[str] = field(default_factory=list)
    cut_short: List[str] = field(default_factory=list)

    def __post_init__(self):
        self.base = self.root
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def target(self, listed: int) -> int:
        """The class index a sample's label means here; -1 for a class the class map leaves out or an index beyond
        the classes (the loaders treat that sample as a bad one)."""
        if self.remap is None:
            return int(listed) if 0 <= listed < len(self.classes) else -1
        return int(self.remap[listed]) if 0 <= listed < len(self.remap) else -1

    def read(self, shard: int, skip: int = 0) -> Iterator[StreamSample]:
        """Samples ``skip..`` of shard ``shard`` (listed order), front to back."""
        if self.open_shard is not None:
            return self.open_shard(self.urls[shard], skip)
        retries, timeout = stream_settings()
        return stream_io.iter_shard_samples(self.urls[shard], self.keys, retries=retries, timeout=timeout, skip=skip)


def open_stream(root: str, split: str, *, classes=None, input_key: Optional[str] = None,
                target_key: Optional[str] = None, num_classes: Optional[int] = None) -> StreamSource:
    """The streamed split ``split`` of the shards under ``root`` (a URL, bucket or ``file://`` folder), from its
    ``_info.json``: the split's ``filenames`` and ``shard_lengths`` (a brace pattern takes the lengths of the files
    it names), ``classes`` when present. FileNotFoundError / ValueError name what is missing in one line;
    ``stream_io.DataSourceError`` when the source cannot be read."""
    root = str(root).rstrip('/')
    info = stream_io.read_info(root)
    splits = info.get('splits') or {}
    if is_shard_pattern(split):
        names = expand_braces(split.split('|', 1)[0])
        known = {n: int(k) for s in splits.values()
                 for n, k in zip(s.get('filenames', ()), s.get('shard_lengths', ()))}
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f'{root}: streaming needs each shard\'s length, and _info.json lists none for '
                             f'{", ".join(missing[:3])}' + (' ...' if len(missing) > 3 else ''))
        picked, lengths, split_info = split, [known[n] for n in names], {}
    else:
        picked = next((s for s in split_candidates(split) if s in splits), None)
        if picked is None:
            raise FileNotFoundError(f'split {split!r} is not in {root}/_info.json '
                                    f'(splits: {", ".join(splits) or "none"})')
        split_info = splits[picked]
        names, lengths = list(split_info.get('filenames') or ()), list(split_info.get('shard_lengths') or ())
        if not names:
            raise FileNotFoundError(f'split {picked!r} of {root}/_info.json lists no shards')
        if len(lengths) != len(names):
            raise ValueError(f'{root}/_info.json: split {picked!r} gives no shard_lengths for its {len(names)} shards '
                             '(streaming needs them to give each rank its share; scripts/make_shards.py writes them)')
    keys = SampleKeys.parse(input_key, target_key or split_info.get('alt_label'))
    names_known = isinstance(info.get('classes'), list) and bool(info['classes'])
    if names_known:
        listed = [str(c) for c in info['classes']]
    else:
        count = int(num_classes or info.get('num_classes') or 0)
        if not count:
            raise ValueError(f'{root}/_info.json names no classes ("classes" or "num_classes"): pass --num-classes')
        listed = [str(i) for i in range(count)]
    base = root[len('file://'):] if root.startswith('file://') else root
    source = StreamSource(root, picked, [stream_io.join_url(base, n) for n in names],
                          np.asarray(lengths, dtype=np.int64), listed, names_known, keys)
    if classes is not None:
        apply_class_map(source, list(classes))
    return source


def apply_class_map(source: StreamSource, classes: List[str]) -> None:
    """Re-index ``source``'s named classes by ``classes``; its classes the map lacks are left out (skipped_classes)."""
    if not source.class_names_known:
        raise ValueError(f'{source.root}: these shards give class indices only (no "classes" in _info.json), so '
                         'class names cannot be mapped')
    index = {c: i for i, c in enumerate(classes)}
    source.skipped_classes = [c for c in source.classes if c not in index]
    source.remap = np.array([index.get(c, -1) for c in source.classes], dtype=np.int64)
    source.classes, source.class_to_idx = classes, dict(index)


# --- the epoch's layout ------------------------------------------------------------------------------------------

def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shard order, a permutation drawn from (seed, epoch)."""
    return np.random.default_rng([int(seed), int(epoch), _ORDER_TAG]).permutation(num_shards)


class Segment(NamedTuple):
    """``count`` consecutive samples of one shard: listed shard ``shard`` from sample ``skip`` on; ``copy``: the
    epoch's pass over the data they belong to (> 0 only where the epoch is longer than the split)."""
    shard: int
    skip: int
    count: int
    copy: int


def segments(lengths: np.ndarray, order: np.ndarray, lo: int, hi: int) -> List[Segment]:
    """The shard pieces of positions ``[lo, hi)`` of the sequence ``order`` concatenates (repeated cyclically)."""
    n = int(lengths.sum())
    ends = np.cumsum(lengths[order])
    out, p = [], lo
    while p < hi and n:
        q = p % n
        k = int(np.searchsorted(ends, q, side='right'))
        start = int(ends[k] - lengths[order[k]])
        count = min(int(ends[k]) - q, hi - p)
        out.append(Segment(int(order[k]), q - start, count, p // n))
        p += count
    return out


def rank_range(epoch_samples: int, rank: int, world_size: int) -> Tuple[int, int]:
    return rank * epoch_samples // world_size, (rank + 1) * epoch_samples // world_size


def rank_step_sizes(scheduled: Sequence[int], num_samples: int) -> Tuple[List[int], int]:
    """(images per step, extra samples read beyond the range) for a rank whose range holds ``num_samples`` and whose
    schedule says ``scheduled`` (summing to ceil(E/W), at most one more): one image fewer in the first of the
    largest steps, or, when every step holds one image, one sample read from the next range."""
    sizes, short = list(scheduled), sum(scheduled) - num_samples
    if short <= 0:
        return sizes, 0
    big = max(range(len(sizes)), key=lambda i: (sizes[i], -i))
    if short == 1 and sizes[big] > 1:
        sizes[big] -= 1
        return sizes, 0
    return sizes, short


@dataclass(frozen=True)
class StreamPart:
    """One DataLoader worker's stream of one epoch: positions ``[lo, hi)`` of the epoch sequence and, per step it
    builds, (step, first slot, images)."""
    index: int
    lo: int
    hi: int
    steps: Tuple[Tuple[int, int, int], ...]


def split_streams(sizes: Sequence[int], lo: int, num_streams: int) -> List[StreamPart]:
    """Stream ``j`` builds steps ``j, j+K, ...``; its positions follow stream ``j-1``'s, from ``lo`` on."""
    parts, start = [], lo
    for j in range(num_streams):
        steps, slot = [], 0
        for s in range(j, len(sizes), num_streams):
            steps.append((s, slot, sizes[s]))
            slot += sizes[s]
        parts.append(StreamPart(j, start, start + slot, tuple(steps)))
        start += slot
    return parts


# --- reading one stream -------------------------------------------------------------------------------------------

@dataclass
class Item:
    """A sample as a step takes it: its bytes and label, and its index in the split's listed order (the key of its
    augmentation draws) with its copy number."""
    sample: StreamSample
    index: int
    copy: int

    @property
    def key(self) -> str:
        return f'{self.index}#{self.copy}' if self.copy else f'{self.index}'


@dataclass
class Missing:
    """Samples a shard could not deliver: counted (and listed once) as bad files."""
    what: str
    count: int


class StreamReader:
    """The samples of one ``StreamPart`` from slot ``start`` on, shuffled in windows of ``window`` slots
    (``take`` / ``peek``); ``missing()`` hands out what failed since the last call. ``layout(lo, hi)`` gives the
    segments of positions [lo, hi); ``extent`` caps the positions read past the part to make up for failed shards
    (0: nothing is made up, the part just delivers fewer samples)."""

    def __init__(self, source: StreamSource, layout: Callable[[int, int], List[Segment]], part: StreamPart,
                 start: int, window: int, key: Tuple, extent: int):
        self.source, self.layout, self.part = source, layout, part
        self.window, self.key, self.extent = max(1, window), key, extent
        self.length = part.hi - part.lo
        self.slot = start  # the next slot ``take`` hands out
        first_window = start // self.window * self.window
        self._ahead: deque = deque()
        self._missing: List[Missing] = []
        self._out = self._shuffled(first_window, start - first_window)

    def take(self, k: int) -> List[Item]:
        self._fill(k)
        got = [self._ahead.popleft() for _ in range(min(k, len(self._ahead)))]
        self.slot += len(got)
        return got

    def peek(self, k: int) -> List[Item]:
        self._fill(k)
        return list(self._ahead)[:k]

    def missing(self) -> List[Missing]:
        out, self._missing = self._missing, []
        return out

    def close(self) -> None:
        self._out.close()

    def _fill(self, k: int) -> None:
        while len(self._ahead) < k:
            item = next(self._out, None)
            if item is None:
                return
            self._ahead.append(item)

    def _shuffled(self, first: int, drop: int) -> Iterator[Item]:
        raw = self._raw(self.part.lo + first)
        for w0 in range(first, self.length, self.window):
            size = min(self.window, self.length - w0)
            items = [x for _, x in zip(range(size), raw)]
            if self.window > 1:
                perm = np.random.default_rng([*self.key, w0 // self.window]).permutation(len(items))
                items = [items[i] for i in perm]
            yield from items[drop:]
            drop = 0

    def _raw(self, lo: int) -> Iterator[Item]:
        """Positions ``lo..`` in order; a shard's missing samples are made up from the positions after the part."""
        hi, end, owed = self.part.hi, self.part.hi, 0
        while True:
            for seg in self.layout(lo, hi):
                got, samples = 0, self.source.read(seg.shard, seg.skip)
                try:
                    for got, sample in enumerate(samples, 1):
                        yield Item(sample, int(self.source.offsets[seg.shard]) + seg.skip + got - 1, seg.copy)
                        if got == seg.count:
                            break
                except ShardFailed as e:
                    reason = f'{e.reason}; after {seg.skip + got} of {int(self.source.lengths[seg.shard])} samples'
                else:
                    reason = f'it ended after {seg.skip + got} of the {int(self.source.lengths[seg.shard])} samples ' \
                             '_info.json lists'
                finally:
                    samples.close()  # a shard read to its planned count: the connection goes now, not at GC
                if got < seg.count:
                    self._missing.append(Missing(f'{self.source.urls[seg.shard]}: {seg.count - got} samples not read '
                                                 f'({reason})', seg.count - got))
                    owed += seg.count - got
            if not owed or not self.extent:
                return
            if end - self.part.hi + owed > self.extent:
                raise DataSourceError(f'{self.source.root}: shards keep failing ({self._missing[-1].what}); '
                                      'stopped after reading past a whole epoch to make up for them')
            lo, hi, end, owed = end, end + owed, end + owed, 0


__all__ = ['DataSourceError', 'Item', 'Missing', 'Segment', 'StreamPart', 'StreamReader', 'StreamSource',
           'apply_class_map', 'open_stream', 'rank_range', 'rank_step_sizes', 'segments', 'shard_order',
           'split_streams', 'stream_settings', 'wants_stream']
