"""The learning rate of every update equals timm train.py's: for every scheduler of timm's create_scheduler_v2, the
trainer's loop (naflex.train.engine.fit on tiny synthetic batches) sets the lr that timm's loop sets at each update
(step_update after each update, step(epoch + 1, metric) after each epoch) with the scheduler built from the same
flags, per epoch and per update, with warmup, cooldown and gradient accumulation; a run stopped mid-epoch and resumed
from its checkpoint continues the same lrs; train.py wires the eval metric, its direction and the noise seed."""
import inspect
import re

import pytest
import torch
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

import naflex
from naflex.train.checkpoint import atomic_save, load_checkpoint, restore_training, training_checkpoint
from naflex.train.cli import build_parser, check_args
from naflex.train.config import SCHEDULERS
from naflex.train.engine import TrainState, Trainer, fit
from naflex.train.optim import create_optimizer
from naflex.train.schedule import create_schedule
from test_ddp import GRIDS, make_packed, take

pytestmark = pytest.mark.filterwarnings('ignore:PlateauLRScheduler is deprecated:FutureWarning')  # timm's side
STEPS_PER_EPOCH = 3
BASE = ['--opt', 'adamw', '--lr', '1e-2', '--weight-decay', '0.05', '--epochs', '5', '--warmup-epochs', '2',
        '--cooldown-epochs', '1', '--min-lr', '1e-4', '--warmup-lr', '1e-3', '--device', 'cpu', '--log-interval', '100']
# flags of each scheduler's own (cycles, noise, k-decay, decay shapes, layer decay for per-group lr scales)
OWN = {
    'cosine': ['--lr-cycle-limit', '2', '--lr-cycle-mul', '1.2', '--lr-k-decay', '2', '--lr-noise', '0.3', '0.7',
               '--lr-noise-pct', '0.5', '--lr-noise-std', '0.8', '--seed', '3'],
    'tanh': ['--lr-cycle-limit', '2', '--lr-cycle-decay', '0.7', '--warmup-prefix'],
    'step': ['--decay-epochs', '2', '--decay-rate', '0.5', '--lr-noise', '0.5'],
    'multistep': ['--decay-milestones', '2', '4', '--decay-rate', '0.3', '--layer-decay', '0.7'],
    'plateau': ['--patience-epochs', '0', '--decay-rate', '0.5', '--lr-noise', '0.6'],
    'poly': ['--decay-rate', '2', '--lr-k-decay', '1.5', '--warmup-prefix'],
    'wsd': ['--decay-epochs', '0.4', '--lr-decay-fn', 'cosine'],
    'rsqrt': ['--lr-stable-timescale', '1', '--warmup-prefix'],
    'constant': ['--layer-decay', '0.8'],
    'none': [],
}
# a metric per epoch for plateau: improves, stalls twice, improves (top1 up, or loss down)
METRICS = [10.0, 20.0, 20.0, 15.0, 30.0, 30.0, 40.0, 40.0, 40.0, 40.0]


def _flags(*argv):
    parser = build_parser()
    args = parser.parse_args(['--data-dir', 'x', *BASE, *argv])
    return args, check_args(args, parser)


class Loader:
    """What fit() needs of the train loader: epochs of STEPS_PER_EPOCH tiny packed batches."""

    def __init__(self):
        batch = make_packed(GRIDS, 0)
        self.batches = [take(batch, [i, i + 1]) for i in range(0, 2 * STEPS_PER_EPOCH, 2)]
        self.start = 0

    def set_epoch(self, epoch):
        pass

    def set_start_step(self, step):
        self.start = step

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches[self.start:])


class Evaluate:
    """evaluate_fn: the metrics of METRICS, one epoch after the other (``first``: the epoch it starts at)."""

    def __init__(self, metric, first=0):
        self.metric, self.epoch = metric, first

    def __call__(self, model):
        value = METRICS[self.epoch % len(METRICS)]
        self.epoch += 1
        return {'top1': value, 'top5': value, 'loss': -value} if self.metric != 'loss' else \
            {'top1': 0.0, 'top5': 0.0, 'loss': 100.0 - value}


class Stop(Exception):
    pass


class StopAt:
    """A callback that saves a training checkpoint at (epoch, step) and stops the run there."""

    def __init__(self, at, path):
        self.at, self.path = at, path

    def after_update(self, trainer, state):
        if (state.epoch, state.step) == self.at:
            atomic_save(training_checkpoint(trainer, state), self.path)
            raise Stop


def _trainer(cfg, updates_per_epoch, callbacks=()):
    """What train.py builds: our optimizer and schedule from the flags, the Trainer (the optimizer's lr at each
    step is recorded in ``trainer.lrs``)."""
    torch.manual_seed(0)
    model = naflex.create_model('naflexvit_tiny_test', num_classes=4)
    optimizer = create_optimizer(model, cfg.optim, cfg.optim.lr)
    schedule, total = create_schedule(cfg.sched, optimizer, updates_per_epoch, seed=cfg.train.seed,
                                      decreasing_metric=cfg.train.eval_metric == 'loss')
    trainer = Trainer(model, optimizer, cfg.train, batch_size_reference=2, schedule=schedule, callbacks=callbacks)
    trainer.lrs, step = [], optimizer.step

    def recorded_step(*a, **k):
        trainer.lrs.append([g['lr'] for g in optimizer.param_groups])
        return step(*a, **k)
    optimizer.step = recorded_step
    return trainer, total


def _timm_lrs(args, updates_per_epoch, due=lambda epoch: True):
    """timm train.py's loop on the same flags, without the training: the lr of each update and the epoch count."""
    torch.manual_seed(0)
    optimizer = create_optimizer_v2(naflex.create_model('naflexvit_tiny_test', num_classes=4),
                                    **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
        updates_per_epoch=updates_per_epoch)
    lrs = []
    for epoch in range(num_epochs):
        num_updates = epoch * updates_per_epoch
        for _ in range(updates_per_epoch):
            lrs.append([g['lr'] for g in optimizer.param_groups])
            num_updates += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=num_updates, metric=1.0)  # the running loss: no scheduler reads it
        if scheduler is not None:
            metric = Evaluate(args.eval_metric, epoch)(None)[args.eval_metric] if due(epoch) else None
            scheduler.step(epoch + 1, metric)
    return lrs, num_epochs


def _cases():
    for sched in SCHEDULERS:
        for on_updates in (False, True):
            if on_updates and sched in ('plateau', 'none'):
                continue  # refused: plateau steps per epoch, none has nothing to step
            for accum in (1, 2):
                yield pytest.param(sched, on_updates, accum, id=f'{sched}-{"update" if on_updates else "epoch"}-'
                                                               f'accum{accum}')


@pytest.mark.parametrize('sched,on_updates,accum', list(_cases()))
def test_lr_of_every_update_equals_timm(sched, on_updates, accum):
    argv = ['--sched', sched, *OWN[sched], '--grad-accum-steps', str(accum)] + (['--sched-on-updates'] * on_updates)
    args, cfg = _flags(*argv)
    updates_per_epoch = -(-STEPS_PER_EPOCH // accum)
    trainer, total = _trainer(cfg, updates_per_epoch)
    want, num_epochs = _timm_lrs(args, updates_per_epoch)
    assert total == num_epochs
    fit(trainer, Loader(), iter, TrainState(), total, evaluate_fn=Evaluate(cfg.train.eval_metric))
    assert len(trainer.lrs) == len(want) == num_epochs * updates_per_epoch
    assert trainer.lrs == want  # exactly: the same scheduler code on the same counts
    assert len({lr[0] for lr in want}) > 2 or sched == 'none'  # the schedule moved


@pytest.mark.parametrize('metric,val_interval', [('top1', 1), ('loss', 1), ('top1', 2)])
def test_plateau_reads_the_eval_metric_as_timm(metric, val_interval):
    """Plateau decays when the metric stalls (max for top1, min for loss); epochs without evaluation step it
    without a metric, as timm's loop does."""
    args, cfg = _flags('--sched', 'plateau', '--patience-epochs', '0', '--decay-rate', '0.5', '--eval-metric', metric,
                       '--val-interval', str(val_interval))
    trainer, total = _trainer(cfg, STEPS_PER_EPOCH)
    evaluate = Evaluate(metric)
    fit(trainer, Loader(), iter, TrainState(), total, evaluate_fn=evaluate)
    due = lambda epoch: (epoch + 1) % val_interval == 0 or epoch + 1 == total  # noqa: E731
    want, _ = _timm_lrs(args, STEPS_PER_EPOCH, due)
    assert trainer.lrs == want
    assert min(lr[0] for lr in want) < 1e-2 / 3  # it decayed


@pytest.mark.parametrize('argv,at', [
    (['--sched', 'cosine', '--sched-on-updates', '--grad-accum-steps', '2', '--lr-noise', '0.2', '0.9'], (2, 2)),
    (['--sched', 'step', '--decay-epochs', '2', '--decay-rate', '0.5'], (3, 1)),
    (['--sched', 'plateau', '--patience-epochs', '0', '--decay-rate', '0.5'], (4, 2)),
    (['--sched', 'wsd', '--sched-on-updates', '--decay-epochs', '0.5', '--lr-noise', '0.4'], (5, 1)),
])
def test_resume_mid_epoch_continues_the_schedule(argv, at, tmp_path):
    """Stopped mid-epoch with a checkpoint (through torch.save / weights_only load) and resumed with a schedule
    rebuilt from the flags: the lrs continue as in the uninterrupted run (plateau: its reductions and counters too,
    which timm does not checkpoint)."""
    args, cfg = _flags(*argv)
    upe = -(-STEPS_PER_EPOCH // cfg.train.grad_accum_steps)
    trainer, total = _trainer(cfg, upe)
    fit(trainer, Loader(), iter, TrainState(), total, evaluate_fn=Evaluate('top1'))
    path = tmp_path / 'stop.pth'
    first, _ = _trainer(cfg, upe, callbacks=[StopAt(at, path)])
    with pytest.raises(Stop):
        fit(first, Loader(), iter, TrainState(), total, evaluate_fn=Evaluate('top1'))
    second, _ = _trainer(cfg, upe)
    state = restore_training(second, load_checkpoint(path), updates_per_epoch=upe, steps_per_epoch=STEPS_PER_EPOCH)
    assert (state.epoch, state.step) == at
    fit(second, Loader(), iter, state, total, evaluate_fn=Evaluate('top1', first=state.epoch))
    assert first.lrs + second.lrs == trainer.lrs
    assert second.lrs[0] != trainer.lrs[0]


def test_every_timm_scheduler_name():
    """SCHEDULERS is the list of names timm's create_scheduler_v2 accepts (read from its source), and the flag
    takes each of them."""
    source = inspect.getsource(create_scheduler_v2)
    names = set(re.findall(r"sched (?:==|!=) '(\w+)'", source))
    names |= {n for group in re.findall(r'sched in \(([^)]*)\)', source) for n in re.findall(r"'(\w+)'", group)}
    assert names == set(SCHEDULERS)
    for name in SCHEDULERS:
        assert _flags('--sched', name)[1].sched.sched == name


def test_train_py_wires_metric_direction_and_noise_seed(demo_dataset, tmp_path):
    """train.py end to end: plateau on the eval top-1 (rising), lr noise seeded by --seed; the lr of every update
    (the logged one) equals timm's loop fed with the run's own eval metrics."""
    import train

    class Lrs:
        def __init__(self):
            self.lrs = []

        def after_update(self, engine, state):
            self.lrs.append(engine.update_lr)

    argv = ['--data-dir', str(demo_dataset), '--model', 'naflexvit_tiny_test', '-b', '4', '-j', '0', '--device',
            'cpu', '--naflex-train-seq-lens', '32', '64', '--naflex-max-seq-len', '64', '--output', str(tmp_path),
            '--opt', 'sgd', '--lr', '0.05', '--epochs', '4', '--warmup-epochs', '1', '--log-interval', '100']
    runs = {'plateau': ['--sched', 'plateau', '--patience-epochs', '0', '--decay-rate', '0.5', '--lr-noise', '0.5',
                        '--seed', '5'],
            'step': ['--sched', 'step', '--decay-epochs', '1', '--lr-noise', '0.3', '--seed', '9', '--sched-on-updates',
                     '--grad-accum-steps', '2']}
    for name, extra in runs.items():
        hooks = Lrs()
        rows = train.main(argv + extra + ['--experiment', name], hooks=hooks)
        args, _ = build_parser().parse_known_args(argv + extra)
        upe = len(hooks.lrs) // len(rows)
        optimizer = create_optimizer_v2(naflex.create_model('naflexvit_tiny_test', num_classes=4),
                                        **optimizer_kwargs(cfg=args))
        scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args, decreasing_metric=False),
                                           updates_per_epoch=upe)
        want = []
        for epoch, row in enumerate(rows):
            for u in range(upe):
                want.append(sum(g['lr'] for g in optimizer.param_groups) / len(optimizer.param_groups))
                scheduler.step_update(epoch * upe + u + 1)
            scheduler.step(epoch + 1, row['eval_top1'])
        assert hooks.lrs == want, name


WARMUP_LINE = ('--warmup-epochs 5 is not shorter than --epochs 3: the whole run is warm-up, the lr climbs from '
               '--warmup-lr 0 towards 1.000e-03 and never reaches it nor decays (epoch 0 trains at lr 0: without '
               '--sched-on-updates the lr steps once per epoch); lower --warmup-epochs, raise --epochs, or add '
               '--warmup-prefix (warm-up before the --epochs)')


@pytest.mark.parametrize('argv, said', [
    (['--epochs', '3', '--warmup-epochs', '5', '--warmup-lr', '0'], WARMUP_LINE),
    (['--epochs', '3', '--warmup-epochs', '3', '--sched-on-updates'],
     '--warmup-epochs 3 is not shorter than --epochs 3: the whole run is warm-up, the lr climbs from --warmup-lr 0.001 '
     'towards 1.000e-03 and never reaches it nor decays; lower'),
    (['--epochs', '3', '--warmup-epochs', '2'], None),
    (['--epochs', '3', '--warmup-epochs', '5', '--warmup-prefix'], None),  # the warm-up comes before the 3 epochs
    (['--epochs', '3', '--warmup-epochs', '5', '--sched', 'none'], None),  # no schedule, no warm-up
])
def test_a_warmup_as_long_as_the_run_is_a_start_up_warning(argv, said, caplog):
    """timm counts the warm-up inside --epochs: as long as the run, the lr never reaches its peak nor decays."""
    import train
    from naflex.train.distributed import DistInfo
    cfg = _flags(*argv)[1]
    with caplog.at_level('WARNING', logger='train'):
        train._trainer(cfg, naflex.create_model('naflexvit_tiny_test', num_classes=4), DistInfo(), 2, 1e-3, None)
    lines = [r.getMessage() for r in caplog.records if '--warmup-epochs' in r.getMessage()]
    assert len(lines) == (said is not None) and all(line.startswith(said) for line in lines)
