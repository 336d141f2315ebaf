"""The trainer's typed configuration: one dataclass per concern, the one home of each default, ``validate()``.

Defaults are timm train.py's (epochs 300, warmup-epochs 5, cosine, min-lr 0, smoothing 0.1, checkpoint-hist 10,
log-interval 50, ...), so the NaFlexViT model card command (SigLIP 2 NaFlex, arXiv:2502.14786) means what it
means in timm. ``Config`` bundles these with the data and augmentation configs their own packages own
(loaders.config, augment.config, augment.mixup) and the model options; ``Config.validate`` checks every part,
and the settings that only make sense together, before anything is created on disk.

``validate(name)`` reports field names; the CLI passes ``name`` to print its flags instead (naflex.train.cli).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from augment.config import INTERPOLATIONS, AugConfig, Problems, flag
from augment.mixup import MixupConfig
from loaders.config import DatasetConfig, EvalLoaderConfig, TrainLoaderConfig
from naflex.model import ATTN_BACKENDS, DEFAULT_MODEL, NaFlexVitCfg, get_config

CLIP_MODES = ('norm', 'value', 'agc')  # timm.utils.dispatch_clip_grad's modes
# timm.scheduler.create_scheduler_v2's names (timm 1.0.31; tests/test_schedule.py checks the list against timm)
SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'wsd', 'rsqrt', 'constant', 'none')
LOSS_SCALES = ('none', 'sqrt', 'linear')
EVAL_METRICS = ('top1', 'top5', 'loss')
AMP_DTYPES = ('float16', 'bfloat16')
EVAL_INTERPOLATIONS = tuple(i for i in INTERPOLATIONS if i != 'random')  # one filter for every eval image
MODEL_DTYPES = ('float32', 'float16', 'bfloat16')  # --model-dtype: the weights' dtype (timm's choices)

Namer = Optional[Callable[[str], str]]


# Eager FlexAttention (no torch.compile) computes the full [heads, T, T] score matrix of a packed step in float32:
# above this it would run out of memory (the card's 64 x 1024 tokens and 12 heads need ~190 GiB per layer).
EAGER_FLEX_MAX_BYTES = 4 << 30


def attention_problems(backend: str, *, device: str, amp: bool, packing: bool, compiled: bool, training: bool,
                       tokens_per_step: int, num_heads: int, flag: Callable[[str], str]) -> List[str]:
    """What is wrong with running attention ``backend`` in this setting (train.py and validate.py share it).

    ``flag(key)`` names the flag for 'attn_backend', 'packing', 'amp', 'torchcompile' in the caller's CLI.
    """
    from naflex.model.attention import available_backends
    device_type = device.split(':')[0]
    if device_type not in ('cpu', 'cuda'):
        return []  # TrainConfig.validate reports the device itself
    on_cpu = device_type == 'cpu'
    usable = ['auto'] + [b for b in available_backends(device_type) if amp or b != 'varlen']
    if training and on_cpu:
        usable.remove('flex')  # torch 2.14: FlexAttention has no backward pass on the CPU, compiled or not
    where = ('the CPU' if on_cpu else 'CUDA in float32') + (' for training' if training and on_cpu else '')
    attn = f'{flag("attn_backend")} {backend}'
    if backend != 'auto' and not packing:
        return [f'{attn} applies to packed batches: {flag("packing")} pads them like timm and always uses SDPA '
                'with a mask; drop one of the two']
    if backend == 'varlen' and backend not in usable:
        return [f'{attn} needs a CUDA device and fp16/bf16 attention ({flag("amp")} --amp-dtype bfloat16); '
                f'backends that work on {where}: {", ".join(usable)}']
    if backend == 'flex' and backend not in usable:
        return [f'{attn}: FlexAttention has no backward pass on the CPU; backends that work on {where}: '
                f'{", ".join(usable)}']
    score_bytes = num_heads * tokens_per_step ** 2 * 4
    if backend == 'flex' and not compiled and score_bytes > EAGER_FLEX_MAX_BYTES:
        return [f'{attn} without {flag("torchcompile")} runs eagerly and materialises a T x T score matrix per '
                f'head: T = {tokens_per_step} tokens per step x {num_heads} heads = {score_bytes / 2 ** 30:,.0f} GiB '
                f'per layer; add {flag("torchcompile")}, or use auto or sdpa_padded']
    return []


def _compile_problems(backend: str, mode: Optional[str], name: Callable[[str], str]) -> List[str]:
    """torch.compile checks its backend and mode only when it first runs: check them before the run starts."""
    from torch._dynamo import list_backends  # imported only when compiling: it costs seconds
    problems = []
    if backend not in list_backends(exclude_tags=()):
        problems.append(f'{name("torchcompile")} {backend} is not a torch.compile backend; valid: '
                        f'{", ".join(list_backends())}')
    if mode is not None:
        from torch._inductor import list_mode_options
        if mode not in list_mode_options():
            problems.append(f'{name("torchcompile_mode")} {mode} is not a torch.compile mode; valid: '
                            f'{", ".join(list_mode_options())}')
    return problems


@dataclass
class ModelConfig:
    """Which model to build and how to start it (the architecture itself: naflex.model's registry)."""
    name: str = flag('--model', default=DEFAULT_MODEL,
                     help='model name (naflex.list_models()), optionally NAME.TAG, hf-hub:timm/NAME.TAG or '
                          'local-dir:PATH (a save_for_hf folder)')
    num_classes: Optional[int] = flag('--num-classes', default=None, group='dataset',
                                      help='classifier size (default: number of class folders)')
    pretrained: bool = flag('--pretrained', default=False,
                            help="start from the model's published weights (Hugging Face Hub, cached)")
    pretrained_path: Optional[str] = flag('--pretrained-path', default=None, metavar='PATH',
                                          help='with --pretrained: a local copy of the published weights (EMA copy '
                                               "preferred; the classifier starts fresh, as timm's overlay)")
    initial_checkpoint: str = flag('--initial-checkpoint', default='', metavar='PATH',
                                   help='weights-only start (EMA copy preferred, as timm; a classifier of another '
                                        'size starts fresh)')
    global_pool: Optional[str] = flag('--gp', default=None, metavar='POOL', help='global pool override')
    drop_rate: float = flag('--drop', default=NaFlexVitCfg.drop_rate, help='dropout rate')
    drop_path_rate: Optional[float] = flag('--drop-path', default=None,
                                           help="stochastic depth rate (default: the model's)")
    patch_drop_rate: Optional[float] = flag('--patch-drop-rate', default=None,
                                            help="patch dropout: each image trains on about 1 - RATE of its patch "
                                                 "tokens (timm's patch_drop_rate; default: the model's)")
    attn_backend: str = flag('--attn-backend', default=NaFlexVitCfg.attn_backend, choices=ATTN_BACKENDS,
                             help='attention kernel')
    grad_checkpointing: bool = flag('--grad-checkpointing', default=False, help='activation checkpointing')
    mean: Optional[Tuple[float, ...]] = flag('--mean', default=None, help='normalization mean override')
    std: Optional[Tuple[float, ...]] = flag('--std', default=None, help='normalization std override')
    interpolation: Optional[str] = flag('--interpolation', default=None, metavar='NAME',
                                        help="eval resize interpolation, and training's with --no-aug (default: the "
                                             "model's, bicubic)")
    torchcompile: Optional[str] = flag('--torchcompile', default=None, nargs='?', const='inductor',
                                       help='torch.compile the model')
    torchcompile_mode: Optional[str] = flag('--torchcompile-mode', default=None, help='torch.compile mode')
    head_init_scale: Optional[float] = flag('--head-init-scale', default=None,
                                            help="scale the classifier's initial weight and bias by this")
    head_init_bias: Optional[float] = flag('--head-init-bias', default=None, help="set the classifier's initial bias")
    dtype: Optional[str] = flag('--model-dtype', default=None, group='device', choices=MODEL_DTYPES,
                                help='dtype of the weights (default float32); bfloat16/float16 train without '
                                     'autocast, not with --amp')
    channels_last: bool = flag('--channels-last', default=False,
                               help='accepted; no effect: the model holds no 4-D tensor (patches are embedded by a '
                                    'linear layer)')
    kwargs: Dict[str, Any] = flag('--model-kwargs', factory=dict,
                                  help='model config fields, e.g. embed_dim=192 depth=6 num_heads=3 (saved in '
                                       'args.yaml and checkpoints)')

    # model settings with a flag of their own: set there, not in --model-kwargs
    FLAG_FIELDS = ('num_classes', 'drop_rate', 'drop_path_rate', 'patch_drop_rate', 'global_pool', 'attn_backend')

    def overrides(self, num_classes: int) -> dict:
        """Keyword overrides for ``naflex.create_model``."""
        kw = dict(self.kwargs, num_classes=num_classes, drop_rate=self.drop_rate)
        if self.drop_path_rate is not None:
            kw['drop_path_rate'] = self.drop_path_rate
        if self.patch_drop_rate is not None:
            kw['patch_drop_rate'] = self.patch_drop_rate
        if self.global_pool is not None:
            kw['global_pool'] = self.global_pool
        return kw

    def _kwargs_problems(self, p: Problems) -> None:
        """--model-kwargs: every key a NaFlexVitCfg field without a flag of its own, the result a valid config."""
        p.need(isinstance(self.kwargs, dict), 'kwargs', f'takes KEY=VALUE pairs, got {self.kwargs!r}')
        if not isinstance(self.kwargs, dict):
            return
        fields = {f.name for f in dataclasses.fields(NaFlexVitCfg)} - set(self.FLAG_FIELDS)
        own_flag = sorted(set(self.kwargs) & set(self.FLAG_FIELDS))
        unknown = sorted(set(self.kwargs) - fields - set(own_flag))
        p.need(not own_flag, 'kwargs', f'{", ".join(own_flag)}: set with {", ".join(p.name(k) for k in own_flag)}')
        p.need(not unknown, 'kwargs', f'unknown key(s) {", ".join(unknown)}; valid: {", ".join(sorted(fields))}')
        if own_flag or unknown:
            return
        try:
            dataclasses.replace(get_config(self.name), **self.kwargs).validate()
        except ValueError as e:
            p.items.append(f'{p.name("kwargs")} {e}')

    def validate(self, name: Namer = None) -> None:
        p = Problems(name)
        try:
            get_config(self.name)
        except ValueError as e:
            p.items.append(str(e))
        else:
            self._kwargs_problems(p)
        p.need(self.attn_backend in ATTN_BACKENDS, 'attn_backend', f'{self.attn_backend!r}: valid {ATTN_BACKENDS}')
        p.need(self.num_classes is None or self.num_classes >= 1, 'num_classes', 'must be >= 1')
        p.need(0 <= self.drop_rate < 1, 'drop_rate', 'must be in [0, 1)')
        p.need(self.drop_path_rate is None or 0 <= self.drop_path_rate < 1, 'drop_path_rate', 'must be in [0, 1)')
        p.need(self.patch_drop_rate is None or 0 <= self.patch_drop_rate < 1, 'patch_drop_rate', 'must be in [0, 1)')
        p.need(self.mean is None or len(self.mean) == 3, 'mean', 'takes three values')
        p.need(self.std is None or len(self.std) == 3, 'std', 'takes three values')
        p.need(self.std is None or all(s > 0 for s in self.std), 'std', 'must be > 0 (the patches are divided by it)')
        p.need(self.interpolation is None or self.interpolation in EVAL_INTERPOLATIONS, 'interpolation',
               f'{self.interpolation!r} is not one of {", ".join(EVAL_INTERPOLATIONS)}')
        p.need(self.dtype is None or self.dtype in MODEL_DTYPES, 'dtype', f'must be one of {", ".join(MODEL_DTYPES)}')
        # timm's meaning: a local copy of the published weights, read only with --pretrained (timm then ignores it
        # without a word; here it is one line)
        p.need(not self.pretrained_path or self.pretrained, 'pretrained_path',
               f'{self.pretrained_path} is read with {p.name("pretrained")} (as in timm: a local copy of the published '
               f'weights); add {p.name("pretrained")}, or pass the file as {p.name("initial_checkpoint")}')
        if self.torchcompile:
            p.items.extend(_compile_problems(self.torchcompile, self.torchcompile_mode, p.name))
        else:
            p.need(self.torchcompile_mode is None, 'torchcompile_mode',
                   f'has no effect without {p.name("torchcompile")}')
        p.raise_any()


@dataclass
class OptimConfig:
    """Optimizer and gradient clipping: timm's optimizers and flags (naflex.train.optim builds them)."""
    opt: str = flag('--opt', default='sgd', metavar='OPTIMIZER',
                    help='a name of timm.optim.list_optimizers() (nadamw, adamw, sgd, momentum, lamb, lion, adopt, '
                         '...), optionally lookahead_NAME')
    lr: Optional[float] = flag('--lr', default=None, group='sched',
                               help='peak lr (default: --lr-base scaled by global batch)')
    lr_base: float = flag('--lr-base', default=0.1, group='sched', help='lr for a global batch of --lr-base-size')
    lr_base_size: int = flag('--lr-base-size', default=256, group='sched', help='batch size --lr-base refers to')
    lr_base_scale: str = flag('--lr-base-scale', default='', group='sched', choices=('', 'linear', 'sqrt'),
                              help="lr scaling with batch ('' = sqrt for ada*/lamb* optimizers, linear otherwise)")
    eps: Optional[float] = flag('--opt-eps', default=None, help="optimizer epsilon (default: the optimizer's)")
    betas: Optional[Tuple[float, ...]] = flag('--opt-betas', default=None,
                                              help="optimizer betas (default: the optimizer's)")
    momentum: float = flag('--momentum', default=0.9, help='momentum, for optimizers that take one')
    weight_decay: float = flag('--weight-decay', default=2e-5, help='weight decay')
    clip_grad: Optional[float] = flag('--clip-grad', default=None, help='gradient clip threshold (off by default)')
    clip_mode: str = flag('--clip-mode', default='norm', choices=CLIP_MODES, help='gradient clipping mode')
    layer_decay: Optional[float] = flag('--layer-decay', default=None, help='layer-wise lr decay factor')
    layer_decay_min_scale: float = flag('--layer-decay-min-scale', default=0.0, help='floor of the layer-wise lr scale')
    layer_decay_no_opt_scale: Optional[float] = flag('--layer-decay-no-opt-scale', default=None,
                                                     help='layers whose lr scale is below this are not trained')
    kwargs: Dict[str, Any] = flag('--opt-kwargs', factory=dict,
                                  help='more optimizer arguments, e.g. caution=True (Python literals, as '
                                       '--model-kwargs)')

    def resolved_lr(self, global_batch: int) -> float:
        """timm: without --lr, --lr-base scaled by global batch / --lr-base-size (sqrt for ada*/lamb* optimizers)."""
        if self.lr:
            return self.lr
        ratio = global_batch / self.lr_base_size
        scale = self.lr_base_scale or ('sqrt' if any(o in self.opt.lower() for o in ('ada', 'lamb')) else 'linear')
        return self.lr_base * (math.sqrt(ratio) if scale == 'sqrt' else ratio)

    def validate(self, name: Namer = None) -> None:
        from .optim import optimizer_problems  # timm's optimizer registry decides what is valid
        p = Problems(name)
        p.need(self.lr is None or self.lr > 0, 'lr', 'must be > 0')
        p.need(self.lr_base > 0 and self.lr_base_size >= 1, 'lr_base', f'and {p.name("lr_base_size")} must be > 0')
        p.need(self.lr_base_scale in ('', 'linear', 'sqrt'), 'lr_base_scale', "must be '', 'linear' or 'sqrt'")
        p.need(self.eps is None or self.eps > 0, 'eps', 'must be > 0')
        p.need(self.betas is None or all(0 <= b < 1 for b in self.betas), 'betas', 'takes values in [0, 1)')
        p.need(self.momentum >= 0, 'momentum', 'must be >= 0')
        p.need(self.weight_decay >= 0, 'weight_decay', 'must be >= 0')
        p.need(self.clip_grad is None or self.clip_grad > 0, 'clip_grad', 'must be > 0')
        p.need(self.clip_mode in CLIP_MODES, 'clip_mode', f'must be one of {", ".join(CLIP_MODES)}')
        p.need(self.layer_decay is None or 0 < self.layer_decay <= 1, 'layer_decay', 'must be in (0, 1]')
        p.need(isinstance(self.kwargs, dict), 'kwargs', f'takes KEY=VALUE pairs, got {self.kwargs!r}')
        if not p.items:
            p.items.extend(optimizer_problems(self, p.name))
        p.raise_any()


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: timm's schedulers and flags (naflex.train.schedule builds them with timm's
    create_scheduler_v2). Field names are create_scheduler_v2's; the comments name the flags."""
    sched: str = flag('--sched', default='cosine', choices=SCHEDULERS, help='lr scheduler')
    on_updates: bool = flag('--sched-on-updates', default=False, help='step the schedule per update')
    warmup_lr: float = flag('--warmup-lr', default=1e-5, help='lr at the start of warmup')
    min_lr: float = flag('--min-lr', default=0.0, help='lr floor of the decaying schedules')
    epochs: int = flag('--epochs', default=300, help='epochs of the schedule')
    start_epoch: Optional[int] = flag('--start-epoch', default=None, help="start at this epoch (overrides --resume's)")
    warmup_epochs: int = flag('--warmup-epochs', default=5, help='linear warmup epochs (inside --epochs)')
    warmup_prefix: bool = flag('--warmup-prefix', default=False, help='warmup before the schedule')
    cooldown_epochs: int = flag('--cooldown-epochs', default=0, help='epochs at --min-lr after the schedule')
    # None: timm's factory default, 90 epochs for step, 0.2 of the schedule for wsd / rsqrt
    decay_epochs: Optional[float] = flag('--decay-epochs', default=None,
                                         help='epochs between decays (step; default 90), decay length of wsd / rsqrt '
                                              '(default 0.2 of the schedule)')
    decay_milestones: Tuple[int, ...] = flag('--decay-milestones', default=(90, 180, 270), metavar='EPOCH',
                                             help='epochs to decay the lr at (multistep)')
    decay_rate: float = flag('--decay-rate', '--dr', default=0.1,
                             help='lr decay rate (step, multistep, plateau), power (poly)')
    patience_epochs: int = flag('--patience-epochs', default=10, help='plateau patience')
    noise: Optional[Tuple[float, ...]] = flag('--lr-noise', default=None, metavar='PCT',
                                              help='lr noise on (and off) point, as fractions of the schedule')
    noise_pct: float = flag('--lr-noise-pct', default=0.67, help='lr noise limit')
    noise_std: float = flag('--lr-noise-std', default=1.0, help='lr noise std-dev')
    cycle_mul: float = flag('--lr-cycle-mul', default=1.0, help='cycle length multiplier (cosine, tanh, poly)')
    cycle_decay: float = flag('--lr-cycle-decay', default=0.5, help='lr decay per cycle')
    cycle_limit: int = flag('--lr-cycle-limit', default=1, help='number of cycles')
    k_decay: float = flag('--lr-k-decay', default=1.0, help='k-decay (cosine, poly)')
    decay_fn: Optional[str] = flag('--lr-decay-fn', default=None,
                                   help="decay function of wsd / rsqrt (default: '1-sqrt' for wsd, 'linear' for "
                                        'rsqrt)')
    stable_timescale: Optional[float] = flag('--lr-stable-timescale', default=None,
                                             help='rsqrt timescale in epochs (default: --warmup-epochs)')

    def validate(self, name: Namer = None) -> None:
        from .schedule import schedule_problems  # timm's factory decides what is valid
        p = Problems(name)
        p.need(self.sched in SCHEDULERS, 'sched',
               f'{self.sched} is not a timm scheduler; valid: {", ".join(SCHEDULERS)}')
        p.need(self.epochs >= 1, 'epochs', 'must be >= 1')
        p.need(self.warmup_epochs >= 0 and self.cooldown_epochs >= 0, 'warmup_epochs',
               f'and {p.name("cooldown_epochs")} must be >= 0')
        p.need(self.start_epoch is None or self.start_epoch >= 0, 'start_epoch', 'must be >= 0')
        p.need(not (self.sched == 'none' and self.on_updates), 'on_updates',
               f'has no effect with {p.name("sched")} none')
        p.need(not (self.sched == 'plateau' and self.on_updates), 'on_updates',
               f'does not apply to {p.name("sched")} plateau: timm steps it once per epoch, with the eval metric')
        p.need(self.noise is None or len(self.noise) in (1, 2), 'noise', 'takes one or two fractions of the schedule')
        if not p.items:
            p.items.extend(schedule_problems(self, p.name))
        p.raise_any()


@dataclass
class EmaConfig:
    """Exponential moving average of the weights (timm ModelEmaV3 semantics)."""
    enabled: bool = flag('--model-ema', default=False, help='keep an EMA of the weights')
    decay: float = flag('--model-ema-decay', default=0.9998, help='EMA decay per update')
    warmup: bool = flag('--model-ema-warmup', default=False, help='ramp the EMA decay up')

    def validate(self, name: Namer = None) -> None:
        p = Problems(name)
        p.need(0 < self.decay < 1, 'decay', 'must be in (0, 1)')
        p.raise_any()


@dataclass
class TrainConfig:
    """The training loop: precision, accumulation, loss, logging, evaluation and checkpoint cadence."""
    device: str = flag('--device', default='cuda', group='device',
                       help="'cuda' or 'cpu' (torchrun picks cuda:LOCAL_RANK)")
    amp: bool = flag('--amp', default=False, group='device', help='mixed precision autocast')
    amp_dtype: str = flag('--amp-dtype', default='float16', group='device', choices=AMP_DTYPES,
                          help='autocast dtype (as in timm and validate.py; the model card uses bfloat16)')
    grad_accum_steps: int = flag('--grad-accum-steps', default=1, group='model',
                                 help='micro-batches per optimizer update')
    loss_scale: str = flag('--naflex-loss-scale', default='linear', group='naflex', choices=LOSS_SCALES,
                           help='scale the loss by (step batch / -b) like timm')
    smoothing: float = flag('--smoothing', default=MixupConfig.smoothing, group='aug', help='label smoothing')
    seed: int = flag('--seed', default=TrainLoaderConfig.seed, help='random seed')
    log_interval: int = flag('--log-interval', default=50, help='log every N updates')
    val_interval: int = flag('--val-interval', default=1, help='evaluate every N epochs')
    recovery_interval: int = flag('--recovery-interval', default=0, help='mid-epoch recovery save every N updates')
    bad_file_limit: float = flag('--bad-file-limit', default=0.01, metavar='FRACTION',
                                 help='stop training once more than this share of the decode attempts has failed '
                                      '(judged after 1000 samples, or one epoch of a smaller dataset; 1 = no limit)')
    checkpoint_hist: int = flag('--checkpoint-hist', default=10, help='best checkpoints kept')
    eval_metric: str = flag('--eval-metric', default='top1', choices=EVAL_METRICS, help='best-checkpoint metric')
    bce_loss: bool = flag('--bce-loss', default=False, group='aug',
                          help="binary cross-entropy (timm's BinaryCrossEntropy) instead of cross-entropy")
    bce_sum: bool = flag('--bce-sum', default=False, group='aug', help='BCE: sum over classes')
    bce_target_thresh: Optional[float] = flag('--bce-target-thresh', default=None, group='aug',
                                              help='BCE: binarize the (soft) targets above this')
    bce_pos_weight: Optional[float] = flag('--bce-pos-weight', default=None, group='aug',
                                           help='BCE: weight of positives')
    synchronize_step: bool = flag('--synchronize-step', default=False, group='device',
                                  help='wait for the device at the end of every update (for timing; slower)')
    broadcast_buffers: bool = flag('--no-ddp-bb', default=True, group='device', invert=True,
                                   help='DDP without broadcast_buffers')

    def validate(self, name: Namer = None) -> None:
        p = Problems(name)
        p.need(self.device.split(':')[0] in ('cuda', 'cpu'), 'device', f"{self.device}: use 'cuda' or 'cpu'")
        for bce in ('bce_sum', 'bce_target_thresh', 'bce_pos_weight'):
            p.need(self.bce_loss or getattr(self, bce) in (None, False), bce,
                   f'has no effect without {p.name("bce_loss")}')
        p.need(self.amp_dtype in AMP_DTYPES, 'amp_dtype', f'must be one of {", ".join(AMP_DTYPES)}')
        p.need(self.grad_accum_steps >= 1, 'grad_accum_steps', 'must be >= 1')
        p.need(self.loss_scale in LOSS_SCALES, 'loss_scale', f'must be one of {", ".join(LOSS_SCALES)}')
        p.need(0 <= self.smoothing < 1, 'smoothing', 'must be in [0, 1)')
        p.need(self.log_interval >= 1 and self.val_interval >= 1, 'log_interval',
               f'and {p.name("val_interval")} must be >= 1')
        p.need(self.recovery_interval >= 0, 'recovery_interval', 'must be >= 0')
        p.need(0 <= self.bad_file_limit <= 1, 'bad_file_limit',
               'must be in [0, 1]: the share of decode attempts that may fail (0: none, 1: no limit)')
        p.need(self.checkpoint_hist >= 1, 'checkpoint_hist', 'must be >= 1')
        p.need(0 <= self.seed < 2 ** 32, 'seed', 'must be in [0, 2**32)')  # what numpy and torch accept
        p.need(self.eval_metric in EVAL_METRICS, 'eval_metric', f'must be one of {", ".join(EVAL_METRICS)}')
        p.raise_any()


@dataclass
class RunConfig:
    """Where the run lives and what it continues from."""
    output: str = flag('--output', default='./output/train', metavar='PATH', help='output root')
    experiment: str = flag('--experiment', default='',
                           help='run folder name under --output (default: date-model); a folder holding a run is '
                                'only continued, with --resume auto')
    resume: str = flag('--resume', default='', group='model', metavar='PATH',
                       help="full-state resume from PATH, or 'auto'")
    resume_opt: bool = flag('--no-resume-opt', default=True, group='model', invert=True,
                            help='resume weights but not optimizer')
    log_wandb: bool = flag('--log-wandb', default=False,
                           help='also log the per-epoch summary to Weights & Biases (pip install wandb)')
    wandb_project: Optional[str] = flag('--wandb-project', default=None, metavar='NAME', help='wandb project')
    wandb_tags: Tuple[str, ...] = flag('--wandb-tags', default=(), metavar='TAG', help='wandb tags')
    wandb_resume_id: str = flag('--wandb-resume-id', default='', metavar='ID',
                                help='with --resume: continue this wandb run')

    def validate(self, name: Namer = None) -> None:
        p = Problems(name)
        p.need(not (self.resume == 'auto' and not self.experiment), 'resume',
               f'auto continues the run in --output/--experiment: pass {p.name("experiment")} NAME')
        # A folder name, not a path: the run must stay inside --output (put the path into --output instead)
        p.need(not any(c in self.experiment for c in '/\\') and self.experiment not in ('.', '..'), 'experiment',
               f'{self.experiment!r} must be a folder name without path separators or "..": the run folder is '
               f'{p.name("output")}/NAME (pass the path with {p.name("output")})')
        p.need(not self.wandb_resume_id or bool(self.resume), 'wandb_resume_id',
               f'continues a wandb run: it goes with {p.name("resume")} (as in timm)')
        p.need(not self.log_wandb or _installed('wandb'), 'log_wandb',
               "needs the wandb package: pip install wandb (or pip install -e '.[wandb]')")
        p.raise_any()


def _installed(package: str) -> bool:
    try:
        __import__(package)
    except ImportError:
        return False
    return True


@dataclass
class Config:
    """Everything a training run is configured by."""
    data: DatasetConfig = field(default_factory=DatasetConfig)
    loader: TrainLoaderConfig = field(default_factory=TrainLoaderConfig)
    eval: EvalLoaderConfig = field(default_factory=EvalLoaderConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    mixup: Optional[MixupConfig] = None                 # None: no MixUp/CutMix
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def _attention_problems(self, name: Callable[[str, str], str]) -> List[str]:
        try:
            num_heads = get_config(self.model.name).num_heads
        except ValueError:
            return []  # an unknown model is reported by ModelConfig.validate
        flags = {'attn_backend': name('model', 'attn_backend'), 'packing': name('loader', 'packing'),
                 'amp': name('train', 'amp'), 'torchcompile': name('model', 'torchcompile')}
        tokens = max(self.loader.batch_size * max(self.loader.seq_lens or (0,)),
                     self.eval.batch_size * self.eval.max_seq_len)
        return attention_problems(self.model.attn_backend, device=self.train.device, amp=self.train.amp,
                                  packing=self.loader.packing, compiled=bool(self.model.torchcompile), training=True,
                                  tokens_per_step=tokens, num_heads=num_heads, flag=flags.get)

    SECTIONS = ('data', 'loader', 'eval', 'aug', 'mixup', 'model', 'optim', 'sched', 'ema', 'train', 'run')

    def validate(self, name: Optional[Callable[[str, str], str]] = None) -> None:
        """Every part's ``validate`` plus the cross checks; one ValueError listing all problems.
        ``name(section, field)`` is what the user typed for that field (default: ``section.field``)."""
        name = name or (lambda section, f: f'{section}.{f}')
        problems = []
        for section in self.SECTIONS:
            part = getattr(self, section)
            if part is not None:
                try:
                    part.validate(lambda f, s=section: name(s, f))
                except ValueError as e:
                    problems.append(str(e))
        p = Problems()
        lr, min_lr = self.optim.lr, self.sched.min_lr
        p.need(lr is None or min_lr <= lr, f'{name("sched", "min_lr")} {min_lr}',
               f'is above {name("optim", "lr")} {lr}')
        p.need(not (self.run.resume and (self.model.initial_checkpoint or self.model.pretrained_path
                                         or self.model.pretrained)),
               name('run', 'resume'), 'restores the full training state; drop --initial-checkpoint/'
               '--pretrained-path/--pretrained')
        dtype = self.model.dtype
        p.need(not (self.train.amp and dtype not in (None, 'float32')), f'{name("model", "dtype")} {dtype}',
               f'with {name("train", "amp")}: autocast needs float32 weights (as in timm); drop one of the two')
        device = self.train.device.split(':')[0]
        if device == 'cpu':
            from .optim import cuda_only
            need = cuda_only(self.optim.opt)
            p.need(not need, f'{name("optim", "opt")} {self.optim.opt}', f'runs on CUDA only ({need}); '
                   f'{name("train", "device")} is cpu')
        problems.extend(p.items)
        problems.extend(self._attention_problems(name))
        if self.aug.device_aug:
            from loaders.device_step import unsupported
            missing = unsupported(self.aug, self.mixup, self.loader.packing)
            if missing:
                problems.append(f'{name("aug", "device_aug")} has no device version of: {"; ".join(missing)} '
                                '(drop those flags or --device-aug)')
        if problems:
            raise ValueError('; '.join(problems))
