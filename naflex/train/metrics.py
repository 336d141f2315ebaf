"""Training-loop metrics kept on the device: loss and token sums per epoch and per log window, the first
non-finite step, and the one all-reduce per log point that turns them into numbers (and sums the ranks' votes
to stop).

Adding a step launches a few kernels with host scalars and never reads the device (no host sync between log
points); ``check_finite`` and ``read_window`` are the only places that wait for the device. Image counts are
known on the host (batch shapes, naflex.model.batch). With several ranks every figure is summed over ranks, so
every rank logs and returns the same numbers.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from naflex.model import batch as B

from . import distributed as D


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the message names the step, sequence length and batch size."""


class TrainMetrics:
    """Sums for one epoch of ``num_steps`` steps (``start`` sums carried over from a mid-epoch checkpoint)."""

    def __init__(self, device: torch.device, num_steps: int, world_size: int = 1, start: Dict = None):
        self.device, self.num_steps, self.world_size = device, num_steps, world_size
        start = start or {}
        # [loss * images, valid tokens] on the device (float64: exact counts up to 2^53)
        self.epoch = torch.tensor([start.get('loss_sum', 0.0), start.get('tokens', 0.0)], dtype=torch.float64,
                                  device=device)
        self.window = torch.zeros(2, dtype=torch.float64, device=device)
        self.epoch_images, self.window_images = int(start.get('images', 0)), 0  # this rank's
        self.epoch_bad_files = int(start.get('bad_files', 0))  # this rank's replaced (undecodable) files
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.pending: Dict[int, Tuple[str, int]] = {}  # step -> (L, batch size) since the last finiteness check
        self.last_loss = torch.zeros((), device=device)

    def add(self, step: int, loss: torch.Tensor, inputs, num_bad_files: int = 0) -> None:
        """Record one micro-step's (unweighted) loss and the files its loader replaced; no host sync."""
        images = B.num_images(inputs)
        self.epoch_bad_files += num_bad_files
        loss = loss.detach()
        self.pending[step] = (B.describe_seq_len(inputs), images)
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad)
        sums = torch.stack([loss.double() * images, B.valid_tokens(inputs).to(self.device).double()])
        self.epoch += sums
        self.window += sums
        self.epoch_images += images
        self.window_images += images
        self.last_loss = loss

    def check_finite(self, epoch: int, num_updates: int, lr: float) -> None:
        """Raise NonFiniteLossError for the earliest non-finite step on any rank (all ranks stop together)."""
        never = torch.full((), self.num_steps, dtype=torch.long, device=self.device)
        first = torch.where(self.first_bad < 0, never, self.first_bad)
        if self.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        bad = int(first.item())
        if bad < self.num_steps:
            seq_len, images = self.pending.get(bad, (-1, -1))
            raise NonFiniteLossError(
                f'non-finite loss at epoch {epoch} step {bad}/{self.num_steps} (update {num_updates}): sequence '
                f'length {seq_len}, batch size {images}, lr {lr:.3e}; stopped without saving (the last good '
                'checkpoint is kept). Try a lower --lr, --clip-grad 1.0 or --amp-dtype bfloat16.')
        self.pending.clear()

    def read_window(self, stop: bool, failed: bool = False) -> Dict[str, float]:
        """Sum the window and epoch figures and the votes (a stop asked for, a failure) over ranks; resets the
        window."""
        counts = torch.tensor([self.window_images, self.epoch_images, float(stop), float(failed)], dtype=torch.float64)
        sums = torch.cat([self.window, self.epoch, self.last_loss.double().reshape(1), counts.to(self.device)])
        w_loss, w_tok, e_loss, _, now, w_img, e_img, stops, failures = D.all_reduce_sum(sums).tolist()
        self.window.zero_()
        self.window_images = 0
        return {'loss': now / self.world_size, 'window_loss': w_loss / max(w_img, 1.0),
                'avg_loss': e_loss / max(e_img, 1.0), 'tokens': w_tok, 'images': w_img, 'stop': stops > 0,
                'failed': failures > 0}

    def read_epoch(self, stop: bool) -> Dict[str, float]:
        """The epoch's totals over ranks: mean loss, images, valid tokens, replaced files, and whether any rank
        asked to stop."""
        counts = torch.tensor([self.epoch_images, self.epoch_bad_files, float(stop)], dtype=torch.float64)
        sums = torch.cat([self.epoch, counts.to(self.device)])
        loss_sum, tokens, images, bad, stops = D.all_reduce_sum(sums).tolist()
        return {'loss': loss_sum / max(images, 1.0), 'images': images, 'tokens': tokens, 'bad_files': int(bad),
                'stop': stops > 0}

    def state_dict(self) -> Dict[str, float]:
        """This rank's running epoch sums, for a mid-epoch checkpoint (reads the device: call at a save)."""
        loss_sum, tokens = self.epoch.tolist()
        return {'loss_sum': loss_sum, 'tokens': tokens, 'images': self.epoch_images,
                'bad_files': self.epoch_bad_files}
