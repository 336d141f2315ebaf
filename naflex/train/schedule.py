"""Learning-rate schedule: timm's schedulers, built and stepped as timm's train.py does, and restored on resume.

``create_schedule`` is timm train.py's call, ``timm.scheduler.create_scheduler_v2(optimizer,
**scheduler_kwargs(args, decreasing_metric=...), updates_per_epoch=...)``, on our ``ScheduleConfig``: every
scheduler of timm's factory (cosine, tanh, step, multistep, plateau, poly, wsd, rsqrt, constant, none) with its
flags. The trainer steps it like timm's loop: ``step_update(num_updates)`` after each optimizer update (it acts with
``--sched-on-updates``), ``step(epoch + 1, metric)`` after each epoch's evaluation (it acts otherwise; plateau reads
the metric). timm's loop also hands ``step_update`` the running train loss, which no scheduler reads; reading it
would be a host sync per update, so the trainer passes none.

Resume: timm's schedulers are functions of the epoch / update count, so a resumed run rebuilds the schedule from
its flags (a changed ``--lr`` applies) and steps it to the resumed position. The plateau scheduler also has state
(best metric, patience and cooldown counters, the reductions so far), which timm does not checkpoint: here it goes
into the checkpoint and comes back on resume, the reductions as factors of the base lr.
"""
import warnings
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .config import ScheduleConfig

_PLATEAU_COUNTERS = ('best', 'num_bad_epochs', 'cooldown_counter', 'last_epoch')


def scheduler_args(cfg: ScheduleConfig, seed: int = 42, eval_metric: str = 'top1') -> SimpleNamespace:
    """The attributes of timm train.py's ``args`` that ``timm.scheduler.scheduler_kwargs`` reads, from ``cfg``."""
    return SimpleNamespace(
        sched=cfg.sched, epochs=cfg.epochs, decay_epochs=cfg.decay_epochs,
        decay_milestones=list(cfg.decay_milestones), warmup_epochs=cfg.warmup_epochs,
        cooldown_epochs=cfg.cooldown_epochs, patience_epochs=cfg.patience_epochs, decay_rate=cfg.decay_rate,
        min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr, warmup_prefix=cfg.warmup_prefix,
        lr_noise=None if cfg.noise is None else list(cfg.noise), lr_noise_pct=cfg.noise_pct,
        lr_noise_std=cfg.noise_std, seed=seed, lr_cycle_mul=cfg.cycle_mul, lr_cycle_decay=cfg.cycle_decay,
        lr_cycle_limit=cfg.cycle_limit, lr_k_decay=cfg.k_decay, lr_decay_fn=cfg.decay_fn,
        lr_stable_timescale=cfg.stable_timescale, eval_metric=eval_metric, sched_on_updates=cfg.on_updates)


def create_schedule(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int, *,
                    decreasing_metric: bool = False, seed: int = 42) -> Tuple[Optional[object], int]:
    """(timm scheduler or None for ``--sched none``, total epochs including a warmup prefix, cycles and cooldown).
    ``decreasing_metric``: the metric plateau watches falls as training improves (``--eval-metric loss``, or no
    evaluation: timm then watches the train loss); ``seed``: --seed, the lr noise seed."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    with warnings.catch_warnings():  # plateau warns that timm deprecates it; it still works as documented
        warnings.simplefilter('ignore', FutureWarning)
        return create_scheduler_v2(optimizer, **scheduler_kwargs(scheduler_args(cfg, seed),
                                                                 decreasing_metric=decreasing_metric),
                                   updates_per_epoch=updates_per_epoch)


def warmup_warning(cfg: ScheduleConfig, peak_lr: float) -> Optional[str]:
    """The line for a warm-up as long as the run or longer: timm counts it inside --epochs (unless --warmup-prefix),
    so the lr only climbs, never reaching ``peak_lr`` nor decaying; only the lr curve would show it. None otherwise."""
    if cfg.sched == 'none' or cfg.warmup_prefix or cfg.warmup_epochs < cfg.epochs:
        return None
    zero = (' (epoch 0 trains at lr 0: without --sched-on-updates the lr steps once per epoch)'
            if cfg.warmup_lr == 0 and not cfg.on_updates else '')
    return (f'--warmup-epochs {cfg.warmup_epochs} is not shorter than --epochs {cfg.epochs}: the whole run is warm-up, '
            f'the lr climbs from --warmup-lr {cfg.warmup_lr:g} towards {peak_lr:.3e} and never reaches it nor decays'
            f'{zero}; lower --warmup-epochs, raise --epochs, or add --warmup-prefix (warm-up before the --epochs)')


def schedule_problems(cfg: ScheduleConfig, flag: Callable[[str], str] = str) -> List[str]:
    """What timm's factory rejects in these flags (e.g. a wsd decay longer than the schedule), as one line. A
    schedule stepped per update is checked when the run knows its updates per epoch (``create_schedule``)."""
    if cfg.on_updates:
        return []
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        create_schedule(cfg, opt, updates_per_epoch=1)
    except (ValueError, AssertionError, TypeError) as e:
        return [schedule_problem(cfg, e, flag)]
    return []


def schedule_problem(cfg: ScheduleConfig, error: Exception, flag: Callable[[str], str] = str) -> str:
    """timm's factory error as our one-line message."""
    return f'{flag("sched")} {cfg.sched}: {" ".join(str(error).split()) or type(error).__name__}'


def _is_plateau(schedule) -> bool:
    from timm.scheduler import PlateauLRScheduler
    return isinstance(schedule, PlateauLRScheduler)


def _group_bases(schedule) -> List[float]:
    """Each param group's scheduled lr before any plateau reduction: base lr x the group's lr_scale."""
    return [base * group.get('lr_scale', 1.0) for base, group in zip(schedule.base_values,
                                                                     schedule.optimizer.param_groups)]


def schedule_state(schedule) -> Dict:
    """What a checkpoint keeps of ``schedule``: timm's ``state_dict``, and plateau's counters and reductions."""
    state = dict(schedule.state_dict())
    if _is_plateau(schedule):
        lrs = schedule.restore_lr or [g['lr'] for g in schedule.optimizer.param_groups]  # lrs without the noise
        state['plateau'] = {k: getattr(schedule.lr_scheduler, k) for k in _PLATEAU_COUNTERS}
        state['lr_factors'] = [lr / base if base else 1.0 for lr, base in zip(lrs, _group_bases(schedule))]
    return state


def restore_schedule(schedule, saved: Optional[Dict], epoch: int, num_updates: int) -> None:
    """Step ``schedule`` (built from this run's flags) to ``epoch`` / ``num_updates``; a plateau schedule also gets
    back its counters and reductions from ``saved`` (``schedule_state`` of the checkpoint)."""
    if schedule is None:
        return
    if _is_plateau(schedule) and saved and 'plateau' in saved:
        for key, value in saved['plateau'].items():
            setattr(schedule.lr_scheduler, key, value)
        for group, base, factor in zip(schedule.optimizer.param_groups, _group_bases(schedule), saved['lr_factors']):
            group['lr'] = base * factor
        schedule.restore_lr = None
    schedule.step(epoch)  # acts on a schedule stepped per epoch (plateau: its warmup, its noise)
    schedule.step_update(num_updates)  # acts on one stepped per update
