"""Hugging Face datasets streamed, as timm reads them with ``--dataset hfids/NAME``: the split's parquet files are the
shards of loaders.stream, so the epoch's shard order, the rank x worker shares (every sample once per epoch), the
sample shuffle window, the steps and exact resume are those of streamed tar shards.

``NAME`` is a Hub dataset id or a local folder in the Hub's layout (``data/<split>-*.parquet``, read offline).
``datasets.load_dataset(..., streaming=True)`` resolves the split's files and features (its IterableDataset's
``n_shards`` files, in its order); the rows of each file are counted from its parquet footer (a few KB read per
file, no image data; cached for files on the Hub), and a file is read with pyarrow one row group at a time, the
image column as encoded bytes (decoded by the loader like a file), the label column as the class index (its
``ClassLabel`` names the classes).
Reading from sample ``skip`` of a file passes over whole row groups without reading them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Iterator, List, Optional

import numpy as np

from .dataset import write_cache_file
from .hfds import first_line, resolve_split
from .shards import default_cache_dir
from .stream import StreamSource, apply_class_map
from .stream_io import ShardFailed, StreamSample


def _open(path: str):
    if '://' in path:
        import fsspec  # a datasets dependency; hf:// is huggingface_hub's file system
        return fsspec.open(path, 'rb').open()
    return open(path, 'rb')


def _num_rows(path: str) -> int:
    import pyarrow.parquet as pq
    with _open(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def row_counts(files: List[str]) -> List[int]:
    """The rows of each parquet file, from its footer. Files on the Hub are named at a revision, so their counts are
    kept in the cache folder (loaders.shards.default_cache_dir): a large split's footers (1,024 requests for
    ImageNet's) are read once, not by every rank of every run."""
    remote = all('://' in f for f in files)
    key = hashlib.sha1('\n'.join(files).encode()).hexdigest()[:20]
    cache = default_cache_dir() / f'naflex_parquet_rows_{key}.json'
    if remote and cache.is_file():
        with contextlib.suppress(OSError, ValueError):
            counts = json.loads(cache.read_text())
            if isinstance(counts, list) and len(counts) == len(files):
                return [int(c) for c in counts]
    counts = [_num_rows(f) for f in files]
    if remote:
        with contextlib.suppress(OSError):  # not cached: read again next time
            write_cache_file(cache, lambda f: f.write(json.dumps(counts).encode()))
    return counts


def open_hfids(name: str, split: str = 'train', *, cache_dir=None, classes=None, input_key: Optional[str] = None,
               target_key: Optional[str] = None) -> StreamSource:
    """The split as a StreamSource over its parquet files. FileNotFoundError / ValueError name what is missing."""
    import datasets
    input_key, target_key = input_key or 'image', target_key or 'label'
    source, builder, picked = resolve_split(name, split, str(cache_dir) if cache_dir else None)
    files = [str(f) for f in (builder.config.data_files or {}).get(picked, ())]
    ids = datasets.load_dataset(source, split=picked, streaming=True, cache_dir=str(cache_dir) if cache_dir else None)
    if not files or ids.n_shards != len(files):
        raise ValueError(f'hfids/{name} split {picked!r}: its {ids.n_shards} shards are not parquet files of its '
                         'data/ folder; stream it with --dataset hfds/NAME (map-style) instead')
    features = ids.features or {}
    missing = [k for k in (input_key, target_key) if k not in features]
    if missing:
        raise ValueError(f'hfids/{name} split {picked!r} has no column {", ".join(map(repr, missing))} '
                         f'(columns: {", ".join(features)}); choose with --input-key / --target-key')
    import pyarrow as pa
    try:
        lengths = row_counts(files)
    except (OSError, pa.ArrowException) as e:
        raise FileNotFoundError(f'hfids/{name}: cannot read the footer of its parquet files ({first_line(e)})') \
            from None
    label = features[target_key]
    if isinstance(label, datasets.ClassLabel):
        names, known = list(label.names), True
    else:
        raise ValueError(f'hfids/{name}: column {target_key!r} is not a ClassLabel, so the class count is unknown '
                         'before the whole split is read; use --dataset hfds/NAME')
    offsets = dict(zip(files, np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()))
    reader = _ParquetRows(f'{name}[{picked}]', input_key, target_key, offsets)
    stream = StreamSource(f'hfids/{name}', picked, files, np.asarray(lengths, dtype=np.int64), names, known,
                          open_shard=reader)
    if classes is not None:
        apply_class_map(stream, list(classes))
    return stream


class _ParquetRows:
    """``(path, skip) -> StreamSample`` of each row of one parquet file from row ``skip`` on (pickles to workers)."""

    def __init__(self, name: str, input_key: str, target_key: str, offsets: dict):
        self.name, self.input_key, self.target_key, self.offsets = name, input_key, target_key, offsets

    def __call__(self, path: str, skip: int = 0) -> Iterator[StreamSample]:
        import pyarrow as pa
        import pyarrow.parquet as pq
        read = 0
        try:
            with _open(path) as f:
                pf, first = pq.ParquetFile(f), 0
                for g in range(pf.metadata.num_row_groups):
                    rows = pf.metadata.row_group(g).num_rows
                    if first + rows > skip:  # a row group wholly before ``skip`` is not read
                        table = pf.read_row_group(g, columns=[self.input_key, self.target_key])
                        images, labels = table.column(self.input_key).to_pylist(), table.column(self.target_key)
                        for i in range(max(0, skip - first), rows):
                            yield self._sample(path, images[i], int(labels[i].as_py()), first + i)
                            read += 1
                    first += rows
        except (OSError, pa.ArrowException) as e:  # a file cut short or not parquet: this shard fails, not the run
            raise ShardFailed(path, first_line(e), read) from None

    def _sample(self, path: str, cell, target: int, row: int) -> StreamSample:
        index = int(self.offsets[path]) + row
        data = cell.get('bytes') if isinstance(cell, dict) else cell
        if not data and isinstance(cell, dict) and cell.get('path'):
            with _open(cell['path']) as f:
                data = f.read()
        return StreamSample(str(index), data or b'', '', target, f'{self.name}[{index}]')


__all__ = ['open_hfids']
