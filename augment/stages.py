"""Optional stage timing for the NaFlex training pipeline (NaViT arXiv:2307.06304 / SigLIP 2 arXiv:2502.14786):
a hook that the loaders and the augmentation policy call around each stage of a sample and of a step, so a
profiler times the code that really runs (scripts/bench/profile_loader.py) rather than a copy of it.

A timer is anything callable as ``timer(stage_name)`` that returns a context manager; ``StageTimer`` below is the
one the profiler uses. The pipeline writes ``with stage(timer, 'flip'): ...``; with ``timer=None`` (the default
everywhere) ``stage`` returns one shared no-op context, which costs well under a microsecond per stage against
the milliseconds a sample takes. The hook never changes what a stage computes (tested: a timed step equals an
untimed one bit for bit).

Stages, in the order a step runs them: 'read + header', 'RRC params', 'decode', 'crop + resize', 'flip',
'RandAugment', 'jitter/grayscale' (per sample), then 'MixUp/CutMix', 'to uint8 tensor', 'random erasing',
'pack' (per step).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, ContextManager, Dict, Optional, Protocol


class StageHook(Protocol):
    def __call__(self, name: str) -> ContextManager[None]: ...


_UNTIMED = contextlib.nullcontext()  # stateless, so one instance serves every untimed stage


def stage(timer: Optional[StageHook], name: str) -> ContextManager[None]:
    """``timer(name)``, or a no-op context when there is no timer."""
    return _UNTIMED if timer is None else timer(name)


class StageTimer:
    """Seconds spent per stage name (``seconds``, in the order the stages first ran) and how often each ran.

    ``clock``: wall time by default; ``time.thread_time`` counts only this thread's CPU time, which other load on
    a shared machine disturbs far less (the profiler's default)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.seconds: Dict[str, float] = {}
        self.calls: Dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = self.clock()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + self.clock() - t0
            self.calls[name] = self.calls.get(name, 0) + 1
