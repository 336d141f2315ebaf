"""Where each sample of a streamed shard starts, remembered from the last time it was streamed.

Why: a DataLoader worker's share of an epoch (and a resumed epoch) mostly starts inside a shard. Without offsets the
stream has to read that shard from byte 0 and drop the samples before the start: about half a shard per worker per
epoch, which for many ranks and workers adds up to a sizeable part of the epoch's own traffic. The tar reader sees
every member's header go by, so a shard streamed once tells where each of its samples starts; with that, a later
start inside the shard opens the stream at the sample's byte (an HTTP Range request, a seek) instead.

One small JSON file per shard under ``<cache dir>/stream_offsets`` (the shard index's cache dir,
loaders.shards.default_cache_dir: ``$NAFLEX_CACHE_DIR`` ...), named by a hash of the URL and the sample keys (they
decide which members make a sample, so they decide the numbering). It holds the offsets of the samples ``0..n-1``
seen so far (a prefix of the shard: workers that read only a shard's head still add what they saw), each sample's
key, and the validator the source gave (ETag, Last-Modified, size; a local file's size and mtime). A start at a
remembered offset is taken only when the source gives the same validator again and the member found there has the
remembered key; otherwise the shard is read from its start as before and its offsets written again. Files are
replaced atomically (a temporary file renamed over the old one), so many workers writing at once leave one whole
file, never a torn one; a file that cannot be read or written only costs the savings.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import List, Optional, Tuple

from .dataset import write_cache_file
from .shards import SampleKeys, default_cache_dir

_VERSION = 1


class ShardOffsets:
    """The remembered sample offsets of one shard (``url`` read with ``keys``): ``offsets[i]`` is the byte where
    the tar headers of sample ``i`` start, ``keys[i]`` its key, both for the samples ``0..len-1``."""

    def __init__(self, url: str, keys: SampleKeys, cache_dir=None):
        digest = hashlib.sha1(repr((_VERSION, url, keys.image, keys.target)).encode()).hexdigest()[:24]
        self.url = url
        self.path = Path(cache_dir or default_cache_dir()) / 'stream_offsets' / f'{digest}.json'
        self.validator, self.offsets, self.keys = self._read()

    def _read(self) -> Tuple[Optional[dict], List[int], List[str]]:
        try:
            data = json.loads(self.path.read_text())
            offsets, keys, validator = data['offsets'], data['keys'], data['validator']
            ok = (data.get('version') == _VERSION and data.get('url') == self.url and len(offsets) == len(keys)
                  and all(isinstance(x, int) and x >= 0 for x in offsets) and isinstance(validator, dict))
        except (OSError, ValueError, KeyError, TypeError):  # none yet, or a foreign or torn file: start cold
            ok = False
        return (validator, offsets, keys) if ok else (None, [], [])

    def start(self, skip: int) -> Tuple[int, int]:
        """(byte, sample) to open the stream at for a read that passes over ``skip`` samples: the latest remembered
        sample at or before ``skip``, or (0, 0)."""
        k = min(skip, len(self.offsets) - 1)
        return (self.offsets[k], k) if k > 0 else (0, 0)

    def stop(self, sample: int) -> Optional[int]:
        """The byte where sample ``sample`` starts (a read that ends before it need not go further), or None."""
        return self.offsets[sample] if 0 < sample < len(self.offsets) else None

    def forget(self) -> None:
        """The remembered offsets did not fit the shard: dropped, so it is read from its start and remembered anew."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        self.validator, self.offsets, self.keys = None, [], []

    def save(self, validator: Optional[dict], first: int, offsets: List[int], keys: List[str]) -> None:
        """Remember ``offsets`` / ``keys`` of samples ``first..`` read under ``validator`` (the remembered ones
        before ``first`` kept), when that tells more than the file holds now. No validator: nothing is written."""
        if not validator or first > len(self.offsets) or (first and not same_object(validator, self.validator)):
            return
        offsets, keys = self.offsets[:first] + offsets, self.keys[:first] + keys
        on_disk, known, _ = self._read()  # another worker may have written as much meanwhile
        if len(offsets) <= len(known) and same_object(on_disk, validator):
            return
        text = json.dumps({'version': _VERSION, 'url': self.url, 'validator': validator, 'offsets': offsets,
                           'keys': keys}, separators=(',', ':')).encode()
        try:
            write_cache_file(self.path, lambda f: f.write(text))
        except Exception:  # a read-only cache, an interpreter shutting down: the next start reads the head again
            return
        self.validator, self.offsets, self.keys = validator, offsets, keys


def same_object(a: Optional[dict], b: Optional[dict]) -> bool:
    """Whether two validators (``{'etag': ..., 'last_modified': ..., 'size': ...}``, a local file's size and
    mtime, an fsspec back end's fields) describe the same object: they share a field, and every field both give
    agrees (a server may leave a header out of a Range response; what it does say must match)."""
    common = [k for k in (a or {}) if k in (b or {})]
    return bool(common) and all(a[k] == b[k] for k in common)


def enabled() -> bool:
    """``NAFLEX_STREAM_OFFSETS=0`` turns the offsets cache off (every mid-shard start reads the shard's head)."""
    return os.environ.get('NAFLEX_STREAM_OFFSETS', '1') != '0'


__all__ = ['ShardOffsets', 'enabled', 'same_object']
