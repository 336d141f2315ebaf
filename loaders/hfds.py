"""Hugging Face datasets as an indexable dataset, as timm reads them with ``--dataset hfds/NAME``.

``NAME`` is a Hub dataset id (e.g. ``timm/imagenet-1k``) read through ``datasets.load_dataset`` with ``--data-dir``
as its cache folder, or a local folder in the Hub's layout (``data/<split>-*.parquet``), which needs no network.
The image column (``--input-key``, default ``image``) is read as its encoded bytes (the ``Image`` feature without
decoding), so the loader decodes and crops it like a file of an image folder; the label column (``--target-key``,
default ``label``) gives the class index, and its ``ClassLabel`` names the classes. The interface is
``ImageFolderDataset``'s (``path(i)``, ``target(i)``, ``targets``, ``classes``), so the NaFlex schedule, the
per-sample seeds, exact resume and the rank/worker split work unchanged. ``datasets`` is an optional dependency
(``pip install -e '.[hf]'``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import numpy as np

from .dataset import ImageFolderDataset, remap_targets
from .shards import split_candidates

class HfImage(str):
    """``NAME[split][i]``: the name a sample has in messages and bad-file lists, which also reads the image's encoded
    bytes (from the dataset's memory-mapped Arrow files, or the file its ``path`` names). Pickled (e.g. in a batch's
    bad-file list) it is just that name."""

    def __new__(cls, name: str, column, index: int):
        self = super().__new__(cls, name)
        self.column, self.index = column, index
        return self

    def read_bytes(self) -> bytes:
        cell = self.column[self.index]
        if cell.get('bytes'):
            return cell['bytes']
        if cell.get('path'):
            return Path(cell['path']).read_bytes()
        raise FileNotFoundError(f'{self}: the image cell holds neither bytes nor a path')

    def __reduce__(self):
        return str, (str(self),)


def _load(name: str, split: str, cache_dir: Optional[str]):
    """``datasets.load_dataset`` for a Hub id or a local folder; a split named otherwise there ('val' /
    'validation') is found too. FileNotFoundError / ValueError name what is missing in one line."""
    source, _, picked = resolve_split(name, split, cache_dir)
    import datasets
    return datasets.load_dataset(source, split=picked, cache_dir=cache_dir), picked


def resolve_split(name: str, split: str, cache_dir: Optional[str]):
    """(source, dataset builder, split name found) for a Hub id or a local folder (see ``_load``)."""
    try:
        import datasets
    except ImportError:
        raise ValueError("--dataset hfds/...: the datasets package is not installed (pip install -e '.[hf]')") \
            from None
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    source = os.path.expanduser(name)
    try:
        builder = datasets.load_dataset_builder(source, cache_dir=cache_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f'hfds/{name}: no such local folder or Hub dataset ({first_line(e)})') from None
    except ConnectionError as e:
        raise FileNotFoundError(f'hfds/{name}: the Hub cannot be reached and nothing is cached '
                                f'({first_line(e)}); pass a local folder with data/<split>-*.parquet') from None
    splits = list(builder.config.data_files or {}) or list((builder.info.splits or {}).keys())
    picked = next((s for s in split_candidates(split) if s in splits), None) if splits else split
    if picked is None:
        raise FileNotFoundError(f'hfds/{name} has no split {split!r} (splits: {", ".join(splits)})')
    return source, builder, picked


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class HfDataset:
    """Split ``split`` of the Hugging Face dataset ``name`` (Hub id or local folder); images from column
    ``input_key``, class indices from column ``target_key``. ``classes``: a class map (class names in index order)
    that re-indexes named classes, as ``ShardDataset``'s."""

    class_names_known = True
    skipped_classes: List[str] = []
    cut_short: List[str] = []

    def __init__(self, name: str, split: str = 'train', *, cache_dir=None, classes=None,
                 input_key: Optional[str] = None, target_key: Optional[str] = None):
        import datasets
        input_key, target_key = input_key or 'image', target_key or 'label'
        ds, self.split = _load(name, split, str(cache_dir) if cache_dir else None)
        missing = [k for k in (input_key, target_key) if k not in ds.column_names]
        if missing:
            raise ValueError(f'hfds/{name} split {self.split!r} has no column {", ".join(map(repr, missing))} '
                             f'(columns: {", ".join(ds.column_names)}); choose with --input-key / --target-key')
        self.root = self.base = name
        self.targets = ds.data.column(target_key).to_numpy().astype(np.int64)
        feature = ds.features[target_key]
        if isinstance(feature, datasets.ClassLabel):
            self.classes = list(feature.names)
        else:
            self.classes = [str(i) for i in range(int(self.targets.max()) + 1 if len(self.targets) else 0)]
            self.class_names_known = False
        self._images = ds.cast_column(input_key, datasets.Image(decode=False))[input_key]  # a lazy Arrow column
        self._name = f'{name}[{self.split}]'
        if classes is not None:
            self._apply_class_map(list(classes))
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def _apply_class_map(self, classes: List[str]) -> None:
        if not self.class_names_known:
            raise ValueError(f'{self._name}: its labels are bare indices (no ClassLabel names), so a class map '
                             'cannot be applied')
        self.targets, self.classes = remap_targets(self.targets, self.classes, classes, self._name), classes

    def path(self, i: int) -> HfImage:
        return HfImage(f'{self._name}[{i}]', self._images, int(i))

    __len__ = ImageFolderDataset.__len__
    target = ImageFolderDataset.target
    __getitem__ = ImageFolderDataset.__getitem__
    num_classes = ImageFolderDataset.num_classes


__all__ = ['HfDataset', 'HfImage']
