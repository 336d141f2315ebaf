"""Our warmup+cosine schedule equals timm's CosineLRScheduler (built by create_scheduler_v2) on a grid of steps."""
import pytest
import torch
from timm.scheduler import create_scheduler_v2

from naflex.train.config import ScheduleConfig
from naflex.train.schedule import WarmupCosineSchedule, create_schedule


def _opt(lr=3e-4, lr_scales=(1.0,)):
    groups = [{'params': [torch.nn.Parameter(torch.zeros(1))], 'lr_scale': s} for s in lr_scales]
    return torch.optim.SGD(groups, lr=lr)


CASES = [
    # epochs, warmup, warmup_lr, min_lr, cooldown, on_updates, upe, warmup_prefix
    (300, 5, 0.0, 0.0, 0, True, 37, False),     # the card: per-update, warmup from 0
    (10, 2, 1e-5, 1e-6, 0, False, 1, False),    # per epoch, timm default warmup lr
    (8, 3, 1e-5, 1e-5, 2, True, 5, False),      # cooldown tail at min lr
    (6, 2, 0.0, 1e-6, 1, True, 4, True),        # warmup prefix
    (5, 0, 0.0, 0.0, 0, True, 3, False),        # no warmup
]


@pytest.mark.parametrize('epochs,warmup,warmup_lr,min_lr,cooldown,on_updates,upe,prefix', CASES)
def test_matches_timm(epochs, warmup, warmup_lr, min_lr, cooldown, on_updates, upe, prefix):
    ours_opt, timm_opt = _opt(lr_scales=(1.0, 0.5)), _opt(lr_scales=(1.0, 0.5))
    ours = WarmupCosineSchedule(
        ours_opt, epochs=epochs, updates_per_epoch=upe, on_updates=on_updates, warmup_epochs=warmup,
        warmup_lr=warmup_lr, min_lr=min_lr, cooldown_epochs=cooldown, warmup_prefix=prefix)
    ref, ref_epochs = create_scheduler_v2(
        timm_opt, sched='cosine', num_epochs=epochs, warmup_epochs=warmup, warmup_lr=warmup_lr, min_lr=min_lr,
        cooldown_epochs=cooldown, warmup_prefix=prefix, step_on_epochs=not on_updates, updates_per_epoch=upe)
    args = ScheduleConfig(
        epochs=epochs, warmup_epochs=warmup, warmup_prefix=prefix, cooldown_epochs=cooldown, sched='cosine',
        on_updates=on_updates, warmup_lr=warmup_lr, min_lr=min_lr)
    assert create_schedule(args, _opt(), upe)[1] == ref_epochs
    # initial lr (before any step) matches too
    assert [g['lr'] for g in ours_opt.param_groups] == pytest.approx([g['lr'] for g in timm_opt.param_groups])
    total = ref_epochs * (upe if on_updates else 1)
    grid = sorted(set(list(range(0, min(total, 40))) + list(range(0, total + 5, max(1, total // 97)))))
    for t in grid:
        if on_updates:
            ours.step_update(t), ref.step_update(t)
        else:
            ours.step(t), ref.step(t)
        got = [g['lr'] for g in ours_opt.param_groups]
        want = [g['lr'] for g in timm_opt.param_groups]
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), f't={t}'


def test_epoch_schedule_ignores_update_steps():
    opt = _opt()
    s = WarmupCosineSchedule(opt, epochs=10, warmup_epochs=2, warmup_lr=0.0, on_updates=False)
    s.step_update(5)
    assert opt.param_groups[0]['lr'] == 0.0
    s.step(1)
    assert opt.param_groups[0]['lr'] == pytest.approx(1.5e-4)
