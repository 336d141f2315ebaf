#!/usr/bin/env python3
"""Train a NaFlexViT (SigLIP 2 NaFlex, arXiv:2502.14786; NaViT packing, arXiv:2307.06304) with timm's flags.

The model card command runs as written (add ``--device cpu`` on a machine without a GPU):

    python train.py --data-dir /data/imagenet/ --amp --amp-dtype bfloat16 --model naflexvit_base_patch16_gap \
        --naflex-loader -b 64 --opt nadamw --lr 3e-4 --warmup-lr 0 --sched-on-updates \
        --aa rand-m8-inc1-mstd1.0 --weight-decay .1 --grayscale-prob .1 --drop-path 0.2 --reprob 0 \
        --mixup 0.8 --cutmix 1.0 --remode pixel -j 8

Several GPUs / nodes: ``torchrun --nproc_per_node 8 train.py ...``. This file only wires the trainer's parts
together (naflex/train/: cli and config for the flags, build for datasets / model / loaders, engine for the
loop, checkpoint for resume). Call ``main(argv)`` from Python (tests do); importing it has no side effects.
"""
import gc
import logging
import sys
import traceback
from pathlib import Path

import torch

_logger = logging.getLogger('train')


class OutOfMemory(Exception):
    """Device memory ran out; the message names the flags to lower."""


def run(argv=None, hooks=None):
    from naflex.train.cli import parse_config
    from naflex.train.memory import oom_message
    args, cfg = parse_config(argv)  # checked: every problem is one ConfigError line
    try:
        return _train(cfg, args, hooks)
    except torch.OutOfMemoryError:
        raise OutOfMemory(oom_message(cfg)) from None


def _resume_checkpoint(cfg, out_dir: Path):
    """(path, checkpoint) that ``--resume`` (PATH or auto) continues, or (None, None) for a fresh start; read
    before the model is built, which follows the checkpoint's recorded --model-kwargs."""
    from naflex.train.build import UserError
    from naflex.train.checkpoint import find_resume, load_checkpoint
    resume = find_resume(out_dir) if cfg.run.resume == 'auto' else (Path(cfg.run.resume) if cfg.run.resume else None)
    if cfg.run.resume == 'auto' and resume is None:
        _logger.info(f'--resume auto: no checkpoint in {out_dir} yet, starting from scratch')
    if resume is None:
        return None, None
    try:
        return resume, load_checkpoint(resume)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    except ValueError as e:
        raise UserError(f'--resume {resume}: {e}') from None


def _resume(trainer, cfg, resume, ckpt, updates_per_epoch: int, steps_per_epoch: int, used_args: dict):
    """The state to start from: a fresh one, or what the ``--resume`` checkpoint restores, or the start of
    ``--start-epoch`` (which wins, as in timm). The flags of this command apply (``used_args``, what args.yaml
    records); those that differ from the checkpoint's are logged."""
    from naflex.train.build import UserError
    from naflex.train.checkpoint import TrainState, restore_training
    from naflex.train.cli import changed_flags
    from naflex.train.schedule import restore_schedule
    state = TrainState()
    if ckpt is not None:
        try:
            state = restore_training(trainer, ckpt, cfg.run.resume_opt, updates_per_epoch, steps_per_epoch,
                                     opt=cfg.optim.opt)
        except ValueError as e:
            raise UserError(f'--resume {resume}: {e}') from None
        _logger.info(f'resumed from {resume}: epoch {state.epoch}, step {state.step}, update {state.num_updates}')
        changed = changed_flags(ckpt.get('args'), used_args)
        if changed:
            _logger.warning(f'--resume: these flags differ from the checkpoint\'s run and apply from update '
                            f'{state.num_updates} on: {", ".join(changed)}')
    start = cfg.sched.start_epoch
    if start is not None:
        state = TrainState(epoch=start, num_updates=start * updates_per_epoch)
        restore_schedule(trainer.schedule, (ckpt or {}).get('scheduler'), state.epoch, state.num_updates)
        _logger.info(f'--start-epoch {start}: starting at epoch {start}, update {state.num_updates}')
    return state


def _nothing_to_train(cfg, epoch: int, total_epochs: int, resume) -> str:
    """The line for a start at or past the schedule's end (a finished run resumed, or --start-epoch beyond it):
    training on needs a longer schedule, which only --epochs gives."""
    extra = '' if total_epochs == cfg.sched.epochs else ' with the warm-up prefix, cycles and cool-down'
    ends = (f'and the schedule ends after {total_epochs} epoch{"s" * (total_epochs != 1)} (--epochs '
            f'{cfg.sched.epochs}{extra}); nothing is written')
    if cfg.sched.start_epoch is not None:
        return f'nothing to train: --start-epoch {epoch}, {ends}. Lower --start-epoch or raise --epochs'
    return (f'nothing to train: --resume {resume} continues at epoch {epoch}, {ends}. To train longer, raise '
            f'--epochs (now {cfg.sched.epochs}) and resume again: the lr schedule is then laid out over the new length')


def _trainer(cfg, model, dist, updates_per_epoch: int, lr: float, hooks):
    """Optimizer, schedule, EMA, compile / DDP wrappers around ``model`` (already on the device)."""
    from torch.nn.parallel import DistributedDataParallel

    from naflex.train.build import UserError
    from naflex.train.compiling import CompileReport, compile_model
    from naflex.train.engine import Trainer, log_precision
    from naflex.train.optim import ModelEma, create_optimizer
    from naflex.train.schedule import create_schedule, schedule_problem, warmup_warning
    optimizer = create_optimizer(model, cfg.optim, lr)
    _logger.info(f'optimizer {type(optimizer).__name__} (--opt {cfg.optim.opt}): {dict(optimizer.defaults)}')
    ema = ModelEma(model, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.enabled else None
    run_model, callbacks = model, [hooks]
    if cfg.model.torchcompile:
        run_model = compile_model(model, cfg.model.torchcompile, cfg.model.torchcompile_mode)
        callbacks.append(CompileReport())
    if dist.distributed:
        run_model = DistributedDataParallel(run_model, device_ids=[dist.device] if dist.device.type == 'cuda'
                                            else None, broadcast_buffers=cfg.train.broadcast_buffers)
    evaluates = bool(cfg.data.val_split)  # timm: without evaluation, plateau watches the (falling) train loss
    try:
        schedule, total_epochs = create_schedule(cfg.sched, optimizer, updates_per_epoch, seed=cfg.train.seed,
                                                 decreasing_metric=not evaluates or cfg.train.eval_metric == 'loss')
    except ValueError as e:  # per-update settings timm's factory rejects for this run's updates per epoch
        raise UserError(f'{schedule_problem(cfg.sched, e, lambda f: "--" + f)} ({updates_per_epoch} updates per '
                        'epoch)') from None
    if warning := warmup_warning(cfg.sched, lr):
        _logger.warning(warning)
    trainer = Trainer(run_model, optimizer, cfg.train, batch_size_reference=cfg.loader.batch_size,
                      device=dist.device, schedule=schedule, ema=ema, clip_grad=cfg.optim.clip_grad,
                      clip_mode=cfg.optim.clip_mode, world_size=dist.world_size, rank=dist.rank,
                      callbacks=callbacks)
    log_precision(trainer, cfg.optim.opt)
    return trainer, total_epochs


def _open_run_folder(out_dir: Path, dist, cfg, resolved_args: str, resume, resumed_from):
    """Create the run folder once every input is checked: train.log (from the run's first line), args.yaml (the
    configuration actually used) and, on rank 0, the checkpoint manager (returned; None on other ranks), which
    continues the best-epoch ranking of ``resumed_from`` only when ``resume`` lies in this folder."""
    from naflex.train.build import create_run_dir
    from naflex.train.checkpoint import CheckpointManager, writing
    from naflex.train.logger import attach_log_file
    create_run_dir(out_dir, cfg, dist)
    attach_log_file(out_dir / 'train.log')
    # logged only now: before, a refused input would read as if the folder had been made
    _logger.info(f'{"torchrun: rank %d of %d, " % (dist.rank, dist.world_size) if dist.distributed else ""}'
                 f'device {dist.device}, output {out_dir}')
    if not dist.is_primary:
        return None
    with writing(out_dir / 'args.yaml'):
        (out_dir / 'args.yaml').write_text(resolved_args)
    saver = CheckpointManager(out_dir, cfg.train.checkpoint_hist, decreasing=cfg.train.eval_metric == 'loss')
    if resumed_from is not None:
        saver.restore(resumed_from, resume.parent, cfg.train.eval_metric)
    return saver


def _train(cfg, args, hooks=None):
    from loaders import DevicePrefetcher
    from naflex.train import build
    from naflex.train.bad_files import BadFileTracker, TooManyBadFiles
    from naflex.train.callbacks import StopOnSignal
    from naflex.train.cli import args_yaml
    from naflex.train.distributed import init_distributed
    from naflex.train.engine import fit, seed_everything
    from naflex.train.evaluate import NoImagesEvaluated, evaluate
    from naflex.train.logger import RunWriter, setup_logging
    from naflex.train.memory import oom_message

    dist = init_distributed(cfg.train.device)
    setup_logging(None, dist.is_primary)  # train.log starts once the run folder exists, with these lines
    # Every input is checked before the run folder is created: a mistake leaves nothing on disk.
    out_dir = build.run_dir(cfg, dist)
    resume, resume_ckpt = _resume_checkpoint(cfg, out_dir)  # before the datasets: it fixes the class order
    cfg = build.with_recorded_model(cfg, resume_ckpt)
    build.check_step_memory(cfg, dist)  # an impossible sequence length is refused before the data is read
    train_ds, val_ds = build.open_datasets(cfg, resume_ckpt)
    seed_everything(cfg.train.seed, dist.rank)
    if dist.device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    num_classes = build.num_classes_for(cfg, train_ds)
    model = build.build_model(cfg, num_classes)
    cfg = build.resolve_data_config(cfg, model)
    train_loader, eval_loader = build.build_loaders(cfg, train_ds, val_ds, num_classes, dist)
    lr = cfg.optim.resolved_lr(cfg.loader.batch_size * dist.world_size * cfg.train.grad_accum_steps)
    if not cfg.optim.lr:
        _logger.info(f'lr {lr:.3e} from --lr-base {cfg.optim.lr_base} and the global batch')
    _logger.info(f'model {cfg.model.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, '
                 f'{num_classes} classes, {len(train_ds)} train images, {len(train_loader)} steps/epoch')

    model.to(dist.device)
    updates_per_epoch = -(-len(train_loader) // cfg.train.grad_accum_steps)
    trainer, total_epochs = _trainer(cfg, model, dist, updates_per_epoch, lr, hooks)
    used = dict(lr=lr, num_classes=num_classes, model_kwargs=cfg.model.kwargs)  # resolved: what the run uses
    used_args = dict(vars(args), **used)  # the configuration actually used (on resume too)
    state = _resume(trainer, cfg, resume, resume_ckpt, updates_per_epoch, len(train_loader), used_args)
    if state.epoch >= total_epochs:  # exit 0 without writing: the finished run stays as it was
        _logger.info(_nothing_to_train(cfg, state.epoch, total_epochs, resume))
        trainer.callbacks.close()
        return []

    saver = _open_run_folder(out_dir, dist, cfg, args_yaml(args, **used), resume, resume_ckpt)
    del resume_ckpt  # its tensors are in the model and optimizer now
    bad_files = BadFileTracker(out_dir, cfg.train.bad_file_limit, dataset_size=-(-len(train_ds) // dist.world_size),
                               writes=dist.is_primary, world_size=dist.world_size)  # each rank judges its share
    trainer.callbacks.items.append(bad_files)
    mean, std = cfg.model.mean, cfg.model.std

    def to_device(loader):
        return DevicePrefetcher(bad_files.track(loader), dist.device, mean, std)

    def evaluate_fn(m):
        try:
            ev = evaluate(m, eval_loader, dist.device, amp_dtype=trainer.amp_dtype, world_size=dist.world_size,
                          mean=mean, std=std)
        except NoImagesEvaluated as e:  # no metrics of no image: stop, with the files listed
            bad_files.record(e.bad_file_paths, 'evaluation')
            raise
        except torch.OutOfMemoryError:  # the eval flags size this step, not the training ones
            raise OutOfMemory(oom_message(cfg, evaluating=True)) from None
        bad_files.record(ev['bad_file_paths'], 'evaluation')
        return ev

    meta = {'arch': cfg.model.name, 'args': used_args}
    if getattr(train_ds, 'class_names_known', True):  # validate.py and --resume map classes by these names
        meta['class_names'] = list(train_ds.classes)
    writer = RunWriter(out_dir, wandb_run=build.start_wandb(cfg, out_dir, used_args)) if dist.is_primary \
        else RunWriter(None)
    writer.resume_at(state.epoch)
    _logger.info(f'training epochs {state.epoch}..{total_epochs - 1}, {updates_per_epoch} updates/epoch')
    try:
        with StopOnSignal() as preemption:
            trainer.callbacks.items.append(preemption)
            results = fit(trainer, train_loader, to_device, state, total_epochs,
                          evaluate_fn=evaluate_fn if eval_loader is not None else None, saver=saver, writer=writer,
                          checkpoint_meta=meta)
    except TooManyBadFiles as e:  # maybe another rank's: rank 0 lists its files
        if dist.is_primary:
            bad_files.record(e.paths)
        raise
    finally:
        writer.close()
        trainer.callbacks.close()
    if saver is not None and saver.best[0] is not None:
        _logger.info(f'*** best {cfg.train.eval_metric}: {saver.best[0]:.4f} (epoch {saver.best[1]}, '
                     f'{out_dir / "model_best.pth"})')
    return results


def main(argv=None, hooks=None):
    """CLI entry: run training, turning the errors users hit into one line on stderr (exit status 1 or 2; 143
    after SIGTERM and 130 after Ctrl-C, once a recovery checkpoint is written).

    ``hooks`` (tests): a callback object (naflex.train.callbacks) with ``after_update`` / ``after_epoch``.
    """
    from naflex.train.build import UserError
    from naflex.train.bad_files import TooManyBadFiles
    from naflex.train.callbacks import StopRequested
    from naflex.train.checkpoint import WriteError
    from naflex.train.cli import ConfigError
    from naflex.train.distributed import DeviceError, cleanup
    from naflex.train.evaluate import NoImagesEvaluated
    from naflex.train.metrics import NonFiniteLossError
    from loaders.stream_io import DataSourceError
    code, message = None, None
    try:
        return run(argv, hooks)
    except (ConfigError, UserError, DeviceError) as e:
        code, message = 2, f'train.py: error: {e}'
        traceback.clear_frames(e.__traceback__)
    except StopRequested as e:
        _logger.warning(str(e))
        code = e.exit_code  # 128 + the signal: 143 for SIGTERM (what schedulers expect), 130 for Ctrl-C
        traceback.clear_frames(e.__traceback__)
    except KeyboardInterrupt as e:  # Ctrl-C before training started, or a second one during training
        code, message = 130, ('train.py: interrupted: stopped at once without saving; the checkpoints already '
                              'written are unchanged (continue with --resume auto)')
        traceback.clear_frames(e.__traceback__)
    except (NonFiniteLossError, TooManyBadFiles, OutOfMemory, WriteError, NoImagesEvaluated, DataSourceError) as e:
        _logger.error(str(e))
        code, message = 1, f'train.py: error: {e}'
        # free the failed step's frames (DDP reducer included) before the process group goes away
        traceback.clear_frames(e.__traceback__)
    finally:
        gc.collect()
        cleanup()
    if message:
        print(message, file=sys.stderr)
    raise SystemExit(code)


if __name__ == '__main__':
    main()
