"""Training engine: one epoch of NaFlex training steps, and the epoch loop with evaluation and checkpoints.

A step takes a device batch (packed tokens by default -- NaViT's "patch n' pack", arXiv:2307.06304 -- or
timm's padded layout), runs the model under autocast, computes the loss (soft-target cross-entropy when the
loader produced MixUp/CutMix soft targets, label-smoothing cross-entropy for class indices), scales it and
back-propagates; every ``--grad-accum-steps`` micro-batches the optimizer updates (gradient clipping, fp16
GradScaler), the EMA follows and the per-update lr schedule advances.

Loss scaling follows timm's ``train.py --naflex-loader``: a step with ``b`` images at sequence length L
is weighted by ``(b / -b)`` (``linear``), its square root (``sqrt``) or 1 (``none``); with several ranks
each rank's loss is also multiplied by ``world * b_rank / b_global`` so that DDP's gradient average weights
every image equally however the images split across ranks.

No host syncs happen between log steps: losses, image and token counts and the first non-finite step
are accumulated on the device and read every ``--log-interval`` updates (and before any checkpoint is
written, so a non-finite loss never reaches a saved file).

Exact resume: each epoch's RNG stream (dropout, drop-path) is seeded from (seed, rank, epoch) once its first
batch has arrived, and a mid-epoch checkpoint carries every rank's RNG state, so a run stopped and resumed
(after an epoch or a recovery save, even SIGKILLed) repeats an uninterrupted run bit for bit on the same
hardware (tests/test_train.py).
"""
import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from naflex import distributed as D
from naflex.checkpoint import rng_state, set_rng_state, unwrap_model
from naflex.evaluate import count_valid_tokens
from naflex.logger import ProgressMeter, format_seconds
from naflex.optim import clip_gradients

_logger = logging.getLogger('train')


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the message names the step, sequence length and batch size."""


class StopRequested(RuntimeError):
    """SIGTERM (preemption) was received; a checkpoint to resume from has been written."""


@dataclass
class TrainState:
    """Where the run is: ``epoch`` being trained, ``step`` batches of it done, optimizer updates so far."""
    epoch: int = 0
    step: int = 0
    num_updates: int = 0
    rng: Optional[Dict] = None  # RNG state to continue a mid-epoch resume with (else seeded per epoch)

    def state_dict(self) -> Dict:
        return {'epoch': self.epoch, 'step': self.step, 'num_updates': self.num_updates}


@dataclass
class Engine:
    """Everything a training step needs (built by train.py)."""
    model: nn.Module                      # the module to call (DDP and/or compiled wrapper)
    optimizer: torch.optim.Optimizer
    device: torch.device
    schedule: Optional[object] = None     # naflex.schedule.WarmupCosineSchedule
    amp_dtype: Optional[torch.dtype] = None
    scaler: Optional[torch.amp.GradScaler] = None
    ema: Optional[nn.Module] = None       # naflex.optim.ModelEma
    grad_accum_steps: int = 1
    clip_grad: Optional[float] = None
    clip_mode: str = 'norm'
    loss_scale: str = 'linear'            # --naflex-loss-scale
    batch_size_reference: float = 1.0     # -b
    smoothing: float = 0.0
    log_interval: int = 50
    world_size: int = 1
    rank: int = 0
    seed: int = 42
    hooks: Optional[object] = None        # test hooks: after_update(engine, state), after_epoch(state) -> stop
    history: List[Dict] = field(default_factory=list)  # recent logged (epoch, step, loss) points (tests/analysis)
    stop_requested: bool = False          # set by train.py's SIGTERM handler; acted on at an update boundary

    @property
    def module(self) -> nn.Module:
        return unwrap_model(self.model)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def classification_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Soft-target CE for [B, C] float targets (mixup/cutmix, smoothing already inside), else label-smoothing CE."""
    logits = logits.float()
    if target.is_floating_point():
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, target, label_smoothing=smoothing)


def batch_size_of(inputs) -> int:
    if isinstance(inputs, dict):
        if 'seq_lens' in inputs:
            return int(inputs['seq_lens'].shape[0])
        return int(inputs['patches'].shape[0])
    return int(inputs.shape[0])


def describe_seq_len(inputs) -> str:
    """The step's sequence length L for messages (metadata only, no sync): the loader's 'seq_len' entry,
    the padded length for padded batches."""
    if isinstance(inputs, dict):
        if 'seq_len' in inputs:
            return str(int(inputs['seq_len']))
        if 'seq_lens' in inputs:  # a packed batch built without the loader: only its longest image is known
            return f"unknown (longest image {int(inputs.get('max_seqlen', 0))} tokens)"
        return str(int(inputs['patches'].shape[1]))
    return 'n/a (image tensor)'


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


def _mean_lr(optimizer) -> float:
    lrs = [g['lr'] for g in optimizer.param_groups]
    return sum(lrs) / len(lrs)


def train_one_epoch(
        engine: Engine,
        batches,
        num_steps: int,
        state: TrainState,
        recovery_interval: int = 0,
        save_recovery: Optional[Callable[[TrainState], None]] = None,
        writer=None,
) -> Dict[str, float]:
    """Train ``state.epoch`` from batch ``state.step`` to ``num_steps`` over the device batch iterator ``batches``.

    ``batches`` yields (inputs, target) already on the device and normalized (loaders.DevicePrefetcher),
    starting at batch ``state.step``. Updates ``state`` in place; returns epoch metrics (identical on all ranks).
    """
    model, opt, dev = engine.model, engine.optimizer, engine.device
    model.train()
    accum = engine.grad_accum_steps
    updates_per_epoch = (num_steps + accum - 1) // accum
    last_accum = num_steps % accum
    last_accum_start = num_steps - last_accum
    distributed = engine.world_size > 1 and hasattr(model, 'no_sync')
    meter = ProgressMeter(num_steps, start_step=state.step, show_bar=None if engine.rank == 0 else False)

    # device-side accumulators [loss*images, valid tokens] for the epoch and the log window; image counts are
    # known on the host. Per-step updates only launch kernels with host scalars: no copies, no syncs.
    epoch_sums = torch.zeros(2, dtype=torch.float64, device=dev)
    window_sums = torch.zeros(2, dtype=torch.float64, device=dev)
    epoch_images = window_images = 0
    one = torch.ones((), dtype=torch.float32, device=dev)
    first_bad = torch.full((), -1, dtype=torch.long, device=dev)
    pending: Dict[int, tuple] = {}  # step -> (seq len, batch size) since the last finiteness check
    loss = torch.zeros((), device=dev)
    opt.zero_grad(set_to_none=True)

    def check_finite():
        # earliest non-finite step on any rank (all ranks stop together instead of hanging in a collective)
        never = torch.full((), num_steps, dtype=torch.long, device=dev)
        first = torch.where(first_bad < 0, never, first_bad)
        if engine.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        bad = int(first.item())
        if bad < num_steps:
            seq_len, bs = pending.get(bad, (-1, -1))
            raise NonFiniteLossError(
                f'non-finite loss at epoch {state.epoch} step {bad}/{num_steps} (update {state.num_updates}): '
                f'sequence length {seq_len}, batch size {bs}, lr {_mean_lr(opt):.3e}; stopped without saving '
                f'(the last good checkpoint is kept). Try a lower --lr, --clip-grad 1.0 or --amp-dtype bfloat16.')
        pending.clear()

    it = iter(batches)
    stop_all = False
    start_step = state.step
    for batch_idx in range(start_step, num_steps):
        t0 = time.perf_counter()
        try:
            inputs, target = next(it)
        except StopIteration:
            raise RuntimeError(f'loader ended after {batch_idx} of {num_steps} steps in epoch {state.epoch}') from None
        meter.add_wait(time.perf_counter() - t0)
        if batch_idx == start_step:
            # Pin the model's RNG stream (dropout, drop-path) after the loader started (starting DataLoader
            # workers draws from the global RNG), so a resumed run replays exactly what an uninterrupted one does.
            if state.rng is not None:
                set_rng_state(state.rng)
                state.rng = None
            else:
                seed_everything(engine.seed, engine.rank, state.epoch)
        need_update = (batch_idx + 1) % accum == 0 or batch_idx == num_steps - 1
        micro = last_accum if (last_accum and batch_idx >= last_accum_start) else accum
        bs = batch_size_of(inputs)
        pending[batch_idx] = (describe_seq_len(inputs), bs)
        weight = loss_weight(bs, engine.batch_size_reference, engine.loss_scale) / micro
        sync_ctx = model.no_sync() if (distributed and not need_update) else contextlib.nullcontext()
        with sync_ctx:
            with engine.autocast():
                logits = model(inputs)
            loss = classification_loss(logits, target, engine.smoothing)
            scaled = loss * weight
            if engine.world_size > 1:
                # DDP averages over ranks; re-weight so every image counts the same (timm's dist_scale)
                global_bs = D.all_reduce_sum(one * bs)
                scaled = scaled * (engine.world_size * bs / global_bs)
            if engine.scaler is not None:
                engine.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        loss_d = loss.detach()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss_d), batch_idx, first_bad)
        step_sums = torch.stack([loss_d.double() * bs, count_valid_tokens(inputs).to(dev).double()])
        epoch_sums += step_sums
        window_sums += step_sums
        epoch_images += bs
        window_images += bs
        if not need_update:
            continue

        if engine.scaler is not None:
            if engine.clip_grad is not None:
                engine.scaler.unscale_(opt)
                clip_gradients(engine.module.parameters(), engine.clip_grad, engine.clip_mode)
            engine.scaler.step(opt)
            engine.scaler.update()
        else:
            if engine.clip_grad is not None:
                clip_gradients(engine.module.parameters(), engine.clip_grad, engine.clip_mode)
            opt.step()
        opt.zero_grad(set_to_none=True)
        state.num_updates += 1
        state.step = batch_idx + 1
        if engine.ema is not None:
            engine.ema.update(engine.module, step=state.num_updates)
        update_idx = batch_idx // accum
        lr = _mean_lr(opt)
        if update_idx % engine.log_interval == 0 or batch_idx == num_steps - 1:
            check_finite()
            meter.clear_bar()
            counts = torch.tensor([window_images, epoch_images, float(engine.stop_requested)],
                                  dtype=torch.float64).to(dev)
            sums = torch.cat([window_sums, epoch_sums, loss_d.double().reshape(1), counts])
            w_loss, w_tok, e_loss, _, now, w_img, e_img, stops = D.all_reduce_sum(sums).tolist()
            stop_all = stops > 0  # every rank sees the same value, so all stop at this update
            win_loss, avg_loss = w_loss / max(w_img, 1.0), e_loss / max(e_img, 1.0)
            now_loss = now / engine.world_size
            fig = meter.window(batch_idx, tokens=w_tok, images=w_img)
            engine.history.append({'epoch': state.epoch, 'step': batch_idx, 'loss': now_loss, 'avg': avg_loss})
            del engine.history[:-10000]
            _logger.info(
                f'Train: {state.epoch} [{update_idx:>4d}/{updates_per_epoch} '
                f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  Loss: {now_loss:#.3g} ({avg_loss:#.3g})  '
                f'LR: {lr:.3e}  {fig["images_per_s"]:.1f} img/s  {fig["tokens_per_s"]:.0f} tok/s  '
                f'data wait {100 * fig["data_wait"]:.0f}%  ETA {format_seconds(fig["eta_s"])}')
            if writer is not None:
                writer.scalars({'train/loss': win_loss, 'train/lr': lr, 'train/images_per_s': fig['images_per_s'],
                                'train/tokens_per_s': fig['tokens_per_s'], 'train/data_wait': fig['data_wait']},
                               state.num_updates)
            window_sums.zero_()
            window_images = 0
        else:
            meter.bar(batch_idx)
        if engine.schedule is not None:
            engine.schedule.step_update(state.num_updates)
        # SIGTERM: one process stops at the next update; with several, ranks agree at the next log step
        if (stop_all if engine.world_size > 1 else engine.stop_requested) and batch_idx < num_steps - 1:
            check_finite()
            if save_recovery is not None:
                save_recovery(state)
            raise StopRequested(f'stopped on SIGTERM at epoch {state.epoch} step {state.step}/{num_steps} '
                                f'after saving a recovery checkpoint; continue with --resume auto')
        stop_all = False
        if recovery_interval and save_recovery is not None and (update_idx + 1) % recovery_interval == 0 \
                and batch_idx < num_steps - 1:
            check_finite()
            save_recovery(state)
        if engine.hooks is not None and hasattr(engine.hooks, 'after_update'):
            engine.hooks.after_update(engine, state)

    check_finite()
    meter.clear_bar()
    counts = torch.tensor([epoch_images, float(engine.stop_requested)], dtype=torch.float64).to(dev)
    loss_sum, tokens, images, stops = D.all_reduce_sum(torch.cat([epoch_sums, counts])).tolist()
    totals = meter.epoch_totals()
    return {
        'loss': loss_sum / max(images, 1.0),
        'images': images,
        'tokens': tokens,
        'images_per_s': images / totals['time_s'],
        'tokens_per_s': tokens / totals['time_s'],
        'data_wait': totals['data_wait'],
        'time_s': totals['time_s'],
        'lr': _mean_lr(opt),
        'stop': stops > 0,
    }


def training_checkpoint(engine: Engine, state: TrainState, args=None) -> Dict:
    """Full training state for checkpoint.CheckpointManager (call on every rank: RNG states are gathered)."""
    rng = rng_state()
    if engine.world_size > 1:
        import torch.distributed as dist
        rngs = [None] * engine.world_size
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    ckpt = {
        'arch': getattr(args, 'model', None),
        'epoch': state.epoch - 1 if state.step == 0 else state.epoch,
        'state_dict': engine.module.state_dict(),
        'optimizer': engine.optimizer.state_dict(),
        'train_state': dict(state.state_dict(), world_size=engine.world_size),
        'rng': rngs,
        'version': 2,
    }
    if args is not None:
        ckpt['args'] = {k: v for k, v in vars(args).items()}
    if engine.schedule is not None:
        ckpt['scheduler'] = engine.schedule.state_dict()
    if engine.ema is not None:
        ckpt['state_dict_ema'] = engine.ema.module.state_dict()
    if engine.scaler is not None:
        ckpt['scaler'] = engine.scaler.state_dict()
    return ckpt


def restore_training(engine: Engine, ckpt: Dict, rank: int = 0, load_optimizer: bool = True,
                     updates_per_epoch: Optional[int] = None) -> TrainState:
    """Load a ``training_checkpoint`` dict (or a timm train.py checkpoint) into the engine; returns the state to
    continue from. A mid-epoch checkpoint written with another world size restarts its epoch from step 0
    (the loader's step schedule depends on the number of ranks)."""
    try:
        engine.module.load_state_dict(ckpt['state_dict'])
    except RuntimeError as e:
        raise ValueError(f'the checkpoint weights do not fit the model: {str(e).splitlines()[0]}') from None
    if load_optimizer and 'optimizer' in ckpt:
        try:
            engine.optimizer.load_state_dict(ckpt['optimizer'])
        except (ValueError, KeyError, RuntimeError) as e:
            name = type(engine.optimizer).__name__
            raise ValueError(f'the optimizer state in the checkpoint does not fit this {name} ({e}); '
                             'pass --no-resume-opt to resume the weights only') from None
    if engine.ema is not None and 'state_dict_ema' in ckpt:
        engine.ema.module.load_state_dict(ckpt['state_dict_ema'])
    if engine.scaler is not None and 'scaler' in ckpt and load_optimizer:
        engine.scaler.load_state_dict(ckpt['scaler'])
    ts = ckpt.get('train_state')
    if ts is None:  # timm checkpoint: 'epoch' is the last finished epoch
        epoch = ckpt.get('epoch', -1) + 1
        ts = {'epoch': epoch, 'step': 0, 'num_updates': epoch * (updates_per_epoch or 0)}
    state = TrainState(epoch=ts['epoch'], step=ts['step'], num_updates=ts['num_updates'])
    same_world = ts.get('world_size', engine.world_size) == engine.world_size
    if state.step and not same_world:
        _logger.warning(f'checkpoint is from {ts["world_size"]} processes, this run has {engine.world_size}: '
                        f'restarting epoch {state.epoch} from its first step')
        state.num_updates -= (state.step + engine.grad_accum_steps - 1) // engine.grad_accum_steps
        state.step = 0
    rngs = ckpt.get('rng') or []
    if state.step and rngs and rank < len(rngs):
        state.rng = rngs[rank]  # applied when the resumed epoch starts (see train_one_epoch)
    if engine.schedule is not None:
        if 'scheduler' in ckpt:
            engine.schedule.load_state_dict(ckpt['scheduler'])
        engine.schedule.step(state.epoch)
        engine.schedule.step_update(state.num_updates)
    return state


def fit(
        engine: Engine,
        train_loader,
        to_device: Callable,
        state: TrainState,
        total_epochs: int,
        evaluate_fn: Optional[Callable] = None,
        saver=None,
        writer=None,
        args=None,
        is_primary: bool = True,
) -> List[Dict]:
    """The epoch loop: train, evaluate every ``--val-interval`` epochs (model and EMA), write summary.csv,
    TensorBoard and checkpoints, until ``total_epochs``. Returns the per-epoch result rows.

    ``train_loader`` is the CPU loader (``set_epoch``/``set_start_step``/``len``), ``to_device`` wraps it into a
    device batch iterator, ``evaluate_fn(model) -> metrics`` runs the shared eval loop, ``saver`` is a
    checkpoint.CheckpointManager on the primary rank (None elsewhere).
    """
    val_interval = getattr(args, 'val_interval', 1)  # getattr(None, ...) gives the default too
    recovery_interval = getattr(args, 'recovery_interval', 0)
    eval_metric = getattr(args, 'eval_metric', 'top1')
    results = []

    def save_recovery(st: TrainState):
        ckpt = training_checkpoint(engine, st, args)  # every rank (RNG gather)
        if saver is not None:
            path = saver.save_recovery(ckpt, st.epoch, st.step)
            _logger.info(f'saved recovery checkpoint {path.name}')

    for epoch in range(state.epoch, total_epochs):
        state.epoch = epoch
        if hasattr(train_loader, 'set_epoch'):
            train_loader.set_epoch(epoch)
        if state.step and hasattr(train_loader, 'set_start_step'):
            train_loader.set_start_step(state.step)
        num_steps = len(train_loader)
        train_metrics = train_one_epoch(engine, to_device(train_loader), num_steps, state,
                                        recovery_interval=recovery_interval, save_recovery=save_recovery,
                                        writer=writer)
        if hasattr(train_loader, 'set_start_step'):
            train_loader.set_start_step(0)
        state.epoch, state.step = epoch + 1, 0
        if engine.schedule is not None:
            engine.schedule.step(epoch + 1)

        row = {'epoch': epoch, 'train_loss': train_metrics['loss'], 'eval_loss': None, 'eval_top1': None,
               'eval_top5': None}
        if engine.ema is not None:
            row.update(ema_loss=None, ema_top1=None, ema_top5=None)
        metric = None
        if evaluate_fn is not None and ((epoch + 1) % val_interval == 0 or epoch + 1 == total_epochs):
            ev = evaluate_fn(engine.model)
            row.update(eval_loss=ev['loss'], eval_top1=ev['top1'], eval_top5=ev['top5'])
            metric = ev[eval_metric]
            if engine.ema is not None:
                ev_ema = evaluate_fn(engine.ema.module)
                row.update(ema_loss=ev_ema['loss'], ema_top1=ev_ema['top1'], ema_top5=ev_ema['top5'])
                metric = ev_ema[eval_metric]  # like timm: the EMA's metric picks the best checkpoints
            if writer is not None:
                writer.bad_files(ev.get('bad_file_paths', []), epoch)
            _logger.info(f'Eval: {epoch}  loss {ev["loss"]:.4f}  top1 {ev["top1"]:.3f}  top5 {ev["top5"]:.3f}'
                         + (f'  (EMA top1 {row["ema_top1"]:.3f})' if engine.ema is not None else ''))
        row.update(lr=train_metrics['lr'], images_per_s=train_metrics['images_per_s'],
                   tokens_per_s=train_metrics['tokens_per_s'], data_wait=train_metrics['data_wait'])
        if writer is not None:
            writer.summary(row)
            writer.scalars({f'epoch/{k}': v for k, v in row.items() if k != 'epoch'}, epoch)
        ckpt = training_checkpoint(engine, state, args)
        if saver is not None:
            saver.save_epoch(ckpt, epoch, metric)
            best, best_epoch = saver.best
            if best is not None:
                _logger.info(f'checkpoint saved; best {eval_metric} {best:.4f} (epoch {best_epoch})')
        results.append(row)
        if train_metrics['stop']:
            raise StopRequested(f'stopped on SIGTERM after epoch {epoch} (checkpoint saved); '
                                'continue with --resume auto')
        epoch_s = train_metrics['time_s']
        _logger.info(f'epoch {epoch} done in {format_seconds(epoch_s)}; run ETA '
                     f'{format_seconds(epoch_s * (total_epochs - epoch - 1))}')
        if engine.hooks is not None and hasattr(engine.hooks, 'after_epoch') and engine.hooks.after_epoch(state):
            break
    return results
