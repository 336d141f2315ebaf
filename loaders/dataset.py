"""Image-folder datasets for NaFlex training/eval (NaViT arXiv:2307.06304 style native-resolution input).

Layouts:
- ``ROOT/<split>/<class>/**/<image>`` (ImageNet style). ``validation``/``val``/``valid``/``eval`` are
  accepted for each other like timm's split search.
- a split given as a text file (``--train-split train.txt``, absolute or relative to ROOT) listing
  ``<class>/<file>`` paths, one a line, relative to ROOT (or to ROOT/<name of the file without .txt>,
  or to the text file's folder, whichever holds the first entry). Every listed file must be there: a list
  that does not match the folders is an error naming the folder it was resolved against.

Class indices follow timm's folder reader: class-folder names in natural order (case-insensitive, digit runs by
value: ``1, 2, 10, Apple, banana``), so a timm checkpoint scores its own labels here. ``classes=[...]`` (a class
map, timm's ``--class-map``) fixes the label space instead: index i is ``classes[i]``, and folders it does not
name are left out (``skipped_classes``), as timm's reader leaves them out.

Scanning uses ``os.scandir`` (file type from the directory entry, no per-file stat). Paths are stored as one
bytes blob + offsets, so forked DataLoader workers do not copy-on-refcount 1.28M Python strings. The index
can be cached (``cache_dir``), keyed by the absolute split path and the mtimes of the split and class dirs.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff', '.ppm', '.pgm', '.jfif')
_SPLIT_ALIASES = (('validation', 'val', 'valid', 'eval', 'evaluation'),)


def natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', s.lower())]


def sort_classes(names) -> List[str]:
    """Class names in label order: timm's natural sort."""
    return sorted(names, key=natural_key)


def label_space(found: Iterable[str], classes: Optional[Sequence[str]] = None) -> Tuple[List[str], List[str]]:
    """(class names in label order, found names left out): every found name in natural order, or the class map
    ``classes`` as given, leaving out the found names it does not list."""
    if classes is None:
        return sort_classes(set(found)), []
    if len(set(classes)) != len(classes):
        twice = sorted(c for c in set(classes) if classes.count(c) > 1)
        raise ValueError(f"the class map names a class twice: {twice[:5]}")
    listed = set(classes)
    return list(classes), sort_classes({n for n in found if n not in listed})


def remap_targets(targets: np.ndarray, names: Sequence[str], classes: Sequence[str], where: str) -> np.ndarray:
    """``targets`` (indices into ``names``) as indices into the class map ``classes``, for sources whose labels are
    indices with names (tar shards, Hugging Face datasets); a class the samples hold that the map does not name is a
    ValueError naming ``where``."""
    index = {c: i for i, c in enumerate(classes)}
    missing = [c for c in (names[t] for t in np.unique(targets)) if c not in index]
    if missing:
        more = f' (+{len(missing) - 5} more)' if len(missing) > 5 else ''
        raise ValueError(f'{where} holds classes the class map does not name: {", ".join(missing[:5])}{more}')
    return np.array([index.get(c, -1) for c in names], dtype=np.int64)[targets]


def read_class_map(path, root='') -> List[str]:
    """Class names in index order from timm's ``--class-map`` file (.txt: one name a line; .pkl: a name -> index
    dict), found as given or relative to ``root`` as timm finds it (timm's own reader parses it)."""
    from timm.data.readers.class_map import load_class_map
    found = Path(path) if Path(path).is_file() else Path(root) / path
    if not found.is_file():
        raise FileNotFoundError(f"class map {path} not found (as given or under {root})")
    class_to_idx = load_class_map(str(found))
    names = sorted(class_to_idx, key=class_to_idx.get)
    if sorted(class_to_idx.values()) != list(range(len(names))):
        raise ValueError(f"class map {found}: indices must be 0..{len(names) - 1}, each once")
    return names


def resolve_split_dir(root: Path, split: str) -> Path:
    """``root/split``, trying timm's validation aliases; ``split`` may be empty (root is the split dir)."""
    if not split:
        return root
    cand = root / split
    if cand.is_dir():
        return cand
    for group in _SPLIT_ALIASES:
        if split in group:
            for alt in group:
                if (root / alt).is_dir():
                    return root / alt
    raise FileNotFoundError(f"split {split!r} not found under {root}")


def _scan_class(dir_path: str, rel_prefix: str, out: List[str], problems: List[str]) -> None:
    """Image files under ``dir_path`` (sub-folders and folder symlinks too), relative to the split. A folder seen
    before (a symlink loop) or one that cannot be read is left out and named in ``problems``; names that are not
    UTF-8 are kept as the file system gives them (surrogate escapes). Hidden files (macOS's ``._x.jpg`` resource
    forks) are not images."""
    stack, seen = [(dir_path, rel_prefix)], set()
    while stack:
        d, rel = stack.pop()
        try:
            st = os.stat(d)
            if (st.st_dev, st.st_ino) in seen:
                problems.append(f'{d}: a folder seen before (symlink loop), left out')
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            problems.append(f'{d}: {e.strerror or e}, left out')
            continue
        for e in entries:
            try:
                is_dir = e.is_dir(follow_symlinks=True)
            except OSError as err:
                problems.append(f'{e.path}: {err.strerror or err}, left out')
                continue
            if is_dir:
                stack.append((e.path, rel + e.name + '/'))
            elif e.name.lower().endswith(IMG_EXTENSIONS) and not e.name.startswith('.'):  # not macOS ._x.jpg
                out.append(rel + e.name)


def scan_folder(split_dir: Path, classes: Optional[Sequence[str]] = None):
    """Returns (classes, relative paths, targets, skipped class folders) for ``split_dir/<class>/...``."""
    with os.scandir(split_dir) as it:
        found = [e.name for e in it if e.is_dir(follow_symlinks=True)]
    if not found:
        raise FileNotFoundError(f"no class folders in {split_dir}")
    classes, skipped = label_space(found, classes)
    present = set(found)
    paths: List[str] = []
    targets: List[int] = []
    problems: List[str] = []
    for idx, c in enumerate(classes):
        if c in present:
            before = len(paths)
            _scan_class(str(split_dir / c), c + '/', paths, problems)
            targets.extend([idx] * (len(paths) - before))
    if problems:
        warnings.warn(f'{len(problems)} problem(s) scanning {split_dir}: ' + '; '.join(problems[:3])
                      + (' ...' if len(problems) > 3 else ''))
    return classes, paths, targets, skipped


def _missing_files(base: Path, rels: Sequence[str]) -> List[str]:
    """The listed relative paths that are not files under ``base`` (one ``scandir`` per folder, no stat per file)."""
    listing: dict = {}
    missing = []
    for rel in rels:
        parent, _, name = rel.rpartition('/')
        names = listing.get(parent)
        if names is None:
            try:
                with os.scandir(base / parent) as it:
                    names = {e.name for e in it if not e.is_dir(follow_symlinks=True)}
            except OSError:
                names = set()
            listing[parent] = names
        if name not in names:
            missing.append(rel)
    return missing


def _subdirs(folder: Path) -> List[Path]:
    try:
        with os.scandir(folder) as it:
            return sorted(Path(e.path) for e in it if e.is_dir(follow_symlinks=True))
    except OSError:
        return []


def read_split_file(list_file: Path, root: Path, classes: Optional[Sequence[str]] = None):
    """Returns (base dir, classes, relative paths, targets, skipped classes) for a text file of ``<class>/<file>``
    lines (or ``<split>/<class>/<file>`` lines, all under one split folder: the class is then the folder below it).

    The listed paths resolve from the first of ROOT, ROOT/<file name without .txt> and the file's own folder that
    holds the first entry; every entry is checked there, so a list that does not match the folders fails here,
    in one line naming the folder, instead of as missing files in every loader worker.
    """
    if not list_file.is_file():
        raise FileNotFoundError(f"split file {list_file} not found (a .txt split is an absolute path or relative "
                                f"to the data root {root})")
    lines = [ln.strip() for ln in list_file.read_text().splitlines()]
    rels = [ln for ln in lines if ln and not ln.startswith('#')]
    if not rels:
        raise ValueError(f"split file {list_file} lists no images")
    bases = list(dict.fromkeys([root, root / list_file.stem, list_file.parent]))
    base = next((b for b in bases if (b / rels[0]).is_file()), None)
    if base is None:
        hint = next((f"; it is in {d}: prefix the entries with '{d.name}/' or move the list into {d}"
                     for d in _subdirs(root) if (d / rels[0]).is_file()), '')
        raise FileNotFoundError(f"split file {list_file}: its first entry {rels[0]!r} is in none of "
                                f"{', '.join(map(str, bases))} (listed paths resolve from one of these folders){hint}")
    # 'train/<class>/<file>' lines (the hint above suggests that prefix): the class is the folder under the split
    split_names = {'train', 'training', 'test'} | set(_SPLIT_ALIASES[0])
    first = {r.split('/', 1)[0] for r in rels}
    if len(first) == 1 and next(iter(first)).lower() in split_names and all(r.count('/') >= 2 for r in rels):
        prefix = next(iter(first))
        base, rels = base / prefix, [r[len(prefix) + 1:] for r in rels]
    missing = _missing_files(base, rels)
    if missing:
        raise FileNotFoundError(f"split file {list_file}: {len(missing)} of {len(rels)} listed files are not in "
                                f"{base}, e.g. {', '.join(missing[:3])}")
    names = {r.split('/', 1)[0] for r in rels}
    # Classes: the class folders of the base dir when present (labels then match ImageFolder on that dir
    # even if the list omits a class), otherwise the names used in the list.
    folder_classes = {d.name for d in _subdirs(base)}
    classes, skipped = label_space(folder_classes if names <= folder_classes else names, classes)
    c2i = {c: i for i, c in enumerate(classes)}
    rels = [r for r in rels if r.split('/', 1)[0] in c2i]
    targets = [c2i[r.split('/', 1)[0]] for r in rels]
    return base, classes, rels, targets, skipped


def write_cache_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write an index cache with ``write(binary file)`` into a temp file renamed over ``path``: processes that
    build the same cache at once (ranks, workers) never read half a file. OSError propagates; no temp file stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'{path.name}.tmp{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ImageFolderDataset:
    """Index of (path, class index) pairs. ``load``/transforms live in loaders.pipeline; this is just the index.

    ``ImageFolderDataset(root, split)``; ``len(ds)``, ``ds.path(i)``, ``ds.target(i)``, ``ds.targets`` (np.int64),
    ``ds.classes``, ``ds.class_to_idx``, ``ds[i] -> (path, target)``; ``classes``: a class map (see the module
    docstring), ``ds.skipped_classes`` the class folders it left out.
    """

    def __init__(self, root, split: str = 'train', *, classes: Optional[Sequence[str]] = None, cache_dir=None):
        self.root = Path(root)
        split = split or ''
        list_file = None
        if split.endswith('.txt'):
            list_file = Path(split) if Path(split).is_absolute() else self.root / split
        classes = None if classes is None else list(classes)
        if list_file is not None:
            base, classes, rels, targets, skipped = read_split_file(list_file, self.root, classes)
        else:
            base = resolve_split_dir(self.root, split)
            classes, rels, targets, skipped = self._scan_cached(base, classes, cache_dir)
        self.base = base
        self.classes = list(classes)
        self.skipped_classes = list(skipped)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        encoded = [r.encode('utf-8', 'surrogateescape') for r in rels]  # names that are not UTF-8 too
        lens = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lens, out=self._offsets[1:])
        self._blob = np.frombuffer(b''.join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)
        self.targets = np.asarray(targets, dtype=np.int64)
        self._base_str = str(base)

    @staticmethod
    def _scan_cached(base: Path, classes: Optional[List[str]], cache_dir):
        if cache_dir is None:
            return scan_folder(base, classes)
        st = [os.stat(base).st_mtime_ns]
        with os.scandir(base) as it:
            st += sorted((e.name, e.stat().st_mtime_ns) for e in it if e.is_dir())
        key = hashlib.sha1(repr((str(base.resolve()), classes, st, 2)).encode()).hexdigest()[:16]
        cache = Path(cache_dir) / f"naflex_index_{key}.pkl"
        if cache.exists():
            try:
                with open(cache, 'rb') as f:
                    return pickle.load(f)
            except Exception:
                pass
        result = scan_folder(base, classes)
        try:
            write_cache_file(cache, lambda f: pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            pass  # a cache folder that cannot be written only costs the scan next time
        return result

    def __len__(self) -> int:
        return len(self.targets)

    def relpath(self, i: int) -> str:
        return self._blob[self._offsets[i]:self._offsets[i + 1]].tobytes().decode('utf-8', 'surrogateescape')

    def path(self, i: int) -> str:
        return os.path.join(self._base_str, self.relpath(i))

    def target(self, i: int) -> int:
        return int(self.targets[i])

    def __getitem__(self, i: int) -> Tuple[str, int]:
        return self.path(i), self.target(i)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class ListDataset:
    """In-memory (path, target) list with the same interface as ImageFolderDataset (tests, custom lists)."""

    def __init__(self, samples: Sequence[Tuple[str, int]], classes: Optional[Iterable[str]] = None):
        self._paths = [str(p) for p, _ in samples]
        self.targets = np.asarray([int(t) for _, t in samples], dtype=np.int64)
        n = int(self.targets.max()) + 1 if len(self.targets) else 0
        self.classes = list(classes) if classes is not None else [str(i) for i in range(n)]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def __len__(self):
        return len(self._paths)

    def path(self, i):
        return self._paths[i]

    def target(self, i):
        return int(self.targets[i])

    def __getitem__(self, i):
        return self.path(i), self.target(i)

    @property
    def num_classes(self):
        return len(self.classes)
