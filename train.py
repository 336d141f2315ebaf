#!/usr/bin/env python3
"""Train a NaFlexViT (SigLIP 2 NaFlex, arXiv:2502.14786; NaViT packing, arXiv:2307.06304) with timm's flags.

The model card command runs as written (add ``--device cpu`` on a machine without a GPU):

    python train.py --data-dir /data/imagenet/ --amp --amp-dtype bfloat16 --model naflexvit_base_patch16_gap \
        --naflex-loader -b 64 --opt nadamw --lr 3e-4 --warmup-lr 0 --sched-on-updates \
        --aa rand-m8-inc1-mstd1.0 --weight-decay .1 --grayscale-prob .1 --drop-path 0.2 --reprob 0 \
        --mixup 0.8 --cutmix 1.0 --remode pixel -j 8

Several GPUs / nodes: ``torchrun --nproc_per_node 8 train.py ...``. This file only wires the pieces together:
flags and defaults live in naflex/config.py, the step and epoch loops in naflex/engine.py, optimizer and
EMA in naflex/optim.py, the lr schedule in naflex/schedule.py, checkpoints in naflex/checkpoint.py.
Call ``main(argv)`` from Python (tests do); importing this module has no side effects.
"""
import logging
import gc
import math
import signal
import sys
import threading
import traceback
from datetime import datetime
from pathlib import Path

import torch

_logger = logging.getLogger('train')


class UserError(Exception):
    """A problem the user can fix; reported as one line without a traceback."""


def _datasets(args):
    from loaders import ImageFolderDataset
    root = Path(args.data_dir)
    if not root.is_dir():
        raise UserError(f'--data-dir {root} does not exist')
    try:
        train_ds = ImageFolderDataset(root, args.train_split)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f'no training images: {e}') from None
    if len(train_ds) == 0:
        raise UserError(f'--data-dir {root}: split {args.train_split!r} holds no images')
    val_ds = None
    if args.val_split:
        try:
            val_ds = ImageFolderDataset(root, args.val_split)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f'no validation images: {e} (pass --val-split "" to train without evaluation)') from None
        if list(val_ds.classes) != list(train_ds.classes):
            only_t = sorted(set(train_ds.classes) - set(val_ds.classes))[:5]
            only_v = sorted(set(val_ds.classes) - set(train_ds.classes))[:5]
            raise UserError(f'class folders differ between {args.train_split!r} and {args.val_split!r}: '
                            f'only in train {only_t}, only in val {only_v}')
    return train_ds, val_ds


def _model(args, num_classes):
    import naflex
    from naflex.checkpoint import load_weights
    if args.pretrained and not args.pretrained_path:
        raise UserError('--pretrained needs local weights (nothing is downloaded): pass --pretrained-path FILE')
    kwargs = dict(num_classes=num_classes, drop_rate=args.drop)
    if args.drop_path is not None:
        kwargs['drop_path_rate'] = args.drop_path
    if args.gp is not None:
        kwargs['global_pool'] = args.gp
    try:
        model = naflex.create_model(args.model, **kwargs)
    except ValueError as e:
        raise UserError(str(e)) from None
    for path, use_ema in ((args.initial_checkpoint, False), (args.pretrained_path, True)):
        if path:
            try:
                load_weights(model, path, use_ema=use_ema)
            except (FileNotFoundError, ValueError) as e:
                raise UserError(str(e)) from None
            _logger.info(f'loaded weights from {path}')
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.set_attn_backend(args.attn_backend)
    if args.naflex_patch_sizes and args.torchcompile:
        model.prewarm_patch_sizes(args.naflex_patch_sizes)  # resampling matrices built outside the graph
    return model


def _loaders(args, train_ds, val_ds, num_classes, patch_size, mean, std, dist):
    from loaders import create_eval_loader, create_train_loader
    from loaders.args import aug_config_from_args, mixup_config_from_args
    pin = dist.device.type == 'cuda' or args.pin_mem
    train = create_train_loader(
        train_ds, seq_lens=args.naflex_train_seq_lens, batch_size=args.batch_size, patch_size=patch_size,
        patch_sizes=args.naflex_patch_sizes, patch_size_probs=args.naflex_patch_size_probs,
        num_workers=args.workers, seed=args.seed, rank=dist.rank, world_size=dist.world_size,
        packing=not args.no_naflex_packing, aug=aug_config_from_args(args, mean, std),
        mixup=mixup_config_from_args(args, num_classes), num_classes=num_classes, pin_memory=pin)
    val = None
    if val_ds is not None:
        val = create_eval_loader(
            val_ds, max_seq_len=args.naflex_max_seq_len, batch_size=args.validation_batch_size or args.batch_size,
            patch_size=patch_size, num_workers=args.workers, rank=dist.rank, world_size=dist.world_size,
            packing=not args.no_naflex_packing, pin_memory=pin)
    return train, val


def _resolve_lr(args, world_size):
    """timm: without --lr, scale --lr-base by global batch / --lr-base-size (sqrt for adam-type optimizers)."""
    if args.lr:
        return
    ratio = args.batch_size * world_size * args.grad_accum_steps / args.lr_base_size
    scale = args.lr_base_scale or ('sqrt' if 'adam' in args.opt.lower() else 'linear')
    args.lr = args.lr_base * (math.sqrt(ratio) if scale == 'sqrt' else ratio)
    _logger.info(f'lr {args.lr:.3e} from --lr-base {args.lr_base} and global batch ({scale} scaling)')


def _output_dir(args, dist):
    from naflex.distributed import broadcast_object
    if args.resume == 'auto' and not args.experiment:
        raise UserError('--resume auto continues the run in --output/--experiment: pass --experiment NAME')
    out = None
    if dist.is_primary:
        name = args.experiment or f'{datetime.now():%Y%m%d-%H%M%S}-{args.model}'
        out = Path(args.output or './output/train') / name
        out.mkdir(parents=True, exist_ok=True)
    return Path(broadcast_object(str(out) if out else None))


class OutOfMemory(Exception):
    """Device memory ran out; the message names the flags to lower."""


def _oom_message(args) -> str:
    longest = max(args.naflex_train_seq_lens)
    return (f'out of GPU memory with -b {args.batch_size} x longest sequence {longest} = '
            f'{args.batch_size * longest} tokens per step: lower -b (e.g. -b {max(1, args.batch_size // 2)}), drop '
            f'{longest} from --naflex-train-seq-lens, or add --grad-checkpointing')


def run(argv=None, hooks=None):
    from naflex.config import parse_args
    args, _ = parse_args(argv)
    try:
        return _train(args, hooks)
    except torch.OutOfMemoryError:
        raise OutOfMemory(_oom_message(args)) from None


def _train(args, hooks=None):
    from torch.nn.parallel import DistributedDataParallel

    from loaders import BadFileTracker, DevicePrefetcher
    from naflex.checkpoint import CheckpointManager, find_resume, load_checkpoint
    from naflex.config import args_yaml
    from naflex.distributed import init_distributed
    from naflex.engine import Engine, TrainState, fit, restore_training, seed_everything
    from naflex.evaluate import evaluate
    from naflex.logger import RunWriter, setup_logging
    from naflex.optim import ModelEma, create_optimizer
    from naflex.schedule import create_schedule

    dist = init_distributed(args.device)
    train_ds, val_ds = _datasets(args)  # before the output dir exists: a bad --data-dir leaves nothing behind
    out_dir = _output_dir(args, dist)
    setup_logging(out_dir / 'train.log', dist.is_primary)
    _logger.info(f'{"torchrun: rank %d of %d, " % (dist.rank, dist.world_size) if dist.distributed else ""}'
                 f'device {dist.device}, output {out_dir}')
    seed_everything(args.seed, dist.rank)
    if dist.device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    num_classes = args.num_classes or len(train_ds.classes)
    if num_classes < len(train_ds.classes):
        raise UserError(f'--num-classes {num_classes} is below the {len(train_ds.classes)} class folders in '
                        f'{args.data_dir}/{args.train_split}')
    model = _model(args, num_classes)
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    mean, std = tuple(args.mean or cfg.get('mean', (0.5,) * 3)), tuple(args.std or cfg.get('std', (0.5,) * 3))
    train_loader, eval_loader = _loaders(args, train_ds, val_ds, num_classes, model.patch_size, mean, std, dist)
    _resolve_lr(args, dist.world_size)
    if dist.is_primary:  # the resolved configuration (incl. derived lr / num_classes)
        args.num_classes = num_classes
        (out_dir / 'args.yaml').write_text(args_yaml(args))
    _logger.info(f'model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, '
                 f'{num_classes} classes, {len(train_ds)} train images, {len(train_loader)} steps/epoch')

    model.to(dist.device)
    optimizer = create_optimizer(model, args)
    amp_dtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16}[args.amp_dtype] if args.amp else None
    scaler = torch.amp.GradScaler(dist.device.type) if amp_dtype == torch.float16 else None
    ema = ModelEma(model, args.model_ema_decay, args.model_ema_warmup) if args.model_ema else None
    run_model = model
    if args.torchcompile:
        run_model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
    if dist.distributed:
        run_model = DistributedDataParallel(run_model, device_ids=[dist.device] if dist.device.type == 'cuda'
                                            else None)
    updates_per_epoch = (len(train_loader) + args.grad_accum_steps - 1) // args.grad_accum_steps
    schedule, total_epochs = create_schedule(args, optimizer, updates_per_epoch)
    engine = Engine(
        model=run_model, optimizer=optimizer, device=dist.device, schedule=schedule, amp_dtype=amp_dtype,
        scaler=scaler, ema=ema, grad_accum_steps=args.grad_accum_steps, clip_grad=args.clip_grad,
        clip_mode=args.clip_mode, loss_scale=args.naflex_loss_scale, batch_size_reference=float(args.batch_size),
        smoothing=args.smoothing, log_interval=args.log_interval, world_size=dist.world_size, rank=dist.rank,
        seed=args.seed, hooks=hooks)
    saver = CheckpointManager(out_dir, args.checkpoint_hist, decreasing=args.eval_metric == 'loss') \
        if dist.is_primary else None

    state = TrainState()
    resume = find_resume(out_dir) if args.resume == 'auto' else (Path(args.resume) if args.resume else None)
    if args.resume == 'auto' and resume is None:
        _logger.info(f'--resume auto: no checkpoint in {out_dir} yet, starting from scratch')
    if resume is not None:
        try:
            ckpt = load_checkpoint(resume)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from None
        try:
            state = restore_training(engine, ckpt, dist.rank, not args.no_resume_opt, updates_per_epoch)
        except ValueError as e:
            raise UserError(f'--resume {resume}: {e}') from None
        if saver is not None:
            saver.restore(ckpt)
        _logger.info(f'resumed from {resume}: epoch {state.epoch}, step {state.step}, update {state.num_updates}')
        del ckpt

    bad_files = BadFileTracker(out_dir if dist.is_primary else None)

    def to_device(loader):
        def tracked():
            for inputs, target in loader:
                bad_files.update(inputs)
                yield inputs, target
        return DevicePrefetcher(tracked(), dist.device, mean, std)

    def evaluate_fn(m):
        return evaluate(m, eval_loader, dist.device, amp_dtype=amp_dtype, world_size=dist.world_size,
                        mean=mean, std=std)

    def on_sigterm(signum, frame):  # preemption: checkpoint at the next update boundary, then exit
        engine.stop_requested = True
        _logger.warning('SIGTERM received: saving a recovery checkpoint at the next update')

    previous = signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    writer = RunWriter(out_dir if dist.is_primary else None)
    _logger.info(f'training epochs {state.epoch}..{total_epochs - 1}, {updates_per_epoch} updates/epoch')
    try:
        results = fit(engine, train_loader, to_device, state, total_epochs,
                      evaluate_fn=evaluate_fn if eval_loader is not None else None, saver=saver, writer=writer,
                      args=args, is_primary=dist.is_primary)
    finally:
        writer.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if saver is not None and saver.best[0] is not None:
        _logger.info(f'*** best {args.eval_metric}: {saver.best[0]:.4f} (epoch {saver.best[1]})')
    return results


def main(argv=None, hooks=None):
    """CLI entry: run training, turning the errors users hit into one line on stderr (exit status 1, 2 or 143).

    ``hooks`` (tests only): an object with optional ``after_update(engine, state)`` / ``after_epoch(state)``.
    """
    from loaders import TooManyBadFiles
    from naflex.config import ConfigError
    from naflex.distributed import DeviceError, cleanup
    from naflex.engine import NonFiniteLossError, StopRequested
    code, message = None, None
    try:
        return run(argv, hooks)
    except (ConfigError, UserError, DeviceError) as e:
        code, message = 2, f'train.py: error: {e}'
        traceback.clear_frames(e.__traceback__)
    except StopRequested as e:
        _logger.warning(str(e))
        code = 143  # 128 + SIGTERM, what schedulers expect from a terminated job
        traceback.clear_frames(e.__traceback__)
    except (NonFiniteLossError, TooManyBadFiles, OutOfMemory) as e:
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
