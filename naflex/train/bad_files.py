"""Bookkeeping for files that failed to decode (NaFlex training, SigLIP 2 arXiv:2502.14786 pipeline).

The loaders replace such a file by another sample (the step keeps its shape) and list its path in the batch's
``'bad_files'``. The trainer feeds every batch to ``BadFileTracker.update``: each new path is logged once,
all are counted, written one per line to ``<output>/bad_files.txt``, and ``check()`` raises once failures
exceed ``max_fraction`` (default 1%) of the samples seen (after ``min_samples`` to avoid tiny-denominator trips).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Iterable, Optional

from naflex.model import batch as B

_log = logging.getLogger(__name__)


class TooManyBadFiles(RuntimeError):
    pass


class BadFileTracker:
    def __init__(self, output_dir=None, max_fraction: float = 0.01, min_samples: int = 1000,
                 logger: Optional[logging.Logger] = None):
        self.path = Path(output_dir) / 'bad_files.txt' if output_dir is not None else None
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.log = logger or _log
        self.seen_paths = set()
        self.num_failures = 0   # every replacement, including repeats of the same file
        self.num_samples = 0

    def update(self, inputs: Dict, num_samples: Optional[int] = None) -> None:
        """Record one batch. Pops 'bad_files' from ``inputs``; ``num_samples`` defaults to the batch size."""
        bad = B.pop_bad_files(inputs)
        self.add(bad, B.num_images(inputs) if num_samples is None else num_samples)

    def add(self, bad_paths: Iterable[str], num_samples: int) -> None:
        self.num_samples += int(num_samples)
        new = []
        for p in bad_paths:
            self.num_failures += 1
            if p not in self.seen_paths:
                self.seen_paths.add(p)
                new.append(p)
        for p in new:
            self.log.warning("bad image replaced: %s", p)
        if new and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, 'a') as f:
                f.writelines(p + '\n' for p in new)
        self.check()

    @property
    def fraction(self) -> float:
        return self.num_failures / max(1, self.num_samples)

    def check(self) -> None:
        if self.num_samples >= self.min_samples and self.fraction > self.max_fraction:
            raise TooManyBadFiles(
                f"{self.num_failures} of {self.num_samples} samples ({100 * self.fraction:.2f}%) failed to "
                f"decode, above the {100 * self.max_fraction:.2f}% threshold; "
                f"{len(self.seen_paths)} distinct files listed in {self.path or '(no output dir)'}")
