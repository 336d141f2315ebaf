"""Training configuration: the one place where every ``train.py`` flag and its default is declared.

Flags keep timm's ``train.py`` names, meanings and defaults (epochs 300, warmup-epochs 5, sched cosine,
min-lr 0, smoothing 0.1, naflex-max-seq-len 576, checkpoint-hist 10, seed 42, log-interval 50, ...), so the
NaFlexViT model card command runs as written. Additions of ours: ``--no-naflex-packing`` (timm-style padded
batches instead of packed sequences, NaViT arXiv:2307.06304 "patch n' pack"), ``--attn-backend``.

``-c/--config file.yaml`` sets defaults (unknown keys are an error); flags given on the command line win.
The resolved configuration is what ``train.py`` writes to ``<output>/args.yaml``. ``check_args`` turns
contradictory or out-of-range settings into one ``ConfigError`` line.
"""
import argparse
from typing import List, Optional, Sequence, Tuple

import yaml

from naflex.attention import BACKENDS as ATTN_BACKENDS
from naflex.optim import CLIP_MODES, OPTIMIZERS
from naflex.schedule import SCHEDULES


class ConfigError(ValueError):
    """A configuration mistake the user can fix; train.py prints it as one line and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors become a ConfigError (one line from train.py, no usage dump)."""

    def error(self, message):
        raise ConfigError(f'{message} (see train.py --help)')


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog='train.py', description='Train a NaFlexViT (timm-compatible flags).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file whose keys set flag defaults')

    g = p.add_argument_group('Dataset')
    g.add_argument('--data-dir', default='', metavar='DIR', help='root with one folder per split, class subfolders')
    g.add_argument('--train-split', default='train', help='training split folder')
    g.add_argument('--val-split', default='validation', help="eval split folder ('val' is found too); '' = none")
    g.add_argument('--num-classes', type=int, default=None, help='classifier size (default: number of class folders)')

    g = p.add_argument_group('Model')
    g.add_argument('--model', default='naflexvit_base_patch16_gap', help='model name (naflex.list_models())')
    g.add_argument('--pretrained', action='store_true', default=False, help='start from the registry weights')
    g.add_argument('--pretrained-path', default=None, metavar='PATH', help='start from these weights (head resized)')
    g.add_argument('--initial-checkpoint', default='', metavar='PATH', help='weights-only start (head resized)')
    g.add_argument('--resume', default='', metavar='PATH', help="full-state resume from PATH, or 'auto'")
    g.add_argument('--no-resume-opt', action='store_true', default=False, help='resume weights but not optimizer')
    g.add_argument('--gp', default=None, metavar='POOL', help='global pool override')
    g.add_argument('--mean', type=float, nargs='+', default=None, help='normalization mean override')
    g.add_argument('--std', type=float, nargs='+', default=None, help='normalization std override')
    g.add_argument('-b', '--batch-size', type=int, default=128,
                   help='per-process images per step at the longest sequence length (token budget b x max L)')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None, help='eval batch size (default -b)')
    g.add_argument('--grad-accum-steps', type=int, default=1, help='micro-batches per optimizer update')
    g.add_argument('--grad-checkpointing', action='store_true', default=False, help='activation checkpointing')
    g.add_argument('--torchcompile', nargs='?', const='inductor', default=None, help='torch.compile the model')
    g.add_argument('--torchcompile-mode', default=None, help='torch.compile mode')
    g.add_argument('--attn-backend', default='auto', choices=ATTN_BACKENDS, help='attention kernel')
    g.add_argument('--drop', type=float, default=0.0, help='dropout rate')
    g.add_argument('--drop-path', type=float, default=None, help='stochastic depth rate')

    g = p.add_argument_group('Device and precision')
    g.add_argument('--device', default='cuda', help="'cuda' or 'cpu' (torchrun picks cuda:LOCAL_RANK)")
    g.add_argument('--amp', action='store_true', default=False, help='mixed precision autocast')
    g.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'), help='autocast dtype')

    g = p.add_argument_group('Optimizer')
    g.add_argument('--opt', default='sgd', help=f'optimizer: {", ".join(OPTIMIZERS)}')
    g.add_argument('--opt-eps', type=float, default=None, help='optimizer epsilon')
    g.add_argument('--opt-betas', type=float, nargs='+', default=None, help='optimizer betas')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    g.add_argument('--weight-decay', type=float, default=2e-5, help='decoupled weight decay')
    g.add_argument('--clip-grad', type=float, default=None, help='gradient clip threshold (off by default)')
    g.add_argument('--clip-mode', default='norm', choices=CLIP_MODES, help='gradient clipping mode')
    g.add_argument('--layer-decay', type=float, default=None, help='layer-wise lr decay factor')
    g.add_argument('--layer-decay-min-scale', type=float, default=0.0, help='floor of the layer-wise lr scale')

    g = p.add_argument_group('Learning-rate schedule')
    g.add_argument('--sched', default='cosine', choices=SCHEDULES + ('none',), help='lr schedule')
    g.add_argument('--sched-on-updates', action='store_true', default=False, help='step the schedule per update')
    g.add_argument('--lr', type=float, default=None, help='peak lr (default: --lr-base scaled by global batch)')
    g.add_argument('--lr-base', type=float, default=0.1, help='lr for a global batch of --lr-base-size')
    g.add_argument('--lr-base-size', type=int, default=256, help='batch size --lr-base refers to')
    g.add_argument('--lr-base-scale', default='', choices=('', 'linear', 'sqrt'),
                   help="lr scaling with batch ('' = sqrt for adam-type, linear otherwise)")
    g.add_argument('--warmup-lr', type=float, default=1e-5, help='lr at the start of warmup')
    g.add_argument('--min-lr', type=float, default=0.0, help='lr floor of the cosine')
    g.add_argument('--epochs', type=int, default=300, help='epochs of the schedule')
    g.add_argument('--warmup-epochs', type=int, default=5, help='linear warmup epochs (inside --epochs)')
    g.add_argument('--warmup-prefix', action='store_true', default=False, help='warmup before the cosine')
    g.add_argument('--cooldown-epochs', type=int, default=0, help='epochs at --min-lr after the schedule')

    g = p.add_argument_group('Augmentation and regularization')
    g.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], help='random-resized-crop area range')
    g.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], help='random-resized-crop aspect')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--vflip', type=float, default=0.0, help='vertical flip probability')
    g.add_argument('--color-jitter', type=float, default=0.4, help='color jitter strength (without --aa)')
    g.add_argument('--grayscale-prob', type=float, default=None, help='random grayscale probability')
    g.add_argument('--aa', default=None, help="RandAugment spec, e.g. 'rand-m8-inc1-mstd1.0'")
    g.add_argument('--reprob', type=float, default=0.0, help='random erasing probability')
    g.add_argument('--remode', default='pixel', help='random erasing mode')
    g.add_argument('--recount', type=int, default=1, help='random erasing count')
    g.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (0 = off)')
    g.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (0 = off)')
    g.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixup/cutmix per batch')
    g.add_argument('--mixup-switch-prob', type=float, default=0.5, help='cutmix instead of mixup probability')
    g.add_argument('--mixup-off-epoch', type=int, default=0, help='turn mixup off from this epoch (0 = never)')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--train-interpolation', default='random', help='training resize interpolation')

    g = p.add_argument_group('EMA')
    g.add_argument('--model-ema', action='store_true', default=False, help='keep an EMA of the weights')
    g.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay per update')
    g.add_argument('--model-ema-warmup', action='store_true', default=False, help='ramp the EMA decay up')

    g = p.add_argument_group('NaFlex')
    g.add_argument('--naflex-loader', action='store_true', default=False,
                   help='accepted for timm compatibility; the NaFlex loader is always used')
    g.add_argument('--naflex-train-seq-lens', type=int, nargs='+', default=[128, 256, 576, 784, 1024],
                   help='training sequence lengths, one drawn per step')
    g.add_argument('--naflex-max-seq-len', type=int, default=576, help='eval sequence length')
    g.add_argument('--naflex-patch-sizes', type=int, nargs='+', default=None, help='variable patch sizes (FlexiViT)')
    g.add_argument('--naflex-patch-size-probs', type=float, nargs='+', default=None, help='patch size weights')
    g.add_argument('--naflex-loss-scale', default='linear', choices=('none', 'sqrt', 'linear'),
                   help='scale the loss by (step batch / -b) like timm')
    g.add_argument('--no-naflex-packing', action='store_true', default=False,
                   help='timm-style padded batches instead of packed sequences')

    g = p.add_argument_group('Run')
    g.add_argument('--seed', type=int, default=42, help='random seed')
    g.add_argument('--log-interval', type=int, default=50, help='log every N updates')
    g.add_argument('--val-interval', type=int, default=1, help='evaluate every N epochs')
    g.add_argument('--recovery-interval', type=int, default=0, help='mid-epoch recovery save every N updates')
    g.add_argument('--checkpoint-hist', type=int, default=10, help='best checkpoints kept')
    g.add_argument('-j', '--workers', type=int, default=4, help='loader worker processes per rank')
    g.add_argument('--pin-mem', action='store_true', default=False, help='pin host memory (always on for CUDA)')
    g.add_argument('--output', default='', metavar='PATH', help='output root (default ./output/train)')
    g.add_argument('--experiment', default='', help='run folder name (default: date-model)')
    g.add_argument('--eval-metric', default='top1', choices=('top1', 'top5', 'loss'), help='best-checkpoint metric')
    return p


def _load_yaml_defaults(parser: argparse.ArgumentParser, path: str) -> None:
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f'config file not found: {path}') from None
    except yaml.YAMLError as e:
        raise ConfigError(f'config file {path} is not valid YAML: {str(e).splitlines()[0]}') from None
    if not isinstance(cfg, dict):
        raise ConfigError(f'config file {path} must hold a mapping of flag names to values')
    known = {a.dest for a in parser._actions}
    cfg = {k.replace('-', '_'): v for k, v in cfg.items()}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f'config file {path} has unknown keys: {", ".join(unknown)}')
    cfg.pop('config', None)
    parser.set_defaults(**cfg)


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, str]:
    """Parse flags (after ``-c`` YAML defaults); returns the namespace and its YAML text for args.yaml."""
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    cfg_args, _ = config_parser.parse_known_args(argv)
    if cfg_args.config:
        _load_yaml_defaults(parser, cfg_args.config)
    args = parser.parse_args(argv)
    check_args(args)
    return args, args_yaml(args)


def args_yaml(args: argparse.Namespace) -> str:
    """``args`` as the YAML text of ``<output>/args.yaml`` (a valid ``-c`` file)."""
    return yaml.safe_dump(vars(args), default_flow_style=False, sort_keys=True)


def check_args(args: argparse.Namespace) -> None:
    """Raise ConfigError (one line) for contradictory or out-of-range settings."""
    errors: List[str] = []

    def need(cond, msg):
        if not cond:
            errors.append(msg)

    need(args.data_dir, '--data-dir is required')
    need(args.batch_size >= 1, '-b/--batch-size must be >= 1')
    need(args.grad_accum_steps >= 1, '--grad-accum-steps must be >= 1')
    need(args.epochs >= 1, '--epochs must be >= 1')
    need(args.warmup_epochs >= 0 and args.cooldown_epochs >= 0, '--warmup-epochs/--cooldown-epochs must be >= 0')
    need(args.opt.lower() in OPTIMIZERS, f'--opt {args.opt} is not supported; valid: {", ".join(OPTIMIZERS)}')
    need(args.lr is None or args.lr > 0, '--lr must be > 0')
    need(args.lr is None or args.min_lr <= args.lr, f'--min-lr {args.min_lr} is above --lr {args.lr}')
    need(args.opt_betas is None or len(args.opt_betas) == 2, '--opt-betas takes two values')
    need(args.clip_grad is None or args.clip_grad > 0, '--clip-grad must be > 0')
    need(args.layer_decay is None or 0 < args.layer_decay <= 1, '--layer-decay must be in (0, 1]')
    need(0 < args.model_ema_decay < 1, '--model-ema-decay must be in (0, 1)')
    need(0 <= args.smoothing < 1, '--smoothing must be in [0, 1)')
    need(args.log_interval >= 1 and args.val_interval >= 1, '--log-interval/--val-interval must be >= 1')
    need(args.recovery_interval >= 0 and args.checkpoint_hist >= 1,
         '--recovery-interval must be >= 0 and --checkpoint-hist >= 1')
    need(args.workers >= 0, '-j/--workers must be >= 0')
    need(all(L > 0 for L in args.naflex_train_seq_lens) and args.naflex_max_seq_len > 0,
         'sequence lengths must be > 0')
    need(args.naflex_patch_size_probs is None or (
        args.naflex_patch_sizes and len(args.naflex_patch_size_probs) == len(args.naflex_patch_sizes)),
        '--naflex-patch-size-probs needs --naflex-patch-sizes with the same number of values')
    need(args.mean is None or len(args.mean) == 3, '--mean takes three values')
    need(args.std is None or len(args.std) == 3, '--std takes three values')
    need(not (args.resume and (args.initial_checkpoint or args.pretrained_path or args.pretrained)),
         '--resume restores the full training state; drop --initial-checkpoint/--pretrained-path/--pretrained')
    need(not (args.initial_checkpoint and args.pretrained_path),
         'give either --initial-checkpoint or --pretrained-path, not both')
    need(not (args.sched == 'none' and args.sched_on_updates), '--sched-on-updates has no effect with --sched none')
    need(args.device.split(':')[0] in ('cuda', 'cpu'), f"--device {args.device}: use 'cuda' or 'cpu'")
    if errors:
        raise ConfigError('; '.join(errors))
