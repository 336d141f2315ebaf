"""The training loop: a step (forward, loss, backward, optimizer update), an epoch of steps, and the epoch loop
with evaluation and checkpoints.

A step takes a device batch (packed tokens by default -- NaViT's "patch n' pack", arXiv:2307.06304 -- or
timm's padded layout), runs the model under autocast, computes the loss (soft-target cross-entropy when the
loader produced MixUp/CutMix soft targets, label-smoothing cross-entropy for class indices; timm's
BinaryCrossEntropy with --bce-loss), scales it and back-propagates; every ``grad_accum_steps`` micro-batches the
optimizer updates (timm's gradient clipping, fp16 GradScaler), the EMA follows and the lr schedule advances as in
timm's train.py (per update, and per epoch after evaluation with the metric).

Loss scaling follows timm's ``train.py --naflex-loader``: a step with ``b`` images at sequence length L is
weighted by ``(b / -b)`` (``linear``), its square root (``sqrt``) or 1 (``none``); with several ranks each
rank's loss is also multiplied by ``world * b_rank / b_global`` so that DDP's gradient average weights every
image equally however the images split across ranks.

No host syncs happen between log steps in fp32 and bf16 (naflex.train.metrics keeps the sums on the device); in fp16
the GradScaler reads its inf/NaN flag on the host once per update unless the optimizer is a fused kernel that takes
it on the device (adam, adamw, sgd, momentum; not timm's NAdamW): tests/test_fake_cuda.py counts each case. Exact
resume: each epoch's RNG stream (dropout, drop-path) is seeded from (seed, rank, epoch) once its first batch has
arrived, and a mid-epoch checkpoint carries every rank's RNG state, so a run stopped and resumed repeats an
uninterrupted run bit for bit on the same hardware (tests/test_train.py). A stop asked for on one rank (a signal)
and an error one rank holds (too many undecodable files: naflex.train.bad_files) travel in the log update's
all-reduce, so every rank stops at the same update and none is left waiting in a collective for another.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from naflex.model import batch as B

from . import distributed as D
from .callbacks import Callbacks, StopRequested
from .checkpoint import TrainState, set_rng_state, training_checkpoint, unwrap_model
from .config import TrainConfig
from .logger import ProgressMeter, format_seconds
from .metrics import NonFiniteLossError, TrainMetrics
from .optim import clip_gradients

_logger = logging.getLogger('train')

__all__ = ['NonFiniteLossError', 'StopRequested', 'TrainState', 'Trainer', 'classification_loss', 'fit',
           'log_precision', 'loss_weight', 'make_loss', 'seed_everything', 'train_one_epoch']


def classification_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Soft-target CE for [B, C] float targets (mixup/cutmix, smoothing already inside), else label-smoothing CE:
    timm's SoftTargetCrossEntropy / LabelSmoothingCrossEntropy / CrossEntropyLoss in one fused call each."""
    logits = logits.float()
    if target.is_floating_point():
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, target, label_smoothing=smoothing)


def make_loss(cfg: TrainConfig, device=None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """timm train.py's training loss for these flags, ``loss(logits, target)``. With --bce-loss: timm's
    BinaryCrossEntropy for MixUp/CutMix targets, and for class indices when --smoothing > 0 (one-hot smoothed);
    class indices without smoothing keep plain cross-entropy, as in timm. Otherwise ``classification_loss``."""
    if not cfg.bce_loss:
        return lambda logits, target: classification_loss(logits, target, cfg.smoothing)
    from timm.loss import BinaryCrossEntropy
    kw = dict(target_threshold=cfg.bce_target_thresh, sum_classes=cfg.bce_sum, pos_weight=cfg.bce_pos_weight)
    soft = BinaryCrossEntropy(**kw).to(device)  # MixUp targets come smoothed already
    hard = BinaryCrossEntropy(smoothing=cfg.smoothing, **kw).to(device) if cfg.smoothing else None

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if target.is_floating_point():
            return soft(logits, target)
        return hard(logits, target) if hard is not None else F.cross_entropy(logits, target)
    return loss


def loss_weight(batch_size: int, reference: float, mode: str) -> float:
    """timm's --naflex-loss-scale: weight of a step with ``batch_size`` images relative to ``-b``."""
    if mode == 'none':
        return 1.0
    ratio = batch_size / reference
    return math.sqrt(ratio) if mode == 'sqrt' else ratio


def seed_everything(seed: int, rank: int = 0, epoch: int = 0) -> None:
    """Seed torch / numpy / python RNGs from (seed, rank, epoch)."""
    s = (seed + 1_000_003 * rank + 7_919 * epoch) % (2 ** 31)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


class Trainer:
    """What a training step needs: the model to call (DDP / compiled wrapper allowed), its optimizer and the
    loop's settings (``TrainConfig``), plus the optional schedule, EMA, clipping and callbacks."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, *,
                 batch_size_reference: float, device: Optional[torch.device] = None, schedule=None, ema=None,
                 clip_grad: Optional[float] = None, clip_mode: str = 'norm', world_size: int = 1, rank: int = 0,
                 callbacks=()):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.device = torch.device(device or cfg.device)
        self.batch_size_reference = float(batch_size_reference)  # -b: the loss scale's reference batch
        self.schedule, self.ema = schedule, ema
        self.clip_grad, self.clip_mode = clip_grad, clip_mode
        self.world_size, self.rank = world_size, rank
        self.callbacks = Callbacks(callbacks)
        self.amp_dtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16}[cfg.amp_dtype] if cfg.amp else None
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.loss_fn = make_loss(cfg, self.device)
        self.history: List[Dict] = []  # recent logged (epoch, step, loss) points (tests / analysis)
        self.update_lr = self.lr  # the lr the latest update used (logged like timm: before the schedule steps)

    @property
    def module(self) -> nn.Module:
        return unwrap_model(self.model)

    @property
    def lr(self) -> float:
        lrs = [g['lr'] for g in self.optimizer.param_groups]
        return sum(lrs) / len(lrs)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def backward(self, inputs, target, micro_steps: int, update: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its (unweighted) loss. Gradients are reduced over
        ranks only at the micro-batch that ends an update."""
        images = B.num_images(inputs)
        weight = loss_weight(images, self.batch_size_reference, self.cfg.loss_scale) / micro_steps
        distributed = self.world_size > 1 and hasattr(self.model, 'no_sync')
        with self.model.no_sync() if distributed and not update else contextlib.nullcontext():
            with self.autocast():
                logits = self.model(inputs)
            loss = self.loss_fn(logits, target)
            scaled = loss * weight
            if self.world_size > 1:  # DDP averages over ranks; re-weight so every image counts the same
                global_images = D.all_reduce_sum(torch.full((), float(images), device=self.device))
                scaled = scaled * (self.world_size * images / global_images)
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss

    def update(self, state: TrainState) -> None:
        """Optimizer step (unscale + clip under fp16), EMA, lr schedule; counts the update in ``state``."""
        if self.scaler is not None and self.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad is not None:
            clip_gradients(self.module, self.clip_grad, self.clip_mode)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.update_lr = self.lr
        state.num_updates += 1
        if self.ema is not None:
            self.ema.update(self.module, step=state.num_updates)
        if self.schedule is not None:
            self.schedule.step_update(state.num_updates)  # timm also passes the running loss, which none reads
        if self.cfg.synchronize_step and self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)  # --synchronize-step: step timings then include the device work

    def begin_epoch(self, state: TrainState) -> None:
        """Pin the model's RNG stream (dropout, drop-path) once the epoch's first batch is there (starting
        DataLoader workers draws from the global RNG), so a resumed run replays what an uninterrupted one does."""
        if state.rng is not None:
            set_rng_state(state.rng)
            state.rng = None
        else:
            seed_everything(self.cfg.seed, self.rank, state.epoch)


def log_precision(trainer: Trainer, opt: str) -> None:
    """Say at start-up which precision the run computes in, and what it costs where that is not obvious: float16 on
    the CPU (autocast's default dtype, as in timm) is emulated and runs several times slower than float32 there, and
    on CUDA its loss scaler reads its inf/NaN check on the host at every update unless the optimizer is a fused
    kernel that takes the check on the device (``_step_supports_amp_scaling``)."""
    cfg, device = trainer.cfg, trainer.device
    if trainer.amp_dtype is None:
        _logger.info('precision: float32 (no --amp)')
        return
    scaler = 'with a loss scaler' if trainer.scaler is not None else 'no loss scaler'
    _logger.info(f'precision: {cfg.amp_dtype} autocast (--amp --amp-dtype {cfg.amp_dtype}), {scaler}')
    if trainer.amp_dtype == torch.float16 and device.type == 'cpu':
        _logger.warning('--amp-dtype float16 (--amp\'s default, as in timm) on the CPU: few CPUs compute in float16, '
                        'so autocast runs several times slower than float32 there; use --amp-dtype bfloat16, or drop '
                        '--amp')
    if trainer.scaler is not None and device.type == 'cuda' and not getattr(
            trainer.optimizer, '_step_supports_amp_scaling', False):
        _logger.info(f'--amp-dtype float16 with --opt {opt}: the loss scaler reads its inf/NaN check on the host at '
                     'every update (one device sync per update); bfloat16 needs no scaler, and the fused adam / '
                     'adamw / sgd / momentum kernels take the check on the device')


def _micro_steps(step: int, num_steps: int, accum: int) -> int:
    """Micro-batches in the update that ``step`` belongs to (the epoch's last update may have fewer)."""
    tail = num_steps % accum
    return tail if tail and step >= num_steps - tail else accum


def _log(trainer: Trainer, state: TrainState, step: int, num_steps: int, fig: Dict, win: Dict, writer) -> None:
    """The timm-style 'Train:' line, TensorBoard scalars and the in-memory history of one log point."""
    accum = trainer.cfg.grad_accum_steps
    update_idx, updates = step // accum, (num_steps + accum - 1) // accum
    trainer.history.append({'epoch': state.epoch, 'step': step, 'loss': win['loss'], 'avg': win['avg_loss']})
    del trainer.history[:-10000]
    _logger.info(
        f'Train: {state.epoch} [{update_idx:>4d}/{updates} ({100. * (update_idx + 1) / updates:>3.0f}%)]  '
        f'Loss: {win["loss"]:#.3g} ({win["avg_loss"]:#.3g})  LR: {trainer.update_lr:.3e}  '
        f'{fig["images_per_s"]:.1f} img/s  {fig["tokens_per_s"]:.0f} tok/s  data wait {100 * fig["data_wait"]:.0f}%  '
        f'ETA {format_seconds(fig["eta_s"])}')
    if writer is not None:
        writer.scalars({'train/loss': win['window_loss'], 'train/lr': trainer.update_lr, **{
            f'train/{k}': fig[k] for k in ('images_per_s', 'tokens_per_s', 'data_wait')}}, state.num_updates)


def _stop_on_failure(trainer: Trainer, failed: Optional[bool] = None) -> None:
    """Raise the error a callback holds (``failure()``; e.g. too many undecodable files) on every rank at once.
    ``failed``: whether any rank holds one, as the log update's all-reduce says; None asks the ranks with one tiny
    all-reduce (before a recovery save, which waits for the device anyway)."""
    error = trainer.callbacks.failure()
    if trainer.world_size == 1:
        if error is not None:
            raise error
        return
    if failed is None:
        failed = D.all_reduce_sum(torch.tensor(float(error is not None), device=trainer.device)).item() > 0
    if failed:
        raise D.first_failure(error)


def train_one_epoch(trainer: Trainer, batches, num_steps: int, state: TrainState,
                    save_recovery: Optional[Callable[[TrainState], None]] = None, writer=None) -> Dict[str, float]:
    """Train ``state.epoch`` from batch ``state.step`` to ``num_steps`` over the device batch iterator ``batches``
    (yielding (inputs, target) already on the device and normalized, starting at batch ``state.step``).
    Updates ``state`` in place; returns epoch metrics (identical on all ranks)."""
    cfg, accum = trainer.cfg, trainer.cfg.grad_accum_steps
    state.steps_per_epoch = num_steps
    trainer.model.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    metrics = TrainMetrics(trainer.device, num_steps, trainer.world_size, start=state.epoch_sums)
    meter = ProgressMeter(num_steps, start_step=state.step, show_bar=None if trainer.rank == 0 else False,
                          carried=state.epoch_sums)
    state.epoch_sums = None
    check_finite = lambda: metrics.check_finite(state.epoch, state.num_updates, trainer.lr)  # noqa: E731
    it, stop, start = iter(batches), False, state.step
    for step in range(start, num_steps):
        t0 = time.perf_counter()
        inputs, target = next(it, (None, None))
        if inputs is None:
            raise RuntimeError(f'loader ended after {step} of {num_steps} steps in epoch {state.epoch}')
        meter.add_wait(time.perf_counter() - t0)
        if step == start:
            trainer.begin_epoch(state)
        last = step == num_steps - 1
        update = (step + 1) % accum == 0 or last
        num_bad = len(B.pop_bad_files(inputs))  # files the loader replaced in this step (summary.csv counts them)
        metrics.add(step, trainer.backward(inputs, target, _micro_steps(step, num_steps, accum), update), inputs,
                    num_bad)
        if not update:
            continue
        trainer.update(state)
        state.step = step + 1
        if (step // accum) % cfg.log_interval == 0 or last:
            check_finite()
            meter.clear_bar()
            win = metrics.read_window(trainer.callbacks.wants_stop(), trainer.callbacks.failure() is not None)
            _stop_on_failure(trainer, win['failed'])
            stop = win['stop']  # the same on every rank: all stop at this update
            _log(trainer, state, step, num_steps, meter.window(step, tokens=win['tokens'], images=win['images']),
                 win, writer)
        else:
            meter.bar(step)
        stop = stop or (trainer.world_size == 1 and trainer.callbacks.wants_stop())
        recover = cfg.recovery_interval and (step // accum + 1) % cfg.recovery_interval == 0
        if (stop or recover) and not last and save_recovery is not None:
            check_finite()
            _stop_on_failure(trainer)  # nothing is saved after a failure
            state.epoch_sums = dict(metrics.state_dict(), **meter.state_dict())  # carried by the checkpoint
            save_recovery(state)
            state.epoch_sums = None
        if stop and not last:
            signum = trainer.callbacks.stop_signal()
            raise StopRequested(f'stopped on {signum.name} at epoch {state.epoch} step {state.step}/{num_steps} '
                                'after saving a recovery checkpoint; continue with --resume auto', signum)
        stop = False
        trainer.callbacks.after_update(trainer, state)
    check_finite()
    if hasattr(trainer.optimizer, 'sync_lookahead'):  # --opt lookahead_*: as timm, at the end of each epoch
        trainer.optimizer.sync_lookahead()
    meter.clear_bar()
    totals = dict(metrics.read_epoch(trainer.callbacks.wants_stop()), **meter.epoch_totals(), lr=trainer.lr)
    return dict(totals, images_per_s=totals['images'] / totals['time_s'],  # the whole epoch's, resumed or not
                tokens_per_s=totals['tokens'] / totals['time_s'])


def _evaluate(trainer: Trainer, evaluate_fn: Callable, epoch: int) -> Dict:
    """Evaluate the model (and the EMA, whose metric then picks the best checkpoints, as timm); the row cells."""
    ev = evaluate_fn(trainer.model)
    row = {'eval_loss': ev['loss'], 'eval_top1': ev['top1'], 'eval_top5': ev['top5']}
    metric = ev[trainer.cfg.eval_metric]
    if trainer.ema is not None:
        ev_ema = evaluate_fn(trainer.ema.module)
        row.update(ema_loss=ev_ema['loss'], ema_top1=ev_ema['top1'], ema_top5=ev_ema['top5'])
        metric = ev_ema[trainer.cfg.eval_metric]
    _logger.info(f'Eval: {epoch}  loss {ev["loss"]:.4f}  top1 {ev["top1"]:.3f}  top5 {ev["top5"]:.3f}'
                 + (f'  (EMA top1 {row["ema_top1"]:.3f})' if trainer.ema is not None else ''))
    return dict(row, metric=metric)


def fit(trainer: Trainer, train_loader, to_device: Callable, state: TrainState, total_epochs: int,
        evaluate_fn: Optional[Callable] = None, saver=None, writer=None,
        checkpoint_meta: Optional[Dict] = None) -> List[Dict]:
    """The epoch loop: train, evaluate every ``val_interval`` epochs (model and EMA), write summary.csv,
    TensorBoard and checkpoints, until ``total_epochs``. Returns the per-epoch result rows.

    ``train_loader`` is the CPU loader (``set_epoch``/``set_start_step``/``len``), ``to_device`` wraps it into a
    device batch iterator, ``evaluate_fn(model) -> metrics`` runs the shared eval loop, ``saver`` is a
    checkpoint.CheckpointManager on the primary rank (None elsewhere), ``checkpoint_meta`` goes into every
    checkpoint ('arch', 'args').
    """
    cfg, results = trainer.cfg, []

    def save_recovery(st: TrainState):
        ckpt = training_checkpoint(trainer, st, checkpoint_meta)  # every rank (RNG gather)
        if saver is not None:
            _logger.info(f'saved recovery checkpoint {saver.save_recovery(ckpt, st.epoch, st.step).name}')

    for epoch in range(state.epoch, total_epochs):
        state.epoch = epoch
        train_loader.set_epoch(epoch)
        train_loader.set_start_step(state.step)
        train = train_one_epoch(trainer, to_device(train_loader), len(train_loader), state, save_recovery, writer)
        state.epoch, state.step = epoch + 1, 0
        row = {'epoch': epoch, 'train_loss': train['loss'], 'eval_loss': None, 'eval_top1': None, 'eval_top5': None}
        if trainer.ema is not None:
            row.update(ema_loss=None, ema_top1=None, ema_top5=None)
        metric = None
        due = (epoch + 1) % cfg.val_interval == 0 or epoch + 1 == total_epochs
        if evaluate_fn is not None and due:
            row.update(_evaluate(trainer, evaluate_fn, epoch))
            metric = row.pop('metric')
        if trainer.schedule is not None:  # as timm: the eval metric (the train loss without evaluation), or none
            trainer.schedule.step(epoch + 1, (metric if evaluate_fn is not None else train['loss']) if due else None)
        row.update({k: train[k] for k in ('lr', 'images_per_s', 'tokens_per_s', 'data_wait')})
        row.update(train_images=int(train['images']), train_tokens=int(train['tokens']), bad_files=train['bad_files'])
        if writer is not None:
            writer.summary(row)
            writer.scalars({f'epoch/{k}': v for k, v in row.items() if k != 'epoch'}, epoch)
        ckpt = training_checkpoint(trainer, state, checkpoint_meta)
        if saver is not None:
            saver.save_epoch(ckpt, epoch, metric)
            if saver.best[0] is not None:
                _logger.info(f'checkpoint saved; best {cfg.eval_metric} {saver.best[0]:.4f} (epoch {saver.best[1]})')
        results.append(row)
        # a signal that came during evaluation stops here too, at the checkpoint just written (one process:
        # with several, the ranks only agree on a stop at a training update)
        signalled = train['stop'] or (trainer.world_size == 1 and trainer.callbacks.wants_stop())
        if signalled and epoch + 1 < total_epochs:
            signum = trainer.callbacks.stop_signal()
            raise StopRequested(f'stopped on {signum.name} after epoch {epoch} (checkpoint saved); continue with '
                                '--resume auto', signum)
        _logger.info(f'epoch {epoch} done in {format_seconds(train["time_s"])}; {train["bad_files"]} undecodable '
                     f'files replaced; run ETA {format_seconds(train["time_s"] * (total_epochs - epoch - 1))}')
        if trainer.callbacks.after_epoch(state):
            break
    return results
