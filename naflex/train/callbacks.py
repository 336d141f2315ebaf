"""Callbacks: the one way code outside the loop takes part in training (signal handlers, tests, tools).

A callback is any object with some of these methods; the trainer calls those it has, in list order:

- ``after_update(trainer, state)``: after every optimizer update (the schedule has stepped);
- ``after_epoch(state) -> bool``: after an epoch's checkpoint is written; True ends training there;
- ``wants_stop() -> bool``: polled at every update; True makes the trainer write a recovery checkpoint at
  that update (with several ranks: at the next log update, where the ranks agree) and raise ``StopRequested``;
  a callback's ``signum`` attribute, when set, names the signal in the message and the exit status;
- ``failure() -> Exception | None``: an error that ends the run without saving (naflex.train.bad_files: too many
  undecodable files); polled at every log update and before a recovery save, where the ranks agree: every rank
  raises the error of the lowest rank that has one, at the same update, so none waits for a rank that left;
- ``close()``: when training ends, however it ends.

``StopOnSignal`` is the handler train.py installs: SIGTERM (a scheduler preempting the job) and SIGINT (Ctrl-C)
ask for that stop; a second SIGINT raises ``KeyboardInterrupt`` at once, for a person who does not want to wait.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Iterable, List

_logger = logging.getLogger('train')


class StopRequested(RuntimeError):
    """A stop was asked for (SIGTERM / SIGINT); a checkpoint to resume from has been written.
    ``exit_code`` is what a shell reports for that signal (128 + its number: 143, 130)."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = signal.Signals(signum)
        self.exit_code = 128 + int(signum)


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

    def failure(self):
        """The first callback's error that ends the run, or None."""
        return next((e for e in (c.failure() for c in self.items if hasattr(c, 'failure')) if e is not None), None)

    def close(self) -> None:
        """Release what callbacks hold (those with a ``close()``) at the end of training."""
        for c in self.items:
            if hasattr(c, 'close'):
                c.close()

    def stop_signal(self) -> signal.Signals:
        """The signal behind the stop: the first stopping callback's ``signum``, else SIGTERM (a stop voted by
        another rank, or asked for by a callback that is not a signal handler, is treated as a preemption)."""
        for c in self.items:
            if hasattr(c, 'wants_stop') and c.wants_stop() and getattr(c, 'signum', None):
                return signal.Signals(c.signum)
        return signal.SIGTERM


class StopOnSignal:
    """While installed (a context manager), SIGTERM or SIGINT sets ``requested``; the trainer stops at the next
    update after a recovery save. A second SIGINT while that stop is pending raises ``KeyboardInterrupt`` (stop
    now, no save: the checkpoints already written stay as they are). Only the main thread can install signal
    handlers; elsewhere this does nothing."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = False
        self.signum = None  # the first signal received
        self._previous = {}

    def wants_stop(self) -> bool:
        return self.requested

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        if not self.requested:
            self.requested, self.signum = True, signal.Signals(signum)
            again = '; press Ctrl-C again to stop at once without saving' if signum == signal.SIGINT else ''
            _logger.warning(f'{self.signum.name} received: saving a recovery checkpoint at the next update{again}')

    def __enter__(self) -> 'StopOnSignal':
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
