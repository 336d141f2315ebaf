"""Bookkeeping for files that failed to decode (NaFlex training, SigLIP 2 arXiv:2502.14786 pipeline).

The loaders replace such a training file by another sample (the step keeps its shape), drop such an eval file,
and list its path in the batch's ``'bad_files'``. ``BadFileTracker`` is the one place that reports them: each
path is logged once per run (also across a resume: ``bad_files.txt`` is read back) and written once, one per
line, to ``<output>/bad_files.txt``.

The stop rule, for training files: ``fraction`` is the share of decode attempts that failed (failures /
(samples + failures): with a share p of bad files it estimates p, replacements that hit a bad file again
included). Once ``min(min_samples, dataset size)`` samples have been drawn (1000, or one epoch of a smaller
dataset, so a small dataset is judged as soon as every file had its chance) the run stops with
``TooManyBadFiles`` while that share exceeds ``max_fraction`` (``--bad-file-limit``, 1% by default). A loader
that gives up on one sample (every replacement failed too: ``loaders.UndecodableFiles``) stops the run at once,
with the same error. A streamed source that is gone (``loaders.stream_io.DataSourceError``) stops the run the same
way, with that error.

With several ranks each judges its own share, and a rank that stops must not leave the others waiting for it in a
collective: its tracker keeps the error for the trainer (``failure()``, a callback of naflex.train.callbacks) and
hands out its last batch again until every rank raises the error at the same update (naflex.train.engine). Only
rank 0 writes ``bad_files.txt``; the error carries the failing rank's paths (``TooManyBadFiles.paths``) for it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from loaders import UndecodableFiles
from loaders.stream_io import DataSourceError
from naflex.model import batch as B

from .checkpoint import writing
from .config import TrainConfig

_log = logging.getLogger(__name__)


class TooManyBadFiles(RuntimeError):
    """Too many training files failed to decode; ``paths``: every undecodable file the stopping rank found."""
    paths: List[str] = []


class BadFileTracker:
    """``output_dir``: where bad_files.txt is (None: nowhere); ``writes``: whether this process writes it (rank 0;
    the others name it in messages); ``dataset_size``: the samples this rank draws per epoch; ``world_size`` > 1
    keeps a stop for the trainer instead of raising it."""

    def __init__(self, output_dir=None, max_fraction: float = TrainConfig.bad_file_limit, min_samples: int = 1000,
                 dataset_size: Optional[int] = None, logger: Optional[logging.Logger] = None, *, writes: bool = True,
                 world_size: int = 1):
        self.path = Path(output_dir) / 'bad_files.txt' if output_dir is not None else None
        self.writes = writes and self.path is not None
        self.max_fraction = max_fraction
        self.min_samples = min(min_samples, dataset_size) if dataset_size else min_samples
        self.log = logger or _log
        self.world_size = world_size
        self.seen_paths = set()
        if self.path is not None and self.path.is_file():  # a resumed run: these were reported already
            self.seen_paths.update(p for p in self.path.read_text().splitlines() if p)
        self.num_failures = 0   # every replacement, including repeats of the same file
        self.num_samples = 0
        self.error: Optional[TooManyBadFiles] = None  # a stop the ranks have not agreed on yet

    def track(self, batches):
        """Yield the (inputs, target) ``batches`` after recording each one's bad files; past the stop rule, or when
        the loader gave up on a sample (the error names a few of its files; all go to bad_files.txt), the run stops
        with ``TooManyBadFiles``. One process raises it here; a rank of several yields the batch at hand again and
        again until the trainer stops every rank."""
        batch, gave_up = None, None
        try:
            for batch in batches:
                self.update(batch[0])
                yield batch
                if self.error is not None:
                    break
        except UndecodableFiles as e:
            self.record(e.paths, 'training')
            batch, gave_up = e.batch, f'{e}; {self._listed()}: check the files under --data-dir'
        except DataSourceError as e:  # streamed shards whose source is gone: it ends the run, on every rank alike
            self._stop(str(e), DataSourceError)
        if gave_up:
            self._stop(gave_up)
        if self.error is not None and batch is None:
            raise self.error  # no step to go on with (the first one failed and came without stand-ins)
        while self.error is not None:
            yield batch

    def update(self, inputs: Dict, num_samples: Optional[int] = None) -> None:
        """Record one batch's bad files (left in ``inputs``); ``num_samples`` defaults to the batch size."""
        self.add(B.bad_files(inputs), B.num_images(inputs) if num_samples is None else num_samples)

    def add(self, bad_paths: Iterable[str], num_samples: int) -> None:
        bad_paths = list(bad_paths)
        self.num_samples += int(num_samples)
        self.num_failures += len(bad_paths)
        self.record(bad_paths, 'training')
        self.check()

    def record(self, bad_paths: Iterable[str], where: str = 'training') -> None:
        """Log and list the paths not reported yet (evaluation files go through here too, uncounted)."""
        new = list(dict.fromkeys(p for p in bad_paths if p not in self.seen_paths))
        self.seen_paths.update(new)
        what = 'replaced by another sample' if where == 'training' else f'skipped in {where}'
        for p in new:
            self.log.warning('undecodable image %s: %s', what, p)
        if new and self.writes:
            with writing(self.path):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, 'a') as f:
                    f.writelines(p + '\n' for p in new)

    @property
    def fraction(self) -> float:
        """The share of decode attempts that failed."""
        return self.num_failures / max(1, self.num_samples + self.num_failures)

    def failure(self) -> Optional[TooManyBadFiles]:
        """The stop this rank holds for the trainer (callbacks protocol), or None."""
        return self.error

    def _listed(self) -> str:
        return f'{len(self.seen_paths)} distinct files listed in {self.path or "(no output dir)"}'

    def _stop(self, message: str, kind: type = TooManyBadFiles) -> None:
        error = kind(message)
        error.paths = sorted(self.seen_paths)
        if self.world_size == 1:
            raise error
        self.error = self.error or error

    def check(self) -> None:
        if self.error is None and self.num_samples >= self.min_samples and self.fraction > self.max_fraction:
            self._stop(
                f"{self.num_failures} of {self.num_samples + self.num_failures} decode attempts "
                f"({100 * self.fraction:.2f}%) failed after {self.num_samples} training samples, above the "
                f"{100 * self.max_fraction:.2f}% threshold (--bad-file-limit {self.max_fraction:g}); {self._listed()}")
