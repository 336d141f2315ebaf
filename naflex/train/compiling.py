"""torch.compile for the training step: one graph for every sequence length, and a count of what was compiled.

Packed batches change shape every step (tokens T, images B, longest image). Compiled with ``dynamic=True`` the
model is traced once with symbolic sizes, so every later step reuses that graph; torch's default (automatic
dynamic) would specialise the graph to the first batch and recompile at the second. Evaluation (eval mode, no
grad) compiles one more frame.

``CompileWatch`` counts torch.compile's compile events (dynamo frames, recompiles of an already compiled frame,
lazily compiled backward graphs, seconds spent) through torch._dynamo's compile callbacks; ``CompileReport`` is
the trainer callback that logs those figures after the first epoch, and warns when a later epoch compiled again.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional, Tuple

import torch

_logger = logging.getLogger('train')


def compile_model(model: torch.nn.Module, backend: str = 'inductor', mode: Optional[str] = None):
    """``torch.compile`` with dynamic shapes from the first call (see the module docstring)."""
    return torch.compile(model, backend=backend, mode=mode, dynamic=True)


def _frame_attempt(compile_id: str) -> int:
    """n of a compile id 'frame/n' or 'frame/n_attempt' (n > 0: a recompile of an already compiled frame)."""
    tail = compile_id.split('/')[-1].split('_')[0]
    return int(tail) if tail.isdigit() else 0


class CompileWatch:
    """Compile events since it was created: (trigger, compile id, seconds) per event. ``close()`` unregisters."""

    def __init__(self):
        self.events: List[Tuple[str, str, float]] = []
        self._t0 = 0.0
        self.register()

    def register(self) -> None:
        """(Re)install the callbacks (``torch._dynamo.reset()`` clears them)."""
        from torch._dynamo.callback import callback_handler
        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)

    def close(self) -> None:
        from torch._dynamo.callback import callback_handler
        for callbacks, fn in ((callback_handler.start_callbacks, self._start),
                              (callback_handler.end_callbacks, self._end)):
            if fn in callbacks:
                callbacks.remove(fn)

    def _start(self, cb) -> None:
        self._t0 = time.perf_counter()

    def _end(self, cb) -> None:
        self.events.append((cb.callback_trigger.name, str(cb.compile_id), time.perf_counter() - self._t0))

    def mark(self) -> Tuple[int, int]:
        from torch._dynamo.utils import counters
        return len(self.events), counters['stats']['unique_graphs']

    def since(self, mark: Tuple[int, int] = (0, 0)) -> Dict[str, float]:
        """Figures of the events after ``mark`` (default: all): compile_s, dynamo_compiles (frames compiled),
        recompiles, backward_compiles, graphs (new unique graphs), graph_breaks (all so far)."""
        from torch._dynamo.utils import counters
        events = self.events[mark[0]:]
        frames = [cid for trigger, cid, _ in events if trigger == 'DYNAMO']
        return {'compile_s': sum(t for *_, t in events), 'dynamo_compiles': len(frames),
                'recompiles': sum(1 for cid in frames if _frame_attempt(cid) > 0),
                'backward_compiles': sum(1 for trigger, *_ in events if trigger == 'LAZY_BACKWARD'),
                'graphs': counters['stats']['unique_graphs'] - mark[1],
                'graph_breaks': sum(counters['graph_break'].values())}


class CompileReport:
    """Trainer callback: one log line with the compile figures after the first epoch of this run; a warning for
    every later epoch that compiled again (a shape or a setting the graph did not cover)."""

    def __init__(self):
        self.watch = CompileWatch()
        self._mark = self.watch.mark()
        self.first = True

    def after_epoch(self, state) -> bool:
        fig = self.watch.since(self._mark)
        self._mark = self.watch.mark()
        line = (f'{fig["dynamo_compiles"]} frames compiled ({fig["recompiles"]} recompiles), {fig["graphs"]} graphs, '
                f'{fig["backward_compiles"]} backward graphs, {fig["graph_breaks"]} graph breaks so far, '
                f'{fig["compile_s"]:.1f} s compiling')
        if self.first:
            _logger.info(f'torch.compile after epoch {state.epoch - 1} (training and evaluation): {line}')
        elif fig['dynamo_compiles'] or fig['backward_compiles']:
            _logger.warning(f'torch.compile compiled again in epoch {state.epoch - 1}: {line}')
        self.first = False
        return False

    def close(self) -> None:
        self.watch.close()
