"""train.py's command line: timm's flag names and meanings, mapped onto the typed configs (naflex.train.config).

Each flag is declared once, with the config field it sets (``to=``); its default is read from that field, so the
dataclasses stay the only home of the defaults (timm's train.py values: epochs 300, warmup-epochs 5, sched
cosine, smoothing 0.1, naflex-max-seq-len 576, checkpoint-hist 10, seed 42, ...) and the NaFlexViT model card
command runs as written. Additions of ours: ``--no-naflex-packing`` (timm-style padded batches instead of
packed sequences, NaViT arXiv:2307.06304), ``--attn-backend``, ``--no-jpeg-draft`` and ``--exif-orientation``
(decoding switches; without them training decodes JPEGs with reduced DCT where it applies, and no EXIF rotation),
``--bad-file-limit`` (the share of undecodable training files that stops a run; timm has no such stop).

``-c/--config file.yaml`` sets defaults (unknown keys are an error); flags given on the command line win. The
resolved namespace is what ``train.py`` writes to ``<output>/args.yaml`` (a valid ``-c`` file).
``config_from_args`` builds the ``Config``; ``check_args`` validates all of it and reports every problem in
one ``ConfigError`` line that names the flags, before anything is read or created on disk.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from augment.config import INTERPOLATIONS
from augment.mixup import MixupConfig

from naflex.model import ATTN_BACKENDS

from .config import AMP_DTYPES, CLIP_MODES, EVAL_METRICS, LOSS_SCALES, MODEL_DTYPES, SCHEDULERS, Config
from .timm_flags import TRAIN_REFUSED, refuse

_DEFAULTS = Config(mixup=MixupConfig(num_classes=0))  # where every flag's default is read from
_UNSET = object()

Target = Tuple[str, str, Optional[Callable]]  # (config section, field, value conversion)


class ConfigError(ValueError):
    """A configuration mistake the user can fix; train.py prints it as one line and exits with status 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once and only when it says something: help texts that already explain the default keep
    their wording; switches (off unless given) and unset values (None, '') show none."""

    def _get_help_string(self, action):
        text = action.help or ''
        if 'default' in text or action.default in (None, '', False) or action.nargs == 0:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors become a ConfigError, and which records the config field of every flag."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.targets: Dict[str, List[Target]] = {}    # dest -> the config fields it sets
        self.flag_of: Dict[Tuple[str, str], str] = {}  # (section, field) -> '-b/--batch-size'

    def error(self, message):
        raise ConfigError(f'{message} (see train.py --help)')


def _flag(parser: _Parser, group, *names, to=(), default=_UNSET, **kw) -> None:
    """``group.add_argument`` whose default is the config field ``to`` = (section, field[, convert]) (or a
    list of them: one flag, several fields), unless ``default`` is given (CLI-only meaning)."""
    targets = [to] if to and isinstance(to[0], str) else list(to)
    targets = [(t[0], t[1], t[2] if len(t) > 2 else None) for t in targets]
    if default is _UNSET:
        section, field, _ = targets[0]
        default = getattr(getattr(_DEFAULTS, section), field)
    if isinstance(default, tuple) and kw.get('nargs') in ('+', '*'):
        default = list(default)  # argparse yields lists; args.yaml stays plain YAML
    action = group.add_argument(*names, default=default, **kw)
    parser.targets[action.dest] = targets
    for section, field, _ in targets:
        parser.flag_of.setdefault((section, field), '/'.join(names))


class ParseKwargs(argparse.Action):
    """``--model-kwargs`` / ``--opt-kwargs key=value ...`` as timm's ``timm.utils.ParseKwargs``: each value is read
    as a Python literal (``192``, ``0.1``, ``True``, ``(8, 8)``), anything else as a string (``global_pool=avg``).
    Tuples become lists so args.yaml stays plain YAML (the optimizer gets tuples back); a word without ``=`` is
    one error line (timm raises a ValueError)."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            if not item:
                continue  # as timm's ParseKwargs
            key, sep, text = item.partition('=')
            if not sep or not key:
                parser.error(f'{option_string}: expected KEY=VALUE, got {item!r}')
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
            kwargs[key] = list(value) if isinstance(value, tuple) else value
        setattr(namespace, self.dest, kwargs)


def format_kwargs(kwargs: dict) -> str:
    """The inverse of ``ParseKwargs``: ``{'depth': 6, 'pos_embed_grid_size': [8, 8]}`` as words the command line
    takes back (``depth=6 pos_embed_grid_size=(8,8)``)."""
    def word(v):
        if isinstance(v, (list, tuple)):
            return repr(tuple(v)).replace(' ', '')
        if isinstance(v, str):
            try:
                ast.literal_eval(v)
            except (ValueError, SyntaxError):
                return v  # ParseKwargs reads it back as this string
        return repr(v)
    return ' '.join(f'{k}={word(v)}' for k, v in kwargs.items())


def _not(v):
    return not v


def _tuple(v):
    return None if v is None else tuple(v)


def _dataset_flags(p: _Parser) -> None:
    g = p.add_argument_group('Dataset')
    g.add_argument('data', nargs='?', metavar='DIR', help='the dataset root (positional, deprecated in timm: use '
                   '--data-dir)')
    _flag(p, g, '--data-dir', to=('data', 'root'), metavar='DIR', help='root with one folder per split, class subfolders')
    _flag(p, g, '--dataset', to=('data', 'dataset'), metavar='TYPE/NAME',
          help="'wds/NAME': WebDataset tar shards + _info.json in --data-dir (found without it too); '' = image folder")
    _flag(p, g, '--train-split', to=('data', 'train_split'), help='training split folder')
    _flag(p, g, '--val-split', to=('data', 'val_split'), help="eval split folder ('val' is found too); '' = none")
    _flag(p, g, '--class-map', to=('data', 'class_map'), metavar='FILE',
          help="class names in index order (.txt: one a line; .pkl: name -> index; as given or under --data-dir); "
               "default: timm's folder order (natural sort), or the order a resumed checkpoint records")
    _flag(p, g, '--num-classes', to=('model', 'num_classes'), type=int,
          help='classifier size (default: number of class folders)')
    _flag(p, g, '--train-num-samples', to=('loader', 'num_samples'), type=int, metavar='N',
          help='samples per training epoch (default: the split\'s; fewer: another random subset each epoch, more: '
               'the shuffled order wraps around)')
    _flag(p, g, '--val-num-samples', to=('eval', 'num_samples'), type=int, metavar='N',
          help='evaluate the first N images of the eval split (default: all)')
    _flag(p, g, '--input-key', to=('data', 'input_key'), metavar='EXTS',
          help="tar shards: the image member, e.g. 'jpg;png;webp' (the first a sample has; default: any image)")
    _flag(p, g, '--target-key', to=('data', 'target_key'), metavar='FIELD',
          help="tar shards: the label, a field of the sample's .json (a.b for a nested one; default: its .cls, or "
               "_info.json's alt_label)")
    _flag(p, g, '--input-img-mode', to=('data', 'input_img_mode'), metavar='MODE',
          help="image mode: RGB (the only one here: the model takes 3 channels)")


def _model_flags(p: _Parser) -> None:
    g = p.add_argument_group('Model')
    m = lambda f, conv=None: ('model', f, conv)  # noqa: E731
    _flag(p, g, '--model', to=m('name'), help='model name (naflex.list_models()), optionally NAME.TAG')
    _flag(p, g, '--model-kwargs', to=m('kwargs', dict), nargs='*', action=ParseKwargs, metavar='KEY=VALUE',
          help='model config fields, e.g. embed_dim=192 depth=6 num_heads=3 (saved in args.yaml and checkpoints)')
    _flag(p, g, '--pretrained', to=m('pretrained'), action='store_true',
          help="start from the model's published weights (Hugging Face Hub, cached)")
    _flag(p, g, '--pretrained-path', to=m('pretrained_path'), metavar='PATH',
          help="with --pretrained: a local copy of the published weights (EMA copy preferred; the classifier starts "
               "fresh, as timm's overlay)")
    _flag(p, g, '--initial-checkpoint', to=m('initial_checkpoint'), metavar='PATH',
          help='weights-only start (EMA copy preferred, as timm; a classifier of another size starts fresh)')
    _flag(p, g, '--resume', to=('run', 'resume'), metavar='PATH', help="full-state resume from PATH, or 'auto'")
    _flag(p, g, '--no-resume-opt', to=('run', 'resume_opt', _not), default=False, action='store_true',
          help='resume weights but not optimizer')
    _flag(p, g, '--gp', to=m('global_pool'), metavar='POOL', help='global pool override')
    _flag(p, g, '--mean', to=m('mean', _tuple), type=float, nargs='+', help='normalization mean override')
    _flag(p, g, '--std', to=m('std', _tuple), type=float, nargs='+', help='normalization std override')
    _flag(p, g, '--grad-accum-steps', to=('train', 'grad_accum_steps'), type=int,
          help='micro-batches per optimizer update')
    _flag(p, g, '--grad-checkpointing', to=m('grad_checkpointing'), action='store_true', help='activation checkpointing')
    _flag(p, g, '--torchcompile', to=m('torchcompile'), nargs='?', const='inductor', help='torch.compile the model')
    _flag(p, g, '--torchcompile-mode', to=m('torchcompile_mode'), help='torch.compile mode')
    _flag(p, g, '--attn-backend', to=m('attn_backend'), choices=ATTN_BACKENDS, help='attention kernel')
    _flag(p, g, '--drop', to=m('drop_rate'), type=float, help='dropout rate')
    _flag(p, g, '--drop-path', to=m('drop_path_rate'), type=float, help="stochastic depth rate (default: the model's)")
    _flag(p, g, '--head-init-scale', to=m('head_init_scale'), type=float, help='scale the classifier\'s initial '
          'weight and bias by this')
    _flag(p, g, '--head-init-bias', to=m('head_init_bias'), type=float, help='set the classifier\'s initial bias')
    _flag(p, g, '--interpolation', to=m('interpolation'), metavar='NAME',
          help="eval resize interpolation, and training's with --no-aug (default: the model's, bicubic)")
    _flag(p, g, '--channels-last', to=m('channels_last'), action='store_true',
          help='accepted; no effect: the model holds no 4-D tensor (patches are embedded by a linear layer)')
    g = p.add_argument_group('Device and precision')
    _flag(p, g, '--device', to=('train', 'device'), help="'cuda' or 'cpu' (torchrun picks cuda:LOCAL_RANK)")
    _flag(p, g, '--amp', to=('train', 'amp'), action='store_true', help='mixed precision autocast')
    _flag(p, g, '--amp-dtype', to=('train', 'amp_dtype'), choices=AMP_DTYPES,
          help=f'autocast dtype (default: {_DEFAULTS.train.amp_dtype}, as in timm and validate.py; the model card '
               'uses bfloat16)')
    _flag(p, g, '--model-dtype', to=m('dtype'), choices=MODEL_DTYPES,
          help='dtype of the weights (default float32); bfloat16/float16 train without autocast, not with --amp')
    _flag(p, g, '--synchronize-step', to=('train', 'synchronize_step'), action='store_true',
          help='wait for the device at the end of every update (for timing; slower)')
    _flag(p, g, '--no-ddp-bb', to=('train', 'broadcast_buffers', _not), default=False, action='store_true',
          help="DDP without broadcast_buffers")
    g.add_argument('--local-rank', '--local_rank', type=int, default=0,
                   help="accepted for torch.distributed.launch; the device follows torchrun's LOCAL_RANK")


def _optim_flags(p: _Parser) -> None:
    g = p.add_argument_group('Optimizer (timm.optim.create_optimizer_v2)')
    o = lambda f, conv=None: ('optim', f, conv)  # noqa: E731
    _flag(p, g, '--opt', to=o('opt'), metavar='OPTIMIZER',
          help='a name of timm.optim.list_optimizers() (nadamw, adamw, sgd, momentum, lamb, lion, adopt, ...), '
               'optionally lookahead_NAME')
    _flag(p, g, '--opt-eps', to=o('eps'), type=float, help="optimizer epsilon (default: the optimizer's)")
    _flag(p, g, '--opt-betas', to=o('betas', _tuple), type=float, nargs='+', help="optimizer betas (default: the "
          "optimizer's)")
    _flag(p, g, '--momentum', to=o('momentum'), type=float, help='momentum, for optimizers that take one')
    _flag(p, g, '--weight-decay', to=o('weight_decay'), type=float, help='weight decay')
    _flag(p, g, '--clip-grad', to=o('clip_grad'), type=float, help='gradient clip threshold (off by default)')
    _flag(p, g, '--clip-mode', to=o('clip_mode'), choices=CLIP_MODES, help='gradient clipping mode')
    _flag(p, g, '--layer-decay', to=o('layer_decay'), type=float, help='layer-wise lr decay factor')
    _flag(p, g, '--layer-decay-min-scale', to=o('layer_decay_min_scale'), type=float,
          help='floor of the layer-wise lr scale')
    _flag(p, g, '--layer-decay-no-opt-scale', to=o('layer_decay_no_opt_scale'), type=float,
          help='layers whose lr scale is below this are not trained')
    _flag(p, g, '--opt-kwargs', to=o('kwargs', dict), nargs='*', action=ParseKwargs, metavar='KEY=VALUE',
          help='more optimizer arguments, e.g. caution=True (Python literals, as --model-kwargs)')
    g = p.add_argument_group('Learning-rate schedule (timm.scheduler.create_scheduler_v2)')
    s = lambda f, conv=None: ('sched', f, conv)  # noqa: E731
    _flag(p, g, '--sched', to=s('sched'), choices=SCHEDULERS, help='lr scheduler')
    _flag(p, g, '--sched-on-updates', to=s('on_updates'), action='store_true', help='step the schedule per update')
    _flag(p, g, '--lr', to=o('lr'), type=float, help='peak lr (default: --lr-base scaled by global batch)')
    _flag(p, g, '--lr-base', to=o('lr_base'), type=float, help='lr for a global batch of --lr-base-size')
    _flag(p, g, '--lr-base-size', to=o('lr_base_size'), type=int, help='batch size --lr-base refers to')
    _flag(p, g, '--lr-base-scale', to=o('lr_base_scale'), choices=('', 'linear', 'sqrt'),
          help="lr scaling with batch ('' = sqrt for ada*/lamb* optimizers, linear otherwise)")
    _flag(p, g, '--lr-noise', to=s('noise', _tuple), type=float, nargs='+', metavar='PCT',
          help='lr noise on (and off) point, as fractions of the schedule')
    _flag(p, g, '--lr-noise-pct', to=s('noise_pct'), type=float, help='lr noise limit')
    _flag(p, g, '--lr-noise-std', to=s('noise_std'), type=float, help='lr noise std-dev')
    _flag(p, g, '--lr-cycle-mul', to=s('cycle_mul'), type=float, help='cycle length multiplier (cosine, tanh, poly)')
    _flag(p, g, '--lr-cycle-decay', to=s('cycle_decay'), type=float, help='lr decay per cycle')
    _flag(p, g, '--lr-cycle-limit', to=s('cycle_limit'), type=int, help='number of cycles')
    _flag(p, g, '--lr-k-decay', to=s('k_decay'), type=float, help='k-decay (cosine, poly)')
    _flag(p, g, '--lr-decay-fn', to=s('decay_fn'), help="decay function of wsd / rsqrt (default: '1-sqrt' for wsd, "
          "'linear' for rsqrt)")
    _flag(p, g, '--lr-stable-timescale', to=s('stable_timescale'), type=float,
          help='rsqrt timescale in epochs (default: --warmup-epochs)')
    _flag(p, g, '--warmup-lr', to=s('warmup_lr'), type=float, help='lr at the start of warmup')
    _flag(p, g, '--min-lr', to=s('min_lr'), type=float, help='lr floor of the decaying schedules')
    _flag(p, g, '--epochs', to=s('epochs'), type=int, help='epochs of the schedule')
    _flag(p, g, '--start-epoch', to=s('start_epoch'), type=int, help='start at this epoch (overrides --resume\'s)')
    _flag(p, g, '--decay-milestones', to=s('decay_milestones', _tuple), type=int, nargs='+', metavar='EPOCH',
          help='epochs to decay the lr at (multistep)')
    _flag(p, g, '--decay-epochs', to=s('decay_epochs'), type=float,
          help='epochs between decays (step; default 90), decay length of wsd / rsqrt (default 0.2 of the schedule)')
    _flag(p, g, '--warmup-epochs', to=s('warmup_epochs'), type=int, help='linear warmup epochs (inside --epochs)')
    _flag(p, g, '--warmup-prefix', to=s('warmup_prefix'), action='store_true', help='warmup before the schedule')
    _flag(p, g, '--cooldown-epochs', to=s('cooldown_epochs'), type=int, help='epochs at --min-lr after the schedule')
    _flag(p, g, '--patience-epochs', to=s('patience_epochs'), type=int, help='plateau patience')
    _flag(p, g, '--decay-rate', '--dr', to=s('decay_rate'), type=float,
          help='lr decay rate (step, multistep, plateau), power (poly)')


def _zero_if_none(v):
    return v or 0.0  # timm: None means off


def _aug_flags(p: _Parser) -> None:
    g = p.add_argument_group('Augmentation and regularization')
    a = lambda f, conv=None: ('aug', f, conv)  # noqa: E731
    x = lambda f: ('mixup', f)  # noqa: E731
    _flag(p, g, '--scale', to=a('scale', _tuple), type=float, nargs='+', help='random-resized-crop area range')
    _flag(p, g, '--ratio', to=a('ratio', _tuple), type=float, nargs='+', help='random-resized-crop aspect')
    _flag(p, g, '--hflip', to=a('hflip'), type=float, help='horizontal flip probability')
    _flag(p, g, '--vflip', to=a('vflip'), type=float, help='vertical flip probability')
    _flag(p, g, '--no-aug', to=a('no_aug'), action='store_true',
          help='no augmentation: each training image resized whole like eval (aspect kept), no erasing')
    _flag(p, g, '--color-jitter', to=a('color_jitter'), type=float, help='color jitter strength (without --aa)')
    _flag(p, g, '--color-jitter-prob', to=a('color_jitter_prob'), type=float,
          help='apply color jitter to this share of images (default: all)')
    _flag(p, g, '--grayscale-prob', to=a('grayscale_prob', _zero_if_none), type=float, help='random grayscale probability')
    _flag(p, g, '--gaussian-blur-prob', to=a('gaussian_blur_prob', _zero_if_none), type=float,
          help='random Gaussian blur probability (kernel 23, sigma 0.1-2.0)')
    _flag(p, g, '--aug-repeats', to=('loader', 'aug_repeats'), type=int,
          help='repeated augmentation: copies of each image per epoch, on different ranks (0 = off)')
    _flag(p, g, '--aa', to=a('aa'), help="RandAugment spec, e.g. 'rand-m8-inc1-mstd1.0'")
    _flag(p, g, '--reprob', to=a('reprob'), type=float, help='random erasing probability')
    _flag(p, g, '--remode', to=a('remode'), help='random erasing mode')
    _flag(p, g, '--recount', to=a('recount'), type=int, help='random erasing count')
    # timm: no MixUp/CutMix unless asked for (MixupConfig's alphas are the values used once it is on)
    _flag(p, g, '--mixup', to=x('mixup_alpha'), default=0.0, type=float, help='mixup alpha (0 = off)')
    _flag(p, g, '--cutmix', to=x('cutmix_alpha'), default=0.0, type=float, help='cutmix alpha (0 = off)')
    _flag(p, g, '--mixup-prob', to=x('prob'), type=float, help='probability of mixup/cutmix per batch')
    _flag(p, g, '--mixup-switch-prob', to=x('switch_prob'), type=float, help='cutmix instead of mixup probability')
    _flag(p, g, '--mixup-off-epoch', to=x('off_epoch'), type=int, help='turn mixup off from this epoch (0 = never)')
    _flag(p, g, '--smoothing', to=[('train', 'smoothing'), x('smoothing')], type=float, help='label smoothing')
    _flag(p, g, '--bce-loss', to=('train', 'bce_loss'), action='store_true',
          help="binary cross-entropy (timm's BinaryCrossEntropy) instead of cross-entropy")
    _flag(p, g, '--bce-sum', to=('train', 'bce_sum'), action='store_true', help='BCE: sum over classes')
    _flag(p, g, '--bce-target-thresh', to=('train', 'bce_target_thresh'), type=float,
          help='BCE: binarize the (soft) targets above this')
    _flag(p, g, '--bce-pos-weight', to=('train', 'bce_pos_weight'), type=float, help='BCE: weight of positives')
    _flag(p, g, '--train-interpolation', to=a('interpolation'), metavar='|'.join(INTERPOLATIONS),
          help='training resize interpolation')
    _flag(p, g, '--no-jpeg-draft', to=a('draft', _not), default=False, action='store_true',
          help="decode training JPEGs in full like timm (default: reduced-DCT decoding when a crop is "
               "downscaled >= 2x, which is faster)")
    _flag(p, g, '--exif-orientation', to=[a('exif_orientation'), ('eval', 'exif_orientation')], action='store_true',
          help="turn images upright by their EXIF orientation tag, in training and eval (default: no, like timm)")
    g = p.add_argument_group('EMA')
    _flag(p, g, '--model-ema', to=('ema', 'enabled'), action='store_true', help='keep an EMA of the weights')
    _flag(p, g, '--model-ema-decay', to=('ema', 'decay'), type=float, help='EMA decay per update')
    _flag(p, g, '--model-ema-warmup', to=('ema', 'warmup'), action='store_true', help='ramp the EMA decay up')


def _naflex_flags(p: _Parser) -> None:
    g = p.add_argument_group('NaFlex')
    g.add_argument('--naflex-loader', action='store_true', default=False,
                   help='accepted for timm compatibility; the NaFlex loader is always used')
    _flag(p, g, '-b', '--batch-size', to=('loader', 'batch_size'), type=int,
          help='per-process images per step at the longest sequence length (token budget b x max L)')
    _flag(p, g, '-vb', '--validation-batch-size', to=('eval', 'batch_size'), default=None, type=int,
          help='eval batch size (default -b)')
    _flag(p, g, '--naflex-train-seq-lens', to=('loader', 'seq_lens', _tuple), type=int, nargs='+',
          help='training sequence lengths, one drawn per step')
    _flag(p, g, '--naflex-max-seq-len', to=('eval', 'max_seq_len'), type=int, help='eval sequence length')
    _flag(p, g, '--naflex-patch-sizes', to=('loader', 'patch_sizes', _tuple), type=int, nargs='+',
          help='variable patch sizes (FlexiViT)')
    _flag(p, g, '--naflex-patch-size-probs', to=('loader', 'patch_size_probs', _tuple), type=float, nargs='+',
          help='patch size weights')
    _flag(p, g, '--naflex-loss-scale', to=('train', 'loss_scale'), choices=LOSS_SCALES,
          help='scale the loss by (step batch / -b) like timm')
    _flag(p, g, '--no-naflex-packing', to=[('loader', 'packing', _not), ('eval', 'packing', _not)], default=False,
          action='store_true', help='timm-style padded batches instead of packed sequences')


def _run_flags(p: _Parser) -> None:
    g = p.add_argument_group('Run')
    t = lambda f: ('train', f)  # noqa: E731
    _flag(p, g, '--seed', to=[t('seed'), ('loader', 'seed')], type=int, help='random seed')
    _flag(p, g, '--log-interval', to=t('log_interval'), type=int, help='log every N updates')
    _flag(p, g, '--val-interval', to=t('val_interval'), type=int, help='evaluate every N epochs')
    _flag(p, g, '--recovery-interval', to=t('recovery_interval'), type=int, help='mid-epoch recovery save every N updates')
    _flag(p, g, '--checkpoint-hist', to=t('checkpoint_hist'), type=int, help='best checkpoints kept')
    _flag(p, g, '--bad-file-limit', to=t('bad_file_limit'), type=float, metavar='FRACTION',
          help='stop training once more than this share of the decode attempts has failed (judged after 1000 '
               'samples, or one epoch of a smaller dataset; 1 = no limit)')
    _flag(p, g, '-j', '--workers', to=[('loader', 'num_workers'), ('eval', 'num_workers')], type=int,
          help='loader worker processes per rank')
    _flag(p, g, '--pin-mem', to=[('loader', 'pin_memory', _pin), ('eval', 'pin_memory', _pin)], default=False,
          action='store_true', help='pin host memory (always on for CUDA)')
    _flag(p, g, '--output', to=('run', 'output'), metavar='PATH', help='output root')
    _flag(p, g, '--experiment', to=('run', 'experiment'),
          help='run folder name under --output (default: date-model); a folder holding a run is only continued, '
               'with --resume auto')
    _flag(p, g, '--eval-metric', to=t('eval_metric'), choices=EVAL_METRICS, help='best-checkpoint metric')
    _flag(p, g, '--log-wandb', to=('run', 'log_wandb'), action='store_true',
          help='also log the per-epoch summary to Weights & Biases (pip install wandb)')
    _flag(p, g, '--wandb-project', to=('run', 'wandb_project'), metavar='NAME', help='wandb project')
    _flag(p, g, '--wandb-tags', to=('run', 'wandb_tags', _tuple), nargs='+', metavar='TAG', help='wandb tags')
    _flag(p, g, '--wandb-resume-id', to=('run', 'wandb_resume_id'), metavar='ID',
          help='with --resume: continue this wandb run')


def _pin(v):
    return True if v else None  # None: pinned whenever CUDA is available


FLAG_GROUPS = {'dataset': _dataset_flags, 'model': _model_flags, 'optim': _optim_flags, 'aug': _aug_flags,
               'naflex': _naflex_flags, 'run': _run_flags}


def build_parser(groups: Sequence[str] = tuple(FLAG_GROUPS), prog: str = 'train.py') -> _Parser:
    """train.py's parser; ``groups`` picks flag groups for tools that take a subset (the loader benchmarks)."""
    p = _Parser(prog=prog, description='Train a NaFlexViT (timm-compatible flags).', formatter_class=_HelpFormatter)
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file whose keys set flag defaults')
    for name in groups:
        FLAG_GROUPS[name](p)
    if tuple(groups) == tuple(FLAG_GROUPS):
        refuse(p, TRAIN_REFUSED)  # timm's flags that do not apply: one line each, with the reason
    return p


def config_from_args(args: argparse.Namespace, parser: Optional[_Parser] = None) -> Config:
    """The typed configuration the flags describe (nothing is validated or resolved here)."""
    parser = parser or build_parser()
    parts: Dict[str, dict] = {s: {} for s in Config.SECTIONS}
    for dest, targets in parser.targets.items():
        if not hasattr(args, dest):
            continue
        for section, field, conv in targets:
            value = getattr(args, dest)
            parts[section][field] = conv(value) if conv is not None else value
    if parts['eval'].get('batch_size') is None and 'batch_size' in parts['loader']:
        parts['eval']['batch_size'] = parts['loader']['batch_size']  # -vb defaults to -b
    mix = parts.pop('mixup')
    on = mix.get('mixup_alpha', 0) > 0 or mix.get('cutmix_alpha', 0) > 0
    cfg = Config(**{s: dataclasses.replace(getattr(_DEFAULTS, s), **v) for s, v in parts.items()})
    cfg.mixup = MixupConfig(num_classes=0, **mix) if on else None
    return cfg


def flag_namer(parser: _Parser) -> Callable[[str, str], str]:
    """(section, field) -> the flag that sets it, for messages."""
    return lambda section, field: parser.flag_of.get((section, field), f'{section}.{field}')


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line that keeps where it happened (1-based line and column)."""
    def where(mark):
        return f'line {mark.line + 1}, column {mark.column + 1}'
    problem, mark = getattr(e, 'problem', None), getattr(e, 'problem_mark', None)
    if not problem:
        return ' '.join(str(e).split())
    text = f'{where(mark)}: {problem}' if mark is not None else problem
    context, context_mark = getattr(e, 'context', None), getattr(e, 'context_mark', None)
    if context:
        text += f' ({context}' + (f' started at {where(context_mark)})' if context_mark is not None else ')')
    return text


def _load_yaml_defaults(parser: argparse.ArgumentParser, path: str) -> None:
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f'config file not found: {path}') from None
    except yaml.YAMLError as e:
        raise ConfigError(f'config file {path} is not valid YAML: {_yaml_problem(e)}') from None
    if not isinstance(cfg, dict):
        raise ConfigError(f'config file {path} must hold a mapping of flag names to values')
    known = {a.dest for a in parser._actions}
    cfg = {k.replace('-', '_'): v for k, v in cfg.items()}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f'config file {path} has unknown keys: {", ".join(unknown)}')
    cfg.pop('config', None)
    parser.set_defaults(**cfg)


def parse_config(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, Config]:
    """Parse flags (after ``-c`` YAML defaults) and check them; returns the namespace and the checked Config."""
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    cfg_args, _ = config_parser.parse_known_args(argv)
    if cfg_args.config:
        _load_yaml_defaults(parser, cfg_args.config)
    args = parser.parse_args(argv)
    if args.data and not args.data_dir:
        args.data_dir = args.data  # timm's positional dataset root
    return args, check_args(args, parser)


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, str]:
    """Parse flags (after ``-c`` YAML defaults) and check them; returns the namespace and its args.yaml text."""
    args, _ = parse_config(argv)
    return args, args_yaml(args)


def args_yaml(args: argparse.Namespace, **resolved) -> str:
    """``args`` (with ``resolved`` values such as the derived lr) as the YAML text of args.yaml (a ``-c`` file)."""
    return yaml.safe_dump(dict(vars(args), **resolved), default_flow_style=False, sort_keys=True)


# where a run is written and read from: these differ between a run and its resumption without changing it
_RUN_LOCATION = ('config', 'resume', 'no_resume_opt', 'output', 'experiment')


def changed_flags(before, now: Dict, parser: Optional[_Parser] = None) -> List[str]:
    """'--flag OLD -> NEW' for every flag whose value in ``now`` (resolved args) differs from ``before`` (the args
    stored in a checkpoint: a dict, or timm's argparse.Namespace); flags only one of them knows are skipped."""
    before = vars(before) if isinstance(before, argparse.Namespace) else dict(before or {})
    parser = parser or build_parser()
    flag = {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}
    return [f'{flag.get(k, k)} {before[k]} -> {v}' for k, v in sorted(now.items())
            if k in before and k not in _RUN_LOCATION and before[k] != v]


def check_args(args: argparse.Namespace, parser: Optional[_Parser] = None) -> Config:
    """Validate every part of the configuration; ConfigError (one line naming the flags) on any problem."""
    parser = parser or build_parser()
    cfg = config_from_args(args, parser)
    try:
        cfg.validate(flag_namer(parser))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


__all__ = ['ConfigError', 'ParseKwargs', 'args_yaml', 'build_parser', 'changed_flags', 'check_args',
           'config_from_args', 'flag_namer', 'format_kwargs', 'parse_args', 'parse_config']
