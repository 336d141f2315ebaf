"""Learning-rate schedule: linear warmup then cosine decay, stepped per epoch or per optimizer update.

Semantics follow timm's ``CosineLRScheduler`` as built by ``create_scheduler_v2`` for ``--sched cosine``
(one cycle, no noise, k=1), so runs with the same flags see the same learning rate:

- the schedule clock ``t`` counts epochs, or optimizer updates with ``--sched-on-updates``
  (then every epoch length is multiplied by ``updates_per_epoch``);
- for ``t < warmup_t`` the lr rises linearly from ``--warmup-lr`` towards the base lr
  (``warmup_lr + t * (base - warmup_lr) / warmup_t``);
- afterwards ``min_lr + (base - min_lr) * (1 + cos(pi * t / t_initial)) / 2``; the warmup lies *inside*
  ``--epochs`` unless ``--warmup-prefix`` shifts the cosine to start after it;
- past ``t_initial`` (the ``--cooldown-epochs`` tail) the lr stays at ``--min-lr``;
- a parameter group's ``lr_scale`` (layer-wise lr decay) multiplies its value.

The schedule is a pure function of ``t``: nothing but the base lrs is state, so resuming only needs the
current epoch/update count (``state_dict`` is kept for checkpoint completeness).
"""
import math
from typing import Dict

import torch

from .config import ScheduleConfig

KINDS = ('cosine', 'constant')


class WarmupCosineSchedule:
    """Set ``param_group['lr']`` from the schedule clock; call ``step(epoch)`` after each epoch and
    ``step_update(num_updates)`` after each optimizer update (only one of them acts, see ``on_updates``)."""

    def __init__(
            self,
            optimizer: torch.optim.Optimizer,
            epochs: int,
            updates_per_epoch: int = 1,
            on_updates: bool = False,
            warmup_epochs: float = 0,
            warmup_lr: float = 0.0,
            min_lr: float = 0.0,
            cooldown_epochs: int = 0,
            warmup_prefix: bool = False,
            kind: str = 'cosine',
    ):
        if kind not in KINDS:
            raise ValueError(f'unknown schedule {kind!r}; valid: {", ".join(KINDS)}')
        if epochs <= 0:
            raise ValueError(f'epochs must be > 0, got {epochs}')
        if on_updates and updates_per_epoch <= 0:
            raise ValueError('updates_per_epoch must be > 0 when stepping per update')
        self.optimizer = optimizer
        self.kind = kind
        self.on_updates = on_updates
        scale = updates_per_epoch if on_updates else 1
        self.t_initial = epochs * scale
        self.warmup_t = int(warmup_epochs * scale)
        self.cooldown_t = cooldown_epochs * scale
        self.warmup_lr = warmup_lr
        self.min_lr = min_lr
        self.warmup_prefix = warmup_prefix
        for group in optimizer.param_groups:
            group.setdefault('initial_lr', group['lr'])
        self.base_lrs = [group['initial_lr'] for group in optimizer.param_groups]
        self._apply(0)

    def lr_at(self, t: int, base_lr: float) -> float:
        """Learning rate at schedule time ``t`` for a group whose base (peak) lr is ``base_lr``."""
        if t < self.warmup_t:
            return self.warmup_lr + t * (base_lr - self.warmup_lr) / self.warmup_t
        if self.kind == 'constant':
            return base_lr
        if self.warmup_prefix:
            t = t - self.warmup_t
        if t >= self.t_initial:
            return self.min_lr
        return self.min_lr + 0.5 * (base_lr - self.min_lr) * (1 + math.cos(math.pi * t / self.t_initial))

    def _apply(self, t: int) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group['lr'] = self.lr_at(t, base) * group.get('lr_scale', 1.0)

    def step(self, epoch: int) -> None:
        """Call at the end of an epoch with the index of the *next* epoch (timm convention)."""
        if not self.on_updates:
            self._apply(epoch)

    def step_update(self, num_updates: int) -> None:
        """Call after each optimizer update with the total number of updates done so far."""
        if self.on_updates:
            self._apply(num_updates)

    def state_dict(self) -> Dict:
        return {'base_lrs': list(self.base_lrs)}

    def load_state_dict(self, state: Dict) -> None:
        self.base_lrs = list(state['base_lrs'])


def create_schedule(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    """The schedule ``cfg`` describes; returns ``(schedule or None, total_epochs)``."""
    if cfg.sched == 'none':
        return None, cfg.total_epochs
    sched = WarmupCosineSchedule(
        optimizer, epochs=cfg.epochs, updates_per_epoch=updates_per_epoch, on_updates=cfg.on_updates,
        warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
        cooldown_epochs=cfg.cooldown_epochs, warmup_prefix=cfg.warmup_prefix, kind=cfg.sched)
    return sched, cfg.total_epochs
