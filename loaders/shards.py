"""WebDataset tar shards as an indexable dataset, in the layout timm reads with ``--dataset wds/NAME``
(timm/imagenet-1k-wds and friends): ``ROOT/_info.json`` listing each split's shards, shards
``NAME-SPLIT-NNNN.tar`` whose samples are consecutive members ``KEY.jpg|png|webp`` + ``KEY.cls`` (the class
index as text), or, with timm's ``--target-key`` / a split's ``alt_label``, a field of ``KEY.json`` (SampleKeys).

Why random access rather than streaming (webdataset's shard shuffle + shuffle buffer): a NaFlex step
(NaViT arXiv:2307.06304, SigLIP 2 arXiv:2502.14786) is built from the schedule's dataset indices, so a dataset
that reads sample ``i`` keeps the schedule, the per-sample seeds and exact mid-epoch resume unchanged, gives
every sample once per epoch on every rank / worker split, and shuffles globally instead of within a buffer.
A sample costs one ``pread`` of its image member (offset + size from the index), which is no more than a
streaming reader pays and less than opening a file of an image folder.

The member index (shard, offset, size, target and name of each sample) is built once by reading only the tar
headers (ustar, pax and GNU long names parsed here, ~5x faster than ``tarfile``, which takes any other header;
a shard cut short keeps its samples before the cut) and cached in a cache directory, never in the data folder:
``cache_dir``, else ``$NAFLEX_CACHE_DIR``, else ``$XDG_CACHE_HOME/naflex`` or ``~/.cache/naflex``. The cache is
keyed by every shard's path, size and mtime. Shard files are opened lazily in
the process that reads them (so a forked DataLoader worker never uses a descriptor of its parent).

A sample is named ``SHARD.tar:MEMBER`` wherever a path is expected (``path(i)``, bad-file reports); that name
also reads the member's bytes (``ShardMember.read_bytes``), which is all loaders.decode needs.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import tarfile
import warnings
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from .dataset import _SPLIT_ALIASES, IMG_EXTENSIONS, ImageFolderDataset, remap_targets, write_cache_file

INFO_FILES = ('_info.json', 'info.json')  # the names timm's wds reader looks for
INDEX_VERSION = 2
# Image member preference within a sample: timm's default input key 'jpg;png;webp', then the other formats.
IMAGE_EXTS = ('jpg', 'png', 'webp') + tuple(e[1:] for e in IMG_EXTENSIONS if e[1:] not in ('jpg', 'png', 'webp'))
_RANGE = re.compile(r'^(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?$')


# --- shard lists: _info.json, split names, brace patterns ------------------------------------------------------

def expand_braces(pattern: str) -> List[str]:
    """Brace expansion as webdataset writes shard lists: ``a-{0000..0002}.tar`` -> a-0000.tar, a-0001.tar,
    a-0002.tar (zero padding kept, optional step ``{0..10..2}``), ``{x,y}`` alternatives, nesting, and ``::``
    between several patterns. Braces that expand to nothing (``{}``, ``{abc}``) stay as written."""
    return [name for part in pattern.split('::') for name in _expand(part)]


def _expand(s: str) -> List[str]:
    start = s.find('{')
    end = _closing_brace(s, start) if start >= 0 else -1
    if end < 0:
        return [s]
    head, body, tails = s[:start], s[start + 1:end], _expand(s[end + 1:])
    m = _RANGE.match(body)
    alternatives = _top_level_split(body)
    if m:
        items = _range_items(*m.groups())
    elif len(alternatives) > 1:
        items = [x for alt in alternatives for x in _expand(alt)]
    else:
        items = ['{' + body + '}']
    return [head + item + tail for item in items for tail in tails]


def _closing_brace(s: str, start: int) -> int:
    depth = 0
    for i in range(start, len(s)):
        depth += {'{': 1, '}': -1}.get(s[i], 0)
        if depth == 0:
            return i
    return -1


def _top_level_split(body: str) -> List[str]:
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(body):
        depth += {'{': 1, '}': -1}.get(ch, 0)
        if ch == ',' and depth == 0:
            parts.append(body[last:i])
            last = i + 1
    return parts + [body[last:]]


def _range_items(first: str, last: str, step: Optional[str]) -> List[str]:
    lo, hi, inc = int(first), int(last), int(step or 1) or 1
    # zero padding as in bash / braceexpand: when an end is written with a leading zero
    padded = any(len(x.lstrip('-')) > 1 and x.lstrip('-').startswith('0') for x in (first, last))
    width = max(len(first), len(last)) if padded else 0
    values = range(lo, hi + 1, inc) if lo <= hi else range(lo, hi - 1, -inc)
    return [str(v).zfill(width) for v in values]


def is_shard_pattern(split: str) -> bool:
    """Whether a split is a shard list (``NAME-train-{0000..0127}.tar``, optionally ``|NUM_SAMPLES``) rather
    than a split name: timm's rule ('tar' or '..' in it), narrowed to '.tar', '..' or a brace."""
    return bool(split) and not split.endswith('.txt') and any(t in split for t in ('.tar', '..', '{'))


def load_info(root) -> dict:
    """The dataset's ``_info.json`` (or ``info.json``), ``{}`` when there is none."""
    for name in INFO_FILES:
        path = Path(root) / name
        if path.is_file():
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f'{path} is not readable JSON: {e}') from None
            if not isinstance(info, dict):
                raise ValueError(f'{path} must hold a JSON object with "splits"')
            return info
    return {}


def split_candidates(split: str) -> List[str]:
    """``split`` first, then the names that stand in for it (validation / val / valid / eval ...)."""
    alts = [alt for group in _SPLIT_ALIASES if split in group for alt in group if alt != split]
    return [split] + alts


def split_shards(root, split: str, info: dict) -> Tuple[str, List[str]]:
    """(split name, shard paths) for a split name of ``_info.json``, a brace pattern, or, without
    ``_info.json``, the ``.tar`` files of ``root`` whose name has the split as a '-'/'_'/'.'-separated word."""
    root = Path(root)
    if is_shard_pattern(split):
        pattern = split.split('|', 1)[0]  # timm's optional '|NUM_SAMPLES': we count the samples ourselves
        return pattern, [os.path.join(root, n) for n in expand_braces(pattern)]
    splits = info.get('splits') or {}
    if info:
        for name in split_candidates(split):
            if name in splits:
                return name, [os.path.join(root, n) for n in splits[name].get('filenames', ())]
        raise FileNotFoundError(f'split {split!r} is not in {root}/_info.json (splits: {", ".join(splits) or "none"})')
    tars = sorted(n for n in os.listdir(root) if n.endswith('.tar'))
    for name in split_candidates(split):
        found = [n for n in tars if name in re.split(r'[-_.]', n[:-4])]
        if found:
            return name, [str(root / n) for n in found]
    raise FileNotFoundError(f'no .tar shards of split {split!r} in {root} (and no _info.json)')


def dataset_kind(dataset: str) -> str:
    """timm's ``--dataset TYPE/NAME``: 'wds' for tar shards, '' for an image folder (any name without a type,
    or 'folder'/'imagefolder'), 'hfds' for Hugging Face datasets, or the unsupported type itself (torch, tfds, ...)."""
    kind, sep, _ = (dataset or '').partition('/')
    kind = kind.lower() if sep else ''
    return '' if kind in ('folder', 'imagefolder') else kind


def is_shard_source(root, split: str, dataset: str = '') -> bool:
    """Whether ``root``/``split`` are to be read as tar shards: ``--dataset wds/NAME`` says so; without it, only
    where that is unambiguous: a brace pattern as split, or no folder for the split but ``_info.json`` or
    ``.tar`` files in ``root``."""
    if dataset_kind(dataset) == 'wds':
        return True
    root = Path(root)
    if not root.is_dir() or not split or split.endswith('.txt'):
        return False
    if is_shard_pattern(split):
        return True
    if any((root / s).is_dir() for s in split_candidates(split)):
        return False
    return any((root / n).is_file() for n in INFO_FILES) or any(n.endswith('.tar') for n in os.listdir(root))


# --- the member index ------------------------------------------------------------------------------------------

@dataclass
class ShardIndex:
    """One row per sample: its shard, the offset and size of its image member, its class, its member name."""
    shard: np.ndarray                   # int32 position in the shard list
    offset: np.ndarray                  # int64 byte offset of the image member's data
    size: np.ndarray                    # int64 its size
    target: np.ndarray                  # int64 the .cls value
    names: np.ndarray                   # uint8 blob of the image member names
    name_offsets: np.ndarray            # int64 [n + 1]
    problems: List[str] = field(default_factory=list)
    cut_short: List[str] = field(default_factory=list)  # the problems that are shards ending inside a member

    def __len__(self) -> int:
        return len(self.target)

    def name(self, i: int) -> str:
        return self.names[self.name_offsets[i]:self.name_offsets[i + 1]].tobytes().decode('utf-8')


def _split_key(member_name: str) -> Tuple[str, str]:
    """webdataset's grouping rule: the key is the path up to the first '.' of the file name, the rest is the
    (lower-cased) extension: ``a/n0144_12.jpg`` -> ('a/n0144_12', 'jpg'), ``x.seg.png`` -> ('x', 'seg.png')."""
    folder, _, base = member_name.rpartition('/')
    stem, _, ext = base.partition('.')
    return (folder + '/' + stem if folder else stem), ext.lower()


class _ShardCut(Exception):
    """The shard ends inside a header or a member: the samples before it are kept."""


class _Unsupported(Exception):
    """A header the fast scanner leaves to ``tarfile`` (global pax headers, sparse files, base-256 sizes...)."""


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_COMPRESSED_MAGIC = (b'\x1f\x8b\x08', b'BZh', b'\xfd7z', b'(\xb5/')  # gzip, bzip2, xz, zstd


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:
        raise _Unsupported('base-256 number')
    text = field.split(b'\0', 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise _Unsupported(f'bad number {field!r}') from None


def _checksum_ok(header: bytes) -> bool:
    """The ustar checksum: the byte sum of the header with its own 8-byte field read as spaces. Adler-32's low
    half is (1 + byte sum) mod 65521, computed in C: 20x faster than ``sum(header)``; a congruence mod 65521
    instead of equality still rejects a non-header block but for a 1-in-65521 chance."""
    stored = _octal(header[148:156])
    byte_sum_mod = (zlib.adler32(header) & 0xFFFF) - 1
    return (stored - byte_sum_mod + sum(header[148:156]) - 8 * 32) % 65521 == 0


def _pax_records(data: bytes) -> dict:
    """``'LEN key=value\\n'`` records of a pax extended header (POSIX.1-2001)."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b'\0':
        length = int(data[pos:data.index(b' ', pos)])
        key, _, value = data[data.index(b' ', pos) + 1:pos + length - 1].partition(b'=')
        out[key.decode('utf-8')] = value.decode('utf-8', 'surrogateescape')
        pos += length
    return out


def tar_members(read: Callable[[int, int], bytes], end: Optional[int] = None):
    """Yields (name, data offset, size) of every regular member of an uncompressed tar, reading only the 512-byte
    headers (ustar, plus pax 'x' and GNU 'L' long-name records) through ``read(offset, size)``; ``tarfile`` parses
    every field of every header, ~10x slower. The offsets asked for never decrease, so a stream that reads forward
    (loaders.stream_io) serves them as well as ``pread`` does. ``end``: the file size, when known; without it, the
    archive ends at the end-of-archive marker or where ``read`` returns nothing at a header."""
    offset, pending = 0, {}
    while end is None or offset + _BLOCK <= end:
        header = read(offset, _BLOCK)
        if not header and end is None:
            return  # a stream without the end-of-archive marker, as tarfile accepts it
        if len(header) < _BLOCK:
            raise _ShardCut(f'a header is cut short at byte {offset}')
        if header == _ZERO_BLOCK:
            return  # end-of-archive marker
        if not _checksum_ok(header):
            raise _Unsupported(f'header checksum at byte {offset}')
        kind, size = header[156:157], _octal(header[124:136])
        data_offset = offset + _BLOCK
        if kind in (b'x', b'L'):
            data = read(data_offset, size)
            if len(data) < size:
                raise _ShardCut(f'an extended header is cut short at byte {data_offset}')
            pending.update(_pax_records(data) if kind == b'x' else {'path': data.rstrip(b'\0').decode('utf-8')})
        elif kind in (b'0', b'\0', b'7'):
            size = int(pending.get('size', size))
            name = pending.get('path') or _ustar_name(header)
            if end is not None and data_offset + size > end:
                raise _ShardCut(f'member {name!r} runs past the end of the file')
            yield name, data_offset, size
            pending = {}
        elif kind in (b'1', b'2', b'3', b'4', b'5', b'6', b'K'):
            pending = {}  # links, devices, folders: no data of interest
        else:
            raise _Unsupported(f'header type {kind!r}')
        offset = data_offset + -(-size // _BLOCK) * _BLOCK
    if offset < end and any(read(offset, _BLOCK)):
        raise _ShardCut(f'a header is cut short at byte {offset}')


def _scan_headers(path: str, fd: int, file_size: int):
    """tar_members of a local shard, by ``pread``."""
    return tar_members(lambda offset, size: os.pread(fd, size, offset), file_size)


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b'\0', 1)[0]
    if header[257:262] == b'ustar':
        prefix = header[345:500].split(b'\0', 1)[0]
        name = prefix + b'/' + name if prefix else name
    return name.decode('utf-8', 'surrogateescape')


def _tarfile_members(path: str, fd: int, file_size: int):
    """What _scan_headers yields, by ``tarfile`` (every format it knows)."""
    try:
        with tarfile.open(path, mode='r:') as tf:
            for m in tf:
                if m.isfile():
                    if m.offset_data + m.size > file_size:
                        raise _ShardCut(f'member {m.name!r} runs past the end of the file')
                    yield m.name, m.offset_data, m.size
    except (tarfile.ReadError, EOFError) as e:
        raise _ShardCut(str(e)) from None


@dataclass(frozen=True)
class SampleKeys:
    """Which members make a sample, as timm's ``--input-key`` / ``--target-key`` name them: the image is the first of
    ``image`` a sample has; the label is the ``.cls`` text, or with ``target`` that field of the ``.json`` member
    (``a.b`` for a nested one; an integer class index, a negative one skipping the sample as timm does)."""
    image: Tuple[str, ...] = IMAGE_EXTS
    target: Optional[str] = None

    @classmethod
    def parse(cls, input_key: Optional[str] = None, target_key: Optional[str] = None) -> 'SampleKeys':
        """From timm's flag values: ``input_key`` 'jpg;png;webp' (';'-separated, first present wins)."""
        image = tuple(k.strip().lstrip('.') for k in (input_key or '').split(';') if k.strip())
        return cls(image or IMAGE_EXTS, target_key or None)


def _json_label(data: bytes, field: str) -> Tuple[Optional[int], str]:
    """(class index, '') from ``field`` of a ``.json`` member, or (None, why it has none)."""
    try:
        value = json.loads(data)
    except ValueError:
        return None, 'a .json member that is not valid JSON'
    for part in field.split('.'):
        if not isinstance(value, dict) or part not in value:
            keys = sorted(value) if isinstance(value, dict) else []
            return None, f'no field {field!r} in its .json (fields: {", ".join(map(str, keys[:8]))})'
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, int):
        return None, f'{value!r} in .json field {field!r}, not a class index (multi-label targets are not read)'
    return (value, '') if value >= 0 else (None, f'a skipped label ({value} in .json field {field!r})')


def _group_samples(members, fd: int, shard_name: str, samples: list, problems: list,
                   keys: SampleKeys = SampleKeys()) -> None:
    """Groups consecutive members by key into samples (offset, size, target, image member name)."""
    key, found = None, {}
    try:
        for name, offset, size in members:
            k, ext = _split_key(name)
            if k != key:
                _add_sample(key, found, fd, shard_name, samples, problems, keys)
                key, found = k, {}
            found[ext] = (name, offset, size)
    finally:  # also where the shard is cut short: the sample before the cut is whole
        _add_sample(key, found, fd, shard_name, samples, problems, keys)


def _add_sample(key, found: dict, fd: int, shard_name: str, samples: list, problems: list, keys: SampleKeys) -> None:
    if key is None:
        return
    image, target, why = sample_label(found, keys, lambda entry, limit: os.pread(fd, min(entry[2], limit), entry[1]))
    if image is None:
        problems.append(f'{shard_name}: sample {key!r} {why}')
        return
    samples.append((image[1], image[2], target, image[0]))


def sample_label(found: dict, keys: SampleKeys,
                 read: Callable[[tuple, int], bytes]) -> Tuple[Optional[tuple], int, str]:
    """The rules that make members a sample, for the index and for streams (loaders.stream_io): ``found`` maps each
    extension of one key to its member's entry ``(name, offset, size, ...)``; ``read(entry, limit)`` gives at most
    ``limit`` bytes of that member. Returns (the image member's entry, class index, '') or (None, -1, why it is
    not a sample)."""
    image = next((found[e] for e in keys.image if e in found), None)
    label = label_ext(keys)
    if image is None or label not in found:
        return None, -1, 'has no ' + ('image member' if image is None else f'.{label}')
    if keys.target:
        target, why = _json_label(read(found[label], 1 << 20), keys.target)
    else:
        text = read(found[label], 32)
        target = int(text) if text.strip().isdigit() else None
        why = f'no valid class index in its .cls ({text[:20]!r})'
    return (None, -1, f'has {why}') if target is None else (image, target, '')


def label_ext(keys: SampleKeys) -> str:
    """The member that holds a sample's label: ``.cls``, or ``.json`` with a target field."""
    return 'json' if keys.target else 'cls'


def index_shard(path: str, keys: SampleKeys = SampleKeys()) -> Tuple[List[tuple], List[str], Optional[str]]:
    """(samples as (offset, size, target, image member name), problems, cut) of one uncompressed tar shard.

    Reads the member headers (seeking over the data) and the small label members (``keys``: which ones). A shard
    cut short keeps the samples before the cut; ``cut`` is then the problem that says where (None for a whole
    shard): how many samples followed is unknown. A sample without an image or a class index is left out.
    """
    name = os.path.basename(path)
    with open(path, 'rb', buffering=0) as f:
        fd, file_size = f.fileno(), os.fstat(f.fileno()).st_size
        if os.pread(fd, 3, 0) in _COMPRESSED_MAGIC:
            raise ValueError(f'{path}: compressed shards cannot be read by offset; decompress them to .tar')
        for scan in (_scan_headers, _tarfile_members):
            samples, problems, cut = [], [], None
            try:
                _group_samples(scan(path, fd, file_size), fd, name, samples, problems, keys)
                break
            except _Unsupported:
                continue  # rescan the whole shard with tarfile
            except _ShardCut as e:
                if not samples:
                    raise ValueError(f'{path} is not a readable tar shard ({e})') from None
                cut = f'{name}: cut short after {len(samples)} samples ({e})'
                problems.append(cut)
                break
    return samples, problems, cut


def build_index(shards: Sequence[str], num_threads: int = 8, keys: SampleKeys = SampleKeys()) -> ShardIndex:
    """The index of all ``shards`` (in order). Threads overlap the header reads of several shards, which is
    what matters on network storage; on local disk the header parsing dominates and they change little."""
    with ThreadPoolExecutor(max_workers=max(1, min(num_threads, len(shards)))) as pool:
        per_shard = list(pool.map(lambda s: index_shard(s, keys), shards))
    rows = [(s, *sample) for s, (samples, _, _) in enumerate(per_shard) for sample in samples]
    encoded = [r[4].encode('utf-8') for r in rows]
    name_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=name_offsets[1:])
    return ShardIndex(
        shard=np.fromiter((r[0] for r in rows), np.int32, len(rows)),
        offset=np.fromiter((r[1] for r in rows), np.int64, len(rows)),
        size=np.fromiter((r[2] for r in rows), np.int64, len(rows)),
        target=np.fromiter((r[3] for r in rows), np.int64, len(rows)),
        names=np.frombuffer(b''.join(encoded), dtype=np.uint8).copy(),
        name_offsets=name_offsets,
        problems=[p for _, problems, _ in per_shard for p in problems],
        cut_short=[cut for _, _, cut in per_shard if cut])


def default_cache_dir() -> Path:
    """``$NAFLEX_CACHE_DIR``, else ``$XDG_CACHE_HOME/naflex``, else ``~/.cache/naflex``."""
    if os.environ.get('NAFLEX_CACHE_DIR'):
        return Path(os.environ['NAFLEX_CACHE_DIR'])
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'naflex'


def _cache_file(shards: Sequence[str], cache_dir: Path, keys: SampleKeys) -> Path:
    stats = []
    for s in shards:
        try:
            st = os.stat(s)
        except FileNotFoundError:
            raise FileNotFoundError(f'shard {s} not found') from None
        stats.append((os.path.abspath(s), st.st_size, st.st_mtime_ns))
    extra = () if keys == SampleKeys() else (keys.image, keys.target)  # the default keeps the caches it wrote
    key = hashlib.sha1(repr((INDEX_VERSION, stats, *extra)).encode()).hexdigest()[:20]
    return cache_dir / f'naflex_shards_{key}.npz'


def load_index(shards: Sequence[str], cache_dir=None, keys: SampleKeys = SampleKeys()) -> ShardIndex:
    """The cached index of ``shards`` if it is there and current, else a new one (then cached; a cache folder
    that cannot be written only costs the rebuild next time)."""
    cache = _cache_file(shards, Path(cache_dir) if cache_dir else default_cache_dir(), keys)
    index = _read_cached(cache, len(shards)) if cache.is_file() else None
    if index is not None:
        return index
    index = build_index(shards, keys=keys)
    problems, cut_short = (np.frombuffer(json.dumps(x).encode('utf-8'), dtype=np.uint8)
                           for x in (index.problems, index.cut_short))
    try:  # atomic: ranks that build the same index concurrently never see half a file
        write_cache_file(cache, lambda f: np.savez(
            f, shard=index.shard, offset=index.offset, size=index.size, target=index.target, names=index.names,
            name_offsets=index.name_offsets, problems=problems, cut_short=cut_short))
    except OSError as e:
        warnings.warn(f'shard index not cached ({e}); it is rebuilt on the next start')
    return index


def _read_cached(cache: Path, num_shards: int) -> Optional[ShardIndex]:
    """The index in ``cache``, or None when it cannot be read or does not fit (it is then rebuilt)."""
    try:
        with np.load(cache, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ('shard', 'offset', 'size', 'target', 'names', 'name_offsets')}
            problems, cut_short = (json.loads(z[k].tobytes().decode('utf-8')) for k in ('problems', 'cut_short'))
    except Exception:  # a torn or foreign file (zipfile, numpy and json errors alike): rebuild
        return None
    n = len(arrays['target'])
    fits = all(len(arrays[k]) == n for k in ('shard', 'offset', 'size')) and len(arrays['name_offsets']) == n + 1
    if not fits or (n and not 0 <= int(arrays['shard'].max()) < num_shards):
        return None
    return ShardIndex(**arrays, problems=problems, cut_short=cut_short)


# --- reading members -------------------------------------------------------------------------------------------

class _OpenShards:
    """The read-only descriptors of the shards this process reads: opened on first use, the least recently used
    closed beyond a cap (a quarter of the open-file limit). Tied to the process id, so a forked DataLoader worker
    opens its own instead of sharing its parent's."""

    def __init__(self):
        self._pid = None
        self._fds: 'OrderedDict[str, int]' = OrderedDict()
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.capacity = max(8, min(4096, (soft if soft > 0 else 1024) // 4))

    def read(self, path: str, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():
            self._forget_inherited()
        fd = self._fds.get(path)
        if fd is None:
            fd = self._open(path)
        else:
            self._fds.move_to_end(path)
        data = os.pread(fd, size, offset)  # one system call; no shared file position to race on
        if len(data) != size:
            raise EOFError(f'member cut short: {len(data)} of {size} bytes at offset {offset}')
        return data

    def _open(self, path: str) -> int:
        while len(self._fds) >= self.capacity:
            os.close(self._fds.popitem(last=False)[1])
        fd = self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, 'O_CLOEXEC', 0))
        return fd

    def _forget_inherited(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)  # this process's copy; the parent's descriptor stays open
            except OSError:
                pass
        self._fds.clear()
        self._pid = os.getpid()


_open_shards = _OpenShards()


class ShardMember(str):
    """``SHARD.tar:MEMBER``: the name a sample has in messages and bad-file lists, which also reads the member's
    bytes. Pickled (e.g. in a batch's bad-file list) it is just that name."""

    def __new__(cls, shard: str, member: str, offset: int, size: int):
        self = super().__new__(cls, f'{shard}:{member}')
        self.shard, self.offset, self.size = shard, offset, size
        return self

    def read_bytes(self) -> bytes:
        return _open_shards.read(self.shard, self.offset, self.size)

    def __reduce__(self):
        return str, (str(self),)


class ShardDataset:
    """Tar shards of one split, with ImageFolderDataset's interface: ``len(ds)``, ``ds.path(i)`` (a
    ``ShardMember``), ``ds.target(i)``, ``ds.targets``, ``ds.classes``, ``ds.class_to_idx``, ``ds[i]``.

    ``split``: a split of ``_info.json`` ('val' finds 'validation' and the other way round), a brace pattern
    (``NAME-train-{0000..0009}.tar``, relative to ``root``), or without ``_info.json`` the split word in the shard
    names. Class names come from ``_info.json``'s ``"classes"`` when present, else they are the indices ('0', '1',
    ...; ``class_names_known`` False). ``classes`` (a class map) re-indexes named classes by it; every class the
    split holds must be in it. ``problems``: the samples the index leaves out, reported once as a warning;
    ``cut_short``: those of them that are shards ending inside a member (loaders.eval_loader.require_whole).
    """

    def __init__(self, root, split: str = 'train', *, classes=None, cache_dir=None, input_key: Optional[str] = None,
                 target_key: Optional[str] = None):
        self.root = self.base = Path(root)
        info = load_info(self.root)
        self.split, self.shards = split_shards(self.root, split or 'train', info)
        if not self.shards:
            raise FileNotFoundError(f'split {split!r} of {self.root} lists no shards')
        split_info = (info.get('splits') or {}).get(self.split) or {}
        # timm: without a target key, a split's alt_label (a field of KEY.json) gives its labels
        self.keys = SampleKeys.parse(input_key, target_key or split_info.get('alt_label'))
        self._index = load_index(self.shards, cache_dir, self.keys)
        self.targets = self._index.target
        self.problems = self._index.problems
        self.cut_short = self._index.cut_short  # shards that end inside a member (evaluation refuses the split)
        if self.problems:
            warnings.warn(f'{len(self.problems)} problem(s) indexing {self.root} split {self.split!r}, samples '
                          f'left out: {"; ".join(self.problems[:3])}' + (' ...' if len(self.problems) > 3 else ''))
        self.classes, self.class_names_known = _class_names(info, self.targets, self.root)
        self.skipped_classes = []
        if classes is not None:
            self._apply_class_map(list(classes))
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self._check_info(info)

    def _apply_class_map(self, classes: List[str]) -> None:
        if not self.class_names_known:
            raise ValueError(f'{self.root}: these shards give class indices only (no "classes" in _info.json), so '
                             'class names cannot be mapped')
        self.targets = remap_targets(self.targets, self.classes, classes, f'{self.root} split {self.split!r}')
        self.classes = classes

    def _check_info(self, info: dict) -> None:
        """Warns when the shards hold another number of samples than ``_info.json`` says (timm trusts the file)."""
        split_info = (info.get('splits') or {}).get(self.split) or {}
        expected = split_info.get('num_samples')
        if expected is not None and int(expected) != len(self):
            warnings.warn(f'{self.root} split {self.split!r}: _info.json says {expected} samples, the shards hold '
                          f'{len(self)} readable ones')

    def path(self, i: int) -> ShardMember:
        ix = self._index
        return ShardMember(self.shards[ix.shard[i]], ix.name(i), int(ix.offset[i]), int(ix.size[i]))

    # The rest of the interface is ImageFolderDataset's, on the same attributes (targets, classes, path).
    __len__ = ImageFolderDataset.__len__
    target = ImageFolderDataset.target
    __getitem__ = ImageFolderDataset.__getitem__
    num_classes = ImageFolderDataset.num_classes


def _class_names(info: dict, targets: np.ndarray, root) -> Tuple[List[str], bool]:
    num_seen = int(targets.max()) + 1 if len(targets) else 0
    names = info.get('classes')
    if isinstance(names, list) and names:
        if num_seen > len(names):
            raise ValueError(f'{root}: a .cls index reaches {num_seen - 1} but _info.json names {len(names)} classes')
        return [str(c) for c in names], True
    num_classes = max(num_seen, int(info.get('num_classes') or 0))
    return [str(i) for i in range(num_classes)], False


def classes_compatible(train_ds, val_ds) -> bool:
    """Whether ``val_ds``'s labels mean what ``train_ds``'s do: the same class names, or, for shards whose
    classes are bare indices, no index beyond the training set's."""
    if getattr(train_ds, 'class_names_known', True) or getattr(val_ds, 'class_names_known', True):
        return list(val_ds.classes) == list(train_ds.classes)
    return len(val_ds.classes) <= len(train_ds.classes)


__all__ = ['SampleKeys', 'ShardDataset', 'ShardIndex', 'ShardMember', 'build_index', 'classes_compatible',
           'dataset_kind',
           'default_cache_dir', 'expand_braces', 'index_shard', 'is_shard_pattern', 'is_shard_source', 'load_index',
           'load_info', 'split_shards']
