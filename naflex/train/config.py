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

from augment.config import INTERPOLATIONS, AugConfig, Problems
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
    name: str = DEFAULT_MODEL                           # --model
    num_classes: Optional[int] = None                   # --num-classes (None: one per class folder)
    pretrained: bool = False                            # --pretrained
    pretrained_path: Optional[str] = None               # --pretrained-path (with --pretrained; EMA preferred)
    initial_checkpoint: str = ''                        # --initial-checkpoint (EMA preferred, as timm)
    global_pool: Optional[str] = None                   # --gp
    drop_rate: float = NaFlexVitCfg.drop_rate           # --drop
    drop_path_rate: Optional[float] = None              # --drop-path (None: the variant's)
    attn_backend: str = NaFlexVitCfg.attn_backend       # --attn-backend
    grad_checkpointing: bool = False                    # --grad-checkpointing
    mean: Optional[Tuple[float, ...]] = None            # --mean (None: the model's)
    std: Optional[Tuple[float, ...]] = None             # --std
    interpolation: Optional[str] = None                 # --interpolation (None: the model's eval interpolation)
    torchcompile: Optional[str] = None                  # --torchcompile [backend]
    torchcompile_mode: Optional[str] = None             # --torchcompile-mode
    head_init_scale: Optional[float] = None             # --head-init-scale: classifier weight and bias times this
    head_init_bias: Optional[float] = None              # --head-init-bias: classifier bias set to this
    dtype: Optional[str] = None                         # --model-dtype (None: float32)
    channels_last: bool = False                         # --channels-last (no 4-D tensor here: no effect)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # --model-kwargs: architecture fields (embed_dim, depth, ...)

    # model settings with a flag of their own: set there, not in --model-kwargs
    FLAG_FIELDS = ('num_classes', 'drop_rate', 'drop_path_rate', 'global_pool', 'attn_backend')

    def overrides(self, num_classes: int) -> dict:
        """Keyword overrides for ``naflex.create_model``."""
        kw = dict(self.kwargs, num_classes=num_classes, drop_rate=self.drop_rate)
        if self.drop_path_rate is not None:
            kw['drop_path_rate'] = self.drop_path_rate
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
    opt: str = 'sgd'                                    # --opt: a name of timm.optim.list_optimizers()
    lr: Optional[float] = None                          # --lr (None: lr_base scaled by the global batch)
    lr_base: float = 0.1                                # --lr-base
    lr_base_size: int = 256                             # --lr-base-size
    lr_base_scale: str = ''                             # --lr-base-scale ('' = sqrt for ada*/lamb*, else linear)
    eps: Optional[float] = None                         # --opt-eps (None: the optimizer's)
    betas: Optional[Tuple[float, ...]] = None           # --opt-betas (None: the optimizer's)
    momentum: float = 0.9                               # --momentum
    weight_decay: float = 2e-5                          # --weight-decay
    clip_grad: Optional[float] = None                   # --clip-grad
    clip_mode: str = 'norm'                             # --clip-mode
    layer_decay: Optional[float] = None                 # --layer-decay
    layer_decay_min_scale: float = 0.0                  # --layer-decay-min-scale
    layer_decay_no_opt_scale: Optional[float] = None    # --layer-decay-no-opt-scale
    kwargs: Dict[str, Any] = field(default_factory=dict)  # --opt-kwargs: more keyword arguments of the optimizer

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
    sched: str = 'cosine'                               # --sched
    on_updates: bool = False                            # --sched-on-updates
    warmup_lr: float = 1e-5                             # --warmup-lr
    min_lr: float = 0.0                                 # --min-lr
    epochs: int = 300                                   # --epochs
    start_epoch: Optional[int] = None                   # --start-epoch (overrides the epoch a --resume gives)
    warmup_epochs: int = 5                              # --warmup-epochs
    warmup_prefix: bool = False                         # --warmup-prefix
    cooldown_epochs: int = 0                            # --cooldown-epochs
    # None: timm's factory default, 90 epochs for step, 0.2 of the schedule for wsd / rsqrt
    decay_epochs: Optional[float] = None                # --decay-epochs
    decay_milestones: Tuple[int, ...] = (90, 180, 270)  # --decay-milestones
    decay_rate: float = 0.1                             # --decay-rate / --dr
    patience_epochs: int = 10                           # --patience-epochs
    noise: Optional[Tuple[float, ...]] = None           # --lr-noise
    noise_pct: float = 0.67                             # --lr-noise-pct
    noise_std: float = 1.0                              # --lr-noise-std
    cycle_mul: float = 1.0                              # --lr-cycle-mul
    cycle_decay: float = 0.5                            # --lr-cycle-decay
    cycle_limit: int = 1                                # --lr-cycle-limit
    k_decay: float = 1.0                                # --lr-k-decay
    decay_fn: Optional[str] = None                      # --lr-decay-fn (wsd / rsqrt)
    stable_timescale: Optional[float] = None            # --lr-stable-timescale (rsqrt)

    def validate(self, name: Namer = None) -> None:
        from .schedule import schedule_problems  # timm's factory decides what is valid
        p = Problems(name)
        p.need(self.sched in SCHEDULERS, 'sched',
               f'{self.sched} is not a timm scheduler; valid: {", ".join(SCHEDULERS)}')
        p.need(self.epochs >= 1, 'epochs', 'must be >= 1')
        p.need(self.warmup_epochs >= 0 and self.cooldown_epochs >= 0, 'warmup_epochs',
               f'and {p.name("cooldown_epochs")} must be >= 0')
        p.need(self.start_epoch is None or self.start_epoch >= 0, 'start_epoch', 'must be >= 0')
        p.need(not (self.sched == 'none' and self.on_updates), 'on_updates', f'has no effect with {p.name("sched")} none')
        p.need(not (self.sched == 'plateau' and self.on_updates), 'on_updates',
               f'does not apply to {p.name("sched")} plateau: timm steps it once per epoch, with the eval metric')
        p.need(self.noise is None or len(self.noise) in (1, 2), 'noise', 'takes one or two fractions of the schedule')
        if not p.items:
            p.items.extend(schedule_problems(self, p.name))
        p.raise_any()


@dataclass
class EmaConfig:
    """Exponential moving average of the weights (timm ModelEmaV3 semantics)."""
    enabled: bool = False                               # --model-ema
    decay: float = 0.9998                               # --model-ema-decay
    warmup: bool = False                                # --model-ema-warmup

    def validate(self, name: Namer = None) -> None:
        p = Problems(name)
        p.need(0 < self.decay < 1, 'decay', 'must be in (0, 1)')
        p.raise_any()


@dataclass
class TrainConfig:
    """The training loop: precision, accumulation, loss, logging, evaluation and checkpoint cadence."""
    device: str = 'cuda'                                # --device ('cuda', 'cuda:N' or 'cpu')
    amp: bool = False                                   # --amp
    amp_dtype: str = 'float16'                          # --amp-dtype
    grad_accum_steps: int = 1                           # --grad-accum-steps
    loss_scale: str = 'linear'                          # --naflex-loss-scale
    smoothing: float = MixupConfig.smoothing            # --smoothing (the same flag sets MixupConfig's)
    seed: int = TrainLoaderConfig.seed                  # --seed (the same flag seeds the loader)
    log_interval: int = 50                              # --log-interval (updates)
    val_interval: int = 1                               # --val-interval (epochs)
    recovery_interval: int = 0                          # --recovery-interval (updates; 0 = off)
    bad_file_limit: float = 0.01                        # --bad-file-limit (share of failed decodes that stops a run)
    checkpoint_hist: int = 10                           # --checkpoint-hist
    eval_metric: str = 'top1'                           # --eval-metric
    bce_loss: bool = False                              # --bce-loss (timm.loss.BinaryCrossEntropy)
    bce_sum: bool = False                               # --bce-sum
    bce_target_thresh: Optional[float] = None           # --bce-target-thresh
    bce_pos_weight: Optional[float] = None              # --bce-pos-weight
    synchronize_step: bool = False                      # --synchronize-step: wait for the device after each update
    broadcast_buffers: bool = True                      # --no-ddp-bb turns off DDP's buffer broadcast

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
    output: str = './output/train'                      # --output
    experiment: str = ''                                # --experiment (default: date-model)
    resume: str = ''                                    # --resume PATH | auto
    resume_opt: bool = True                             # --no-resume-opt turns it off
    log_wandb: bool = False                             # --log-wandb (needs the optional wandb package)
    wandb_project: Optional[str] = None                 # --wandb-project (None: wandb's default / WANDB_PROJECT)
    wandb_tags: Tuple[str, ...] = ()                    # --wandb-tags
    wandb_resume_id: str = ''                           # --wandb-resume-id: continue this wandb run (with --resume)

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
        p.need(lr is None or min_lr <= lr, f'{name("sched", "min_lr")} {min_lr}', f'is above {name("optim", "lr")} {lr}')
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
        if problems:
            raise ValueError('; '.join(problems))
