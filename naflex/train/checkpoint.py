"""Checkpoints: atomic writes, last/best/recovery files, full-state resume and weights-only starts.

Files in the run folder (names as timm's ``CheckpointSaver``):
- ``last.pth`` after every epoch; ``checkpoint-<epoch>.pth`` for the best ``--checkpoint-hist`` epochs by
  ``--eval-metric`` and ``model_best.pth`` (hard links to that epoch's ``last.pth`` inode, so no extra writes);
- ``recovery-<epoch>-<step>.pth`` every ``--recovery-interval`` updates mid-epoch (older ones removed, all
  of them removed once the epoch's ``last.pth`` exists).

Every write goes to a temporary file in the same folder, is fsync'ed and then renamed over the target, so
an interrupted or failed save (SIGKILL, full disk) leaves the previous file intact; a failed save removes its
temporary file and raises ``WriteError``, one line naming the file and the cause (``writing`` gives the other
files of the run folder the same error).

A checkpoint holds the model (``state_dict``, timm's layout and names, so timm and ``validate.py`` read it),
``optimizer``, ``scheduler``, ``state_dict_ema``, ``scaler``, ``args``, ``metric`` and ``train_state``
(next epoch, batches already done in it, optimizer updates so far, per-rank RNG states, best history; mid-epoch
also every rank's running sums of the epoch, ``epoch_sums``):
enough to continue a run exactly where it stopped. It loads with ``torch.load(weights_only=True)``.
"""
import argparse
import contextlib
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from naflex.model import load_into
from naflex.model.big_vision import load_npz
from naflex.model.factory import published_state_dict
from naflex.model.weights import EMA_KEYS, is_npz, read_file, state_dict_from

from .schedule import restore_schedule, schedule_state

_logger = logging.getLogger(__name__)

LAST = 'last.pth'
BEST = 'model_best.pth'
_RECOVERY_RE = re.compile(r'^recovery-(\d+)-(\d+)\.pth$')


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class WriteError(OSError):
    """A file of the run could not be written (full disk, read-only or vanished folder): one line naming it."""


def _os_cause(e: BaseException) -> Optional[OSError]:
    """The OSError behind ``e``: itself, or one it was raised from or during (torch.save reports a failed write
    as a RuntimeError from its zip writer, 'unexpected pos ...', raised while handling the OSError)."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


@contextlib.contextmanager
def writing(path, what: str = 'file', kept: str = ''):
    """Turn a failed write of ``path`` into ``WriteError('could not write {what} {path}: {cause}{kept}')``."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        cause = _os_cause(e)
        if cause is None:
            raise
        error = WriteError(f'could not write {what} {path}: {cause.strerror or cause}{kept}')
        error.errno = cause.errno
        raise error from None


def atomic_write(path, write: Callable[[BinaryIO], None], what: str = 'file') -> None:
    """Write ``path`` with ``write(binary file)`` via temp file + fsync + rename: the old file survives any
    failure (WriteError, one line), and no temp file is left."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    kept = f' (the previous {path.name} is unchanged)' if path.exists() else ''
    with writing(path, what, kept):
        try:
            with open(tmp, 'wb') as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_save(obj, path) -> None:
    """torch.save ``obj`` to ``path`` atomically (``atomic_write``)."""
    atomic_write(path, lambda f: torch.save(obj, f), 'checkpoint')


def _atomic_link(src: Path, dst: Path) -> None:
    """Make ``dst`` another name of ``src``'s current contents (hard link, copy where links are unsupported)."""
    tmp = dst.with_name(f'.{dst.name}.tmp-{os.getpid()}')
    with writing(dst, 'checkpoint'):
        try:
            tmp.unlink(missing_ok=True)
            try:
                os.link(src, tmp)
            except OSError:
                import shutil
                shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
    _fsync_dir(dst.parent)


def rng_state() -> Dict:
    """This process's RNG states (torch CPU/CUDA, numpy, python) in weights_only-loadable types."""
    np_state = np.random.get_state()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        'python': random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers (its state_dict has timm's names)."""
    while True:
        if hasattr(model, 'module') and isinstance(model.module, nn.Module) and type(model).__name__ in (
                'DistributedDataParallel', 'DataParallel'):
            model = model.module
        elif hasattr(model, '_orig_mod'):
            model = model._orig_mod
        else:
            return model


def _log_skipped_head(model: nn.Module, skipped) -> None:
    if skipped:
        _logger.info(f'classifier {skipped} re-initialized for {getattr(model, "num_classes", "?")} classes')


def load_weights(model: nn.Module, path, use_ema: bool = True) -> Tuple[str, List[str]]:
    """Weights-only start (``--initial-checkpoint`` / ``--pretrained-path``) from our, timm's or a safetensors
    file, its EMA copy when ``use_ema`` and it has one (timm's ``load_checkpoint`` default); a classifier of
    another shape (other ``--num-classes``) keeps its fresh initialization. Returns the copy read ('ema' or
    'plain') and the classifier keys left at their initialization. A JAX / Flax ``.npz`` file is read for this
    model as timm's ``load_checkpoint`` reads it (``naflex.model.big_vision``)."""
    if is_npz(path):
        return 'plain', [k for k in load_npz(model, path) if k.startswith('head.')]
    obj = read_file(path)
    state = state_dict_from(obj, use_ema=use_ema, path=os.fspath(path))
    ema = use_ema and isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in EMA_KEYS)
    return ('ema' if ema else 'plain'), load_into(model, state, source=f'checkpoint {path}', reinit_head=True)


def load_published_weights(model: nn.Module, name: str) -> str:
    """``--pretrained``: the weights ``name`` carries (``architecture[.tag]`` or ``hf-hub:timm/NAME.TAG``: published
    ones, through the Hugging Face cache; ``local-dir:PATH``: the folder's weights file), loaded like
    ``load_weights``; returns where they came from ('hf-hub:<repo>' or the file). ``HubUnavailable`` when neither
    cached nor reachable, FileNotFoundError / ValueError for a name without weights or weights that do not fit."""
    state, source = published_state_dict(name)
    _log_skipped_head(model, load_into(model, state, source=source, reinit_head=True))
    return source


def _recorded_args(ckpt) -> Dict:
    """The flags a training checkpoint records: ours keep 'args' as a dict, timm's train.py as an
    argparse.Namespace; {} for a checkpoint that does not say (a plain state dict)."""
    args = ckpt.get('args') if isinstance(ckpt, dict) else None
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    return args if isinstance(args, dict) else {}


def recorded_model(ckpt) -> Tuple[str, Dict]:
    """(architecture, --model-kwargs) a training checkpoint was built with; ('', {}) when it does not say."""
    if not isinstance(ckpt, dict):
        return '', {}
    args = _recorded_args(ckpt)
    kwargs = args.get('model_kwargs')
    arch = ckpt.get('arch')
    if not (isinstance(arch, str) and arch):
        arch = args.get('model')  # a checkpoint without 'arch' may still name its model among its flags
    return (arch if isinstance(arch, str) else ''), (dict(kwargs) if isinstance(kwargs, dict) else {})


def recorded_classes(ckpt) -> Optional[List[str]]:
    """The class names, in index order, a training checkpoint records ('class_names'); None when it records none:
    timm's, a plain state dict, one trained on tar shards that name classes by index only, or one of ours written
    before names were recorded (``sorted_class_order`` tells those)."""
    names = ckpt.get('class_names') if isinstance(ckpt, dict) else None
    return [str(n) for n in names] if isinstance(names, (list, tuple)) and names else None


def sorted_class_order(ckpt) -> bool:
    """True for a checkpoint of ours written before checkpoints recorded class names (format version 2): its class
    indices are the class-folder names in ``sorted()`` order, not timm's natural order used since."""
    return isinstance(ckpt, dict) and ckpt.get('version') == 2 and 'train_state' in ckpt


def sorted_order_of(dataset) -> Optional[List[str]]:
    """The dataset's class names in ``sorted()`` order (the order of a ``sorted_class_order`` checkpoint) when they
    are names and that order differs from the dataset's own; None otherwise (the dataset is right as it is)."""
    if not getattr(dataset, 'class_names_known', True):
        return None
    order = sorted(dataset.classes)
    return order if order != list(dataset.classes) else None


def find_resume(output_dir) -> Optional[Path]:
    """``--resume auto``: the newest of last.pth and recovery-*.pth in the run folder, or None."""
    out = Path(output_dir)
    cands = [p for p in [out / LAST, *out.glob('recovery-*.pth')] if p.is_file()]
    return max(cands, key=lambda p: p.stat().st_mtime_ns) if cands else None


def load_checkpoint(path) -> Dict:
    """Full training checkpoint (for ``--resume``); FileNotFoundError / ValueError, one line each."""
    if not Path(path).is_file():
        raise FileNotFoundError(f'--resume {path}: no such checkpoint')
    return read_file(path)


class CheckpointManager:
    """Writes last/best/recovery checkpoints in ``out_dir`` (call only on the primary rank)."""

    def __init__(self, out_dir, max_history: int = 10, decreasing: bool = False):
        self.out_dir = Path(out_dir)
        self.max_history = max_history
        self.decreasing = decreasing
        self.history: List[Tuple[float, int]] = []  # (metric, epoch), best first
        for stale in self.out_dir.glob('.*.tmp-*'):  # left by a process killed mid-save
            stale.unlink(missing_ok=True)

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.decreasing else a > b

    @property
    def best(self) -> Tuple[Optional[float], Optional[int]]:
        return self.history[0] if self.history else (None, None)

    def save_epoch(self, state: Dict, epoch: int, metric: Optional[float]) -> None:
        """Write last.pth for a finished epoch; keep it as checkpoint-<epoch>.pth if it ranks in the top N."""
        state = dict(state, metric=metric, best_history=[list(h) for h in self.history])
        last = self.out_dir / LAST
        ranks = metric is not None and (len(self.history) < self.max_history
                                        or self._better(metric, self.history[-1][0]))
        if ranks:
            hist = sorted(self.history + [(metric, epoch)], key=lambda h: h[0], reverse=not self.decreasing)
            state['best_history'] = [list(h) for h in hist[:self.max_history]]
        atomic_save(state, last)
        if ranks:
            self.history = [tuple(h) for h in state['best_history']]
            _atomic_link(last, self.out_dir / f'checkpoint-{epoch}.pth')
            for _, old_epoch in hist[self.max_history:]:
                (self.out_dir / f'checkpoint-{old_epoch}.pth').unlink(missing_ok=True)
            if self.history[0][1] == epoch:
                _atomic_link(last, self.out_dir / BEST)
        for p in self.out_dir.glob('recovery-*.pth'):
            p.unlink(missing_ok=True)

    def save_recovery(self, state: Dict, epoch: int, step: int) -> Path:
        """Mid-epoch save; ``step`` = batches of ``epoch`` already trained. Older recovery files are removed."""
        path = self.out_dir / f'recovery-{epoch}-{step}.pth'
        atomic_save(dict(state, best_history=[list(h) for h in self.history]), path)
        for p in self.out_dir.glob('recovery-*.pth'):
            if p != path and _RECOVERY_RE.match(p.name):
                p.unlink(missing_ok=True)
        return path

    def restore(self, ckpt: Dict, written_in=None, metric_name: str = 'metric') -> None:
        """Continue the ranking of best epochs that ``ckpt`` records, when it was written in this folder
        (``written_in``; None: here): the files it names are here. A checkpoint of another run folder starts the
        ranking afresh, so model_best.pth, checkpoint-<epoch>.pth and the best the log reports are epochs trained in
        this folder; one line says where the resumed run's best stays."""
        history = [tuple(h) for h in ckpt.get('best_history', [])]
        if written_in is None or Path(written_in).resolve() == self.out_dir.resolve():
            self.history = history
            return
        self.history = []
        if history:
            (metric, epoch), best = history[0], Path(written_in) / BEST
            where = best if best.exists() else Path(written_in)
            _logger.info(f'--resume from another run folder: the best epochs are ranked afresh in {self.out_dir} '
                         f'(model_best.pth and the best reported are epochs trained here); the resumed run\'s best, '
                         f'{metric_name} {metric:.4f} at epoch {epoch}, stays in {where}')


@dataclass
class TrainState:
    """Where the run is: ``epoch`` being trained, ``step`` batches of it done, optimizer updates so far."""
    epoch: int = 0
    step: int = 0
    num_updates: int = 0
    rng: Optional[Dict] = None  # RNG state to continue a mid-epoch resume with (else seeded per epoch)
    # this rank's running sums of the epoch so far (loss, images, tokens, time): the epoch's summary row of a
    # run resumed mid-epoch then covers the whole epoch, as an uninterrupted run's does
    epoch_sums: Optional[Dict] = None
    steps_per_epoch: Optional[int] = None  # the loader's, set by the loop: a resume checks it is the same

    def state_dict(self) -> Dict:
        return {'epoch': self.epoch, 'step': self.step, 'num_updates': self.num_updates,
                'steps_per_epoch': self.steps_per_epoch}


def training_checkpoint(trainer, state: TrainState, meta: Optional[Dict] = None) -> Dict:
    """The full training state of a ``naflex.train.engine.Trainer`` for CheckpointManager (call on every rank:
    the RNG states are gathered). ``meta``: 'arch', 'args' (the resolved flags) and 'class_names' (index order) to
    store alongside."""
    per_rank = (rng_state(), state.epoch_sums if state.step else None)
    if trainer.world_size > 1:
        import torch.distributed as dist
        gathered = [None] * trainer.world_size
        dist.all_gather_object(gathered, per_rank)
    else:
        gathered = [per_rank]
    ckpt = dict(meta or {}, **{
        'epoch': state.epoch - 1 if state.step == 0 else state.epoch,
        'state_dict': trainer.module.state_dict(),
        'optimizer': trainer.optimizer.state_dict(),
        'train_state': dict(state.state_dict(), world_size=trainer.world_size,
                            grad_accum_steps=trainer.cfg.grad_accum_steps),
        'rng': [rng for rng, _ in gathered],
        'version': 3,  # 3: 'class_names' in meta when the classes have names; 2: classes in sorted() order
    })
    if state.step and all(sums is not None for _, sums in gathered):
        ckpt['epoch_sums'] = [sums for _, sums in gathered]
    if trainer.schedule is not None:
        ckpt['scheduler'] = schedule_state(trainer.schedule)
    if trainer.scaler is not None:
        ckpt['scaler'] = trainer.scaler.state_dict()
    if trainer.ema is not None:
        ckpt['state_dict_ema'] = trainer.ema.module.state_dict()
    return ckpt


def _resume_state(ckpt: Dict, world_size: int, accum: int, updates_per_epoch: Optional[int],
                  steps_per_epoch: Optional[int]) -> TrainState:
    ts = ckpt.get('train_state')
    if ts is None:  # timm checkpoint: 'epoch' is the last finished epoch
        epoch = ckpt.get('epoch', -1) + 1
        ts = {'epoch': epoch, 'step': 0, 'num_updates': epoch * (updates_per_epoch or 0)}
    state = TrainState(epoch=ts['epoch'], step=ts['step'], num_updates=ts['num_updates'])
    # The loader's step plan depends on the number of processes, -b / --naflex-train-seq-lens and the dataset
    # (steps per epoch), and updates per epoch also on --grad-accum-steps: under another plan a mid-epoch position
    # means nothing, so the epoch restarts, and the schedule goes to the start of the epoch under the new plan.
    before = {'processes': ts.get('world_size', world_size), 'steps per epoch': ts.get('steps_per_epoch'),
              '--grad-accum-steps': ts.get('grad_accum_steps', accum)}
    now = {'processes': world_size, 'steps per epoch': steps_per_epoch, '--grad-accum-steps': accum}
    changed = [f'{k} {before[k]} -> {now[k]}' for k in now if None not in (before[k], now[k]) and before[k] != now[k]]
    if changed:
        restart = f'restarting epoch {state.epoch} from its first step; ' if state.step else ''
        _logger.warning(f'the checkpoint was written with another step plan ({", ".join(changed)}): {restart}'
                        f'the lr schedule continues from the start of epoch {state.epoch}')
        if updates_per_epoch:
            state.num_updates = state.epoch * updates_per_epoch
        else:  # the updates done in the unfinished epoch do not count
            old_accum = before['--grad-accum-steps']
            state.num_updates -= (state.step + old_accum - 1) // old_accum
        state.step = 0
    return state


# param-group entries that count an optimizer's progress rather than set it (timm's Lamb and Adan keep their step
# there, Lookahead its step towards the next slow update): they come from the checkpoint
_GROUP_PROGRESS = ('step', 'lookahead_step')


def _load_optimizer(optimizer: torch.optim.Optimizer, saved: Dict) -> None:
    """The checkpoint's optimizer state (moments, step counts) under this run's hyperparameters: lr, weight
    decay, betas, eps, momentum, layer-decay scales come from the flags (a changed --lr on resume applies)."""
    configured = [{k: v for k, v in group.items() if k != 'params' and k not in _GROUP_PROGRESS}
                  for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f'the optimizer state in the checkpoint does not fit this {type(optimizer).__name__} '
                         f'({e}); pass --no-resume-opt to resume the weights only') from None
    for group, mine in zip(optimizer.param_groups, configured):
        group.update(mine)


def restore_training(trainer, ckpt: Dict, load_optimizer: bool = True, updates_per_epoch: Optional[int] = None,
                     steps_per_epoch: Optional[int] = None, opt: Optional[str] = None) -> TrainState:
    """Load a ``training_checkpoint`` dict (or a timm train.py checkpoint) into the trainer; returns the state to
    continue from. The trainer's optimizer hyperparameters and schedule (built from this run's flags) are kept:
    only the weights, the optimizer's per-parameter state, EMA, grad scaler, position and RNG come from the file.
    A mid-epoch checkpoint written under another step plan (number of ranks, steps per epoch) restarts its epoch.
    ``opt``: this run's --opt; the optimizer state of a checkpoint that records another one is refused (it would
    load, and fail at the first step)."""
    saved_opt = _recorded_args(ckpt).get('opt')
    if load_optimizer and opt and isinstance(saved_opt, str) and saved_opt.lower() != opt.lower():
        raise ValueError(f'the optimizer state in the checkpoint is --opt {saved_opt}\'s, this run uses --opt {opt}; '
                         'pass --no-resume-opt to resume the weights only')
    load_into(trainer.module, state_dict_from(ckpt, use_ema=False), source='the checkpoint')
    if load_optimizer and 'optimizer' in ckpt:
        _load_optimizer(trainer.optimizer, ckpt['optimizer'])
    if trainer.ema is not None:
        if 'state_dict_ema' in ckpt:
            load_into(trainer.ema.module, state_dict_from(ckpt['state_dict_ema']), source='the checkpoint\'s EMA')
        else:  # --model-ema added on resume: start the average from the resumed weights, not the random init
            _logger.warning('the checkpoint holds no EMA weights: the EMA starts from the resumed model')
            trainer.ema.module.load_state_dict(trainer.module.state_dict())
    if trainer.scaler is not None and 'scaler' in ckpt and load_optimizer:
        trainer.scaler.load_state_dict(ckpt['scaler'])
    state = _resume_state(ckpt, trainer.world_size, trainer.cfg.grad_accum_steps, updates_per_epoch, steps_per_epoch)
    rngs, sums = ckpt.get('rng') or [], ckpt.get('epoch_sums') or []
    if state.step and trainer.rank < len(rngs):
        state.rng = rngs[trainer.rank]  # applied when the resumed epoch starts (Trainer.begin_epoch)
    if state.step and trainer.rank < len(sums):
        state.epoch_sums = sums[trainer.rank]  # the resumed epoch's metrics start from them
    # the schedule's base lrs are this run's (--lr): the position comes from the file (and plateau's counters)
    restore_schedule(trainer.schedule, ckpt.get('scheduler'), state.epoch, state.num_updates)
    return state
