#!/usr/bin/env python3
"""timm 1.0.31's ``train.py --naflex-loader`` training loop, assembled from timm's pip package.

timm's train.py is not in its wheel, so the end-to-end benchmark (bench_e2e.sh) runs this instead: it builds what
timm's train.py builds for the NaFlexViT model card's command with timm's own factories (dataset, model, NaFlex
loader and mixup, loss, task, optimizer, scheduler, AMP), runs the per-update loop of timm's ``train_one_epoch``
(one process, no gradient accumulation, ``loss.item()`` every update) and logs timm's ``Train:`` lines.

Command (the card's flags, timm's NaFlexViT shrunk to our naflexvit_tiny_test, CPU):
    python scripts/bench/timm_train.py --data-dir DEMO --device cpu --model naflexvit_base_patch16_gap \
        --model-kwargs embed_dim=64 depth=2 num_heads=4 -b 8 -j 2 --naflex-train-seq-lens 64 128 --epochs 1 \
        --log-interval 1 --naflex-loader --opt nadamw --lr 3e-4 --warmup-lr 0 --sched-on-updates \
        --aa rand-m8-inc1-mstd1.0 --weight-decay .1 --grayscale-prob .1 --drop-path 0.2 --reprob 0 \
        --mixup 0.8 --cutmix 1.0 --remode pixel
Runtime: ~16-25 s on 2 shared CPU cores for the 600 train images of make_demo_data.py's defaults (51 updates).
GPU: drop --device/--model-kwargs, add ``-b 64 -j 16 --amp --amp-dtype bfloat16`` and timm's default lengths.

Not timm's train.py: no validation, checkpoints, summary.csv, EMA, distributed, gradient accumulation or
clipping; --num-classes defaults to the class folders found (timm: the model's 1000); --output and --experiment
are accepted and nothing is written; logs go to stdout (timm: stderr).
"""
import argparse
import json
import logging
import sys
import time
from contextlib import nullcontext
from functools import partial

import torch

_logger = logging.getLogger("train")

LOSS_SCALE_MODES = ("none", "sqrt", "linear")
TRAIN_INTERPOLATION = "random"  # timm's --train-interpolation default


def naflex_loss_scale(batch_size: int, reference: float, mode: str) -> float:
    """timm's multiplier of an update's loss: NaFlex batches shrink as the sequence length grows, so the loss is
    weighted by the batch size relative to -b (``linear``), its square root (``sqrt``) or not at all (``none``)."""
    if mode == "none":
        return 1.0
    if mode not in LOSS_SCALE_MODES:
        raise ValueError(f"loss scale mode {mode!r} is not one of {LOSS_SCALE_MODES}")
    ratio = batch_size / reference
    return ratio ** 0.5 if mode == "sqrt" else ratio


def build_parser() -> argparse.ArgumentParser:
    from timm.utils import ParseKwargs
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--data-dir", required=True, help="ImageNet-layout folder (timm's create_dataset('', root=...))")
    a("--train-split", default="train")
    a("--val-split", default="", help="accepted for timm's command line; only '' (no validation) is supported")
    a("--naflex-loader", action="store_true", help="accepted for timm's command line; always on here")
    a("--model", default="naflexvit_base_patch16_gap", help="a NaFlex model of timm (default: the card's)")
    a("--model-kwargs", nargs="*", default={}, action=ParseKwargs)
    a("--num-classes", type=int, default=None,
      help="default: the number of class folders of the train split (timm's default, the model's 1000, would not "
           "match a small data set)")
    a("-b", "--batch-size", type=int, default=128)
    a("-j", "--workers", type=int, default=4)
    a("--epochs", type=int, default=300)
    a("--opt", default="sgd")
    a("--lr", type=float, default=None, help="default: 0.1 * b / 256 (sqrt of the ratio for ada*/lamb), as timm")
    a("--weight-decay", type=float, default=2e-5)
    a("--sched", default="cosine")
    a("--sched-on-updates", action="store_true")
    a("--warmup-lr", type=float, default=1e-5)
    a("--warmup-epochs", type=int, default=5)
    a("--min-lr", type=float, default=0.)
    a("--smoothing", type=float, default=0.1)
    a("--drop-path", type=float, default=None)
    a("--aa", default=None, help="RandAugment / AutoAugment spec, e.g. rand-m8-inc1-mstd1.0")
    a("--grayscale-prob", type=float, default=None)
    a("--reprob", type=float, default=0.)
    a("--remode", default="pixel")
    a("--mixup", type=float, default=0.)
    a("--cutmix", type=float, default=0.)
    a("--mixup-prob", type=float, default=1.)
    a("--mixup-switch-prob", type=float, default=0.5)
    a("--naflex-train-seq-lens", type=int, nargs="+", default=[128, 256, 576, 784, 1024])
    a("--naflex-loss-scale", default="linear", choices=LOSS_SCALE_MODES)
    a("--amp", action="store_true")
    a("--amp-dtype", default="float16", choices=("float16", "bfloat16"))
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--torchcompile", nargs="?", default=None, const="inductor", help="torch.compile backend (timm's task.compile)")
    a("--torchcompile-mode", default=None)
    a("--log-interval", type=int, default=50)
    a("--seed", type=int, default=42)
    a("--pin-mem", action="store_true")
    a("--output", default="", help="accepted for timm's command line; nothing is written")
    a("--experiment", default="", help="accepted for timm's command line; nothing is written")
    # timm's train.py defaults of flags not exposed here, read by timm's optimizer_kwargs / scheduler_kwargs
    p.set_defaults(momentum=0.9, decay_epochs=90, decay_milestones=[90, 180, 270], lr_cycle_decay=0.5)
    return p


def train_one_epoch(epoch, task, loader, optimizer, scheduler, args, autocast, loss_scaler, batch_size_reference):
    """One epoch of timm's train_one_epoch in NaFlex mode: returns the epoch's mean loss."""
    from timm.utils import AverageMeter
    update_time_m, data_time_m, losses_m = AverageMeter(), AverageMeter(), AverageMeter()
    task.get_trainable_module().train()
    second_order = getattr(optimizer, "is_second_order", False)
    updates_per_epoch = len(loader)
    num_updates = epoch * updates_per_epoch
    data_start = update_start = time.time()
    optimizer.zero_grad()
    for update_idx, (input, target) in enumerate(loader):
        data_time_m.update(time.time() - data_start)
        batch_size = input["patches"].shape[0]
        with autocast():
            loss = task(input, target)["loss"]
        scaled_loss = naflex_loss_scale(batch_size, batch_size_reference, args.naflex_loss_scale) * loss
        if loss_scaler is not None:
            loss_scaler(scaled_loss, optimizer, create_graph=second_order)
        else:
            scaled_loss.backward(create_graph=second_order)
            optimizer.step()
        losses_m.update(loss.item(), batch_size)  # a host sync every update, as timm
        num_updates += 1
        optimizer.zero_grad()
        now = time.time()
        update_time_m.update(now - update_start)
        update_start = now
        if update_idx % args.log_interval == 0 or update_idx == updates_per_epoch - 1:
            lrs = [group["lr"] for group in optimizer.param_groups]
            _logger.info(
                f"Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} "
                f"({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  "
                f"Loss: {losses_m.val:#.3g} ({losses_m.avg:#.3g})  "
                f"Time: {update_time_m.val:.3f}s, {batch_size / update_time_m.val:>7.2f}/s  "
                f"({update_time_m.avg:.3f}s, {batch_size / update_time_m.avg:>7.2f}/s)  "
                f"LR: {sum(lrs) / len(lrs):.3e}  "
                f"Data: {data_time_m.val:.3f} ({data_time_m.avg:.3f})")
        if scheduler is not None:
            scheduler.step_update(num_updates=num_updates, metric=losses_m.avg)  # no-op when stepped per epoch
        data_start = time.time()
    if hasattr(optimizer, "sync_lookahead"):
        optimizer.sync_lookahead()
    return losses_m.avg


def train(args) -> list:
    import timm
    from timm.data import NaFlexMixup, create_dataset, create_naflex_loader, resolve_data_config
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from timm.task import ClassificationTask
    from timm.utils import NativeScaler, random_seed

    device = torch.device(args.device)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    _logger.info(f"timm {timm.__version__} (pip package), torch {torch.__version__}: train.py --naflex-loader loop, "
                 f"single process on {device}")
    random_seed(args.seed, 0)

    # Before the model (timm builds it first) for its class count; reading the folder draws no random numbers.
    dataset = create_dataset("", root=args.data_dir, split=args.train_split, is_training=True,
                             batch_size=args.batch_size, seed=args.seed)
    num_classes = args.num_classes or len(dataset.reader.class_to_idx)
    model = timm.create_model(args.model, num_classes=num_classes, drop_path_rate=args.drop_path,
                              **args.model_kwargs)
    _logger.info(f"Model {args.model} {args.model_kwargs or ''} created, {num_classes} classes, "
                 f"param count:{sum(p.numel() for p in model.parameters())}")
    data_config = resolve_data_config(vars(args), model=model, verbose=True)
    model.to(device=device)
    patch_size = model.get_patch_size() if hasattr(model, "get_patch_size") else (16, 16)

    amp_dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
    autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else nullcontext
    loss_scaler = NativeScaler(device=device.type) if args.amp and device.type == "cuda" and \
        amp_dtype == torch.float16 else None
    _logger.info(f"AMP {args.amp_dtype if args.amp else 'off'}, loss scaler {'on' if loss_scaler else 'off'}")

    mixup_active = args.mixup > 0 or args.cutmix > 0
    mixup_fn = NaFlexMixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                           switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing,
                           num_classes=num_classes) if mixup_active else None
    loader = create_naflex_loader(
        dataset=dataset, train_seq_lens=args.naflex_train_seq_lens, mixup_fn=mixup_fn, rank=0, world_size=1,
        patchify_channels_last=True, patch_size=patch_size,
        mean=data_config["mean"], std=data_config["std"], pin_memory=args.pin_mem, img_dtype=torch.float32,
        device=device, distributed=False, use_prefetcher=True,
        batch_size=args.batch_size, is_training=True, no_aug=False, re_prob=args.reprob, re_mode=args.remode,
        re_count=1, re_split=False, train_crop_mode=None, scale=[0.08, 1.0], ratio=[3. / 4., 4. / 3.], hflip=0.5,
        vflip=0., color_jitter=0.4, color_jitter_prob=None, grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=None, auto_augment=args.aa, num_aug_repeats=0, num_aug_splits=0,
        interpolation=TRAIN_INTERPOLATION, num_workers=args.workers, worker_seeding="all")
    updates_per_epoch = len(loader)
    tokens_per_batch = args.batch_size * max(args.naflex_train_seq_lens)
    _logger.info(f"NaFlex loader: {len(dataset)} images, {updates_per_epoch} updates/epoch, patch size {patch_size}, "
                 f"lengths {args.naflex_train_seq_lens}, {tokens_per_batch} tokens per batch, "
                 f"mixup {'on' if mixup_fn else 'off'}, -j {args.workers}")

    loss_fn = SoftTargetCrossEntropy() if mixup_active else (
        LabelSmoothingCrossEntropy(smoothing=args.smoothing) if args.smoothing else torch.nn.CrossEntropyLoss())
    task = ClassificationTask(model=model, criterion=loss_fn.to(device=device), device=device, verbose=True)

    batch_size_reference = float(args.batch_size)
    if args.lr is None:  # timm: --lr-base 0.1 for --lr-base-size 256
        ratio = batch_size_reference / 256
        args.lr = 0.1 * (ratio ** 0.5 if any(o in args.opt.lower() for o in ("ada", "lamb")) else ratio)
        _logger.info(f"Learning rate {args.lr} from timm's base learning rate 0.1 per 256 images")
    optimizer = create_optimizer_v2(task.get_trainable_module(), **optimizer_kwargs(cfg=args))
    defaults = dict(optimizer.defaults, weight_decay=args.weight_decay)
    _logger.info(f"Created {type(optimizer).__name__} ({args.opt}) optimizer: "
                 + ", ".join(f"{k}: {v}" for k, v in defaults.items()))

    if args.torchcompile:
        _logger.info(f"Compiling with backend={args.torchcompile}, mode={args.torchcompile_mode}")
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)

    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args, decreasing_metric=True),
                                                updates_per_epoch=updates_per_epoch)
    _logger.info(f"Scheduled epochs: {num_epochs}, {args.sched} from {args.warmup_lr:g} over {args.warmup_epochs} "
                 f"warmup epochs to {args.lr:g}, min {args.min_lr:g}; LR stepped per "
                 f"{'update' if args.sched_on_updates else 'epoch'}")

    results = []
    for epoch in range(num_epochs):
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        loss = train_one_epoch(epoch, task, loader, optimizer, scheduler, args, autocast, loss_scaler,
                               batch_size_reference)
        if scheduler is not None:
            scheduler.step(epoch + 1, loss)  # no-op when stepped per update
        results.append({"epoch": epoch, "train": {"loss": loss}})
    _logger.info(f"--result\n{json.dumps(results, indent=4)}")
    return results


def main(argv=None) -> list:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.val_split:
        parser.error("--val-split: this loop does not validate; pass --val-split ''")
    from timm.utils import FormatterNoInfo
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(FormatterNoInfo())
    logging.root.addHandler(handler)
    logging.root.setLevel(logging.INFO)
    try:
        return train(args)
    finally:
        logging.root.removeHandler(handler)


if __name__ == "__main__":
    main()
