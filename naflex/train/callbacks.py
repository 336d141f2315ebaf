"""Callbacks: the one way code outside the loop takes part in training (signal handlers, tests, tools).

A callback is any object with some of these methods; the trainer calls those it has, in list order:

- ``after_update(trainer, state)``: after every optimizer update (the schedule has stepped);
- ``after_epoch(state) -> bool``: after an epoch's checkpoint is written; True ends training there;
- ``wants_stop() -> bool``: polled at every update; True makes the trainer write a recovery checkpoint at
  that update (with several ranks: at the next log update, where the ranks agree) and raise ``StopRequested``.

``StopOnSignal`` is the preemption handler train.py installs: SIGTERM asks for that stop.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Iterable, List

_logger = logging.getLogger('train')


class StopRequested(RuntimeError):
    """A stop was asked for (SIGTERM); a checkpoint to resume from has been written."""


class Callbacks:
    """An ordered list of callbacks, called by method name (objects may define any subset of the methods)."""

    def __init__(self, callbacks: Iterable = ()):
        self.items: List = [c for c in callbacks if c is not None]

    def after_update(self, trainer, state) -> None:
        for c in self.items:
            if hasattr(c, 'after_update'):
                c.after_update(trainer, state)

    def after_epoch(self, state) -> bool:
        stop = False
        for c in self.items:
            if hasattr(c, 'after_epoch') and c.after_epoch(state):
                stop = True
        return stop

    def wants_stop(self) -> bool:
        return any(c.wants_stop() for c in self.items if hasattr(c, 'wants_stop'))


class StopOnSignal:
    """While installed (a context manager), SIGTERM sets ``requested``; the trainer stops at the next update
    after a recovery save. Only the main thread can install signal handlers; elsewhere this does nothing."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.requested = False
        self._previous = {}

    def wants_stop(self) -> bool:
        return self.requested

    def _handle(self, signum, frame) -> None:
        self.requested = True
        _logger.warning(f'{signal.Signals(signum).name} received: saving a recovery checkpoint at the next update')

    def __enter__(self) -> 'StopOnSignal':
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
