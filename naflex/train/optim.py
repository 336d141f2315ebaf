"""Optimizer side of training: timm's optimizers as timm's train.py builds them, gradient clipping, weight EMA.

- ``create_optimizer`` is the call of timm's train.py, ``timm.optim.create_optimizer_v2(model,
  **optimizer_kwargs(cfg=args), **args.opt_kwargs)``, on our ``OptimConfig``: every name of
  ``timm.optim.list_optimizers()`` (and ``lookahead_<name>``) with timm's parameter groups (no weight decay on 1-d
  parameters and the ``no_weight_decay()`` names, ``--layer-decay`` from ``group_matcher``) and defaults. One
  addition: on CUDA, torch's SGD / Adam / AdamW get ``fused=True`` (timm leaves them on foreach), the same update in
  one kernel that also takes the fp16 GradScaler's inf check on the device; ``--opt-kwargs fused=False`` or
  ``foreach=...`` keeps timm's choice.
- ``optimizer_problems`` checks the flags against timm's registry and the optimizer itself before a run starts.
- ``clip_gradients`` is timm's ``dispatch_clip_grad`` with the parameters timm's train.py clips (``agc`` leaves
  out the classifier).
- ``ModelEma`` keeps an exponential moving average of the weights like timm's ``ModelEmaV3``.
"""
import copy
import importlib.util
import logging
import warnings
import weakref
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .config import OptimConfig

_logger = logging.getLogger(__name__)

LOOKAHEAD = 'lookahead_'
# torch optimizers with a fused CUDA kernel (same algorithm as their foreach path, one launch per step, and
# ``_step_supports_amp_scaling``: the GradScaler's inf check stays on the device)
_FUSED_ON_CUDA = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
# flags whose value optimizer_kwargs passes (timm's train.py raises a TypeError if --opt-kwargs repeats one)
_FLAG_OF_KWARG = {'opt': '--opt', 'lr': '--lr', 'weight_decay': '--weight-decay', 'momentum': '--momentum',
                  'eps': '--opt-eps', 'betas': '--opt-betas', 'layer_decay': '--layer-decay',
                  'layer_decay_min_scale': '--layer-decay-min-scale',
                  'layer_decay_no_opt_scale': '--layer-decay-no-opt-scale'}


def _base_name(opt: str) -> str:
    """timm's parsing of --opt: lower case, an optional ``lookahead_`` prefix."""
    name = opt.lower()
    return name[len(LOOKAHEAD):] if name.startswith(LOOKAHEAD) else name


def _info(opt: str):
    from timm.optim import get_optimizer_info, list_optimizers
    name = _base_name(opt)
    return get_optimizer_info(name) if name in list_optimizers() else None


def cuda_only(opt: str) -> str:
    """Why timm's optimizer ``opt`` needs CUDA ('' if it does not): the apex and bitsandbytes ones."""
    info = _info(opt)
    source = info.opt_class if info is not None and isinstance(info.opt_class, str) else ''
    return f'timm builds it from {source}' if source.startswith(('apex.', 'bitsandbytes.')) else ''


def optimizer_args(cfg: OptimConfig, lr: Optional[float] = None) -> SimpleNamespace:
    """The attributes of timm train.py's ``args`` that ``timm.optim.optimizer_kwargs`` reads, from ``cfg``."""
    return SimpleNamespace(
        opt=cfg.opt, lr=cfg.lr if lr is None else lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
        opt_eps=cfg.eps, opt_betas=None if cfg.betas is None else list(cfg.betas), layer_decay=cfg.layer_decay,
        layer_decay_min_scale=cfg.layer_decay_min_scale, layer_decay_no_opt_scale=cfg.layer_decay_no_opt_scale)


def _opt_kwargs(cfg: OptimConfig) -> Dict:
    """--opt-kwargs as timm's ParseKwargs gives them (our parser stores tuples as lists, for args.yaml)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.kwargs.items()}


def _fused(cfg: OptimConfig, model: nn.Module) -> Dict:
    """``fused=True`` for torch's fused CUDA kernels, unless --opt-kwargs picks foreach or fused itself."""
    params = list(model.parameters())
    on_cuda = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    chosen = {'fused', 'foreach'} & set(cfg.kwargs)
    return {'fused': True} if on_cuda and _info(cfg.opt).opt_class in _FUSED_ON_CUDA and not chosen else {}


def create_optimizer(model: nn.Module, cfg: OptimConfig, lr: Optional[float] = None) -> torch.optim.Optimizer:
    """timm train.py's optimizer for these flags. ``lr``: the resolved peak lr (``OptimConfig.resolved_lr``),
    default ``cfg.lr``."""
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    return create_optimizer_v2(model, **optimizer_kwargs(cfg=optimizer_args(cfg, lr)), **_opt_kwargs(cfg),
                               **_fused(cfg, model))


def optimizer_problems(cfg: OptimConfig, flag: Callable[[str], str] = str) -> List[str]:
    """What timm would reject in these flags, as one-line messages: an unknown --opt, a package it needs, the wrong
    number of --opt-betas, --opt-kwargs that repeat a flag or that the optimizer does not take."""
    from timm.optim import create_optimizer_v2, list_optimizers, optimizer_kwargs
    info = _info(cfg.opt)
    opt = f'{flag("opt")} {cfg.opt}'
    if info is None:
        return [f'{opt} is not a timm optimizer; valid: {", ".join(list_optimizers())} (each also as '
                f'{LOOKAHEAD}NAME)']
    if info.second_order:
        return [f'{opt} needs a second backward pass through the model (create_graph=True), and the attention '
                'kernels (SDPA, flash / varlen) have no double backward']
    source = cuda_only(cfg.opt)
    package = source.split(' ')[-1].split('.')[0]
    if package and importlib.util.find_spec(package) is None:
        return [f'{opt} needs the {package} package ({source}): pip install {package}']
    if cfg.betas is not None and info.has_betas and len(cfg.betas) != info.num_betas:
        return [f'{flag("betas")} takes {info.num_betas} values for {info.name}, got {len(cfg.betas)}']
    kwargs = optimizer_kwargs(cfg=optimizer_args(cfg, cfg.lr or cfg.lr_base))
    repeated = sorted(set(cfg.kwargs) & set(kwargs))
    if repeated:
        return [f'{flag("kwargs")} {", ".join(repeated)}: set with {", ".join(_FLAG_OF_KWARG[k] for k in repeated)}']
    if package:
        return []  # built on CUDA only: the dry run below cannot run here
    # a dry run on one parameter (layer decay applies to a model's groups only): the optimizer checks its own
    # arguments, unknown keys and values out of range
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # the run's random stream stays as it was
        warnings.simplefilter('ignore')  # the optimizer's own warnings come when the run builds it
        try:
            create_optimizer_v2([nn.Parameter(torch.zeros(2, 2))], **kwargs, **_opt_kwargs(cfg))
        except (TypeError, ValueError, RuntimeError, AssertionError, KeyError) as e:
            text = ' '.join(str(e).split()) or type(e).__name__
            return [f'{opt} rejects these settings: {text}' + (f' ({flag("kwargs")} {cfg.kwargs})'
                                                                 if cfg.kwargs else '')]
    return []


def clip_gradients(module: nn.Module, value: float, mode: str = 'norm') -> None:
    """timm train.py's clipping: ``dispatch_clip_grad`` (norm, value or agc) over the model's parameters, without
    the classifier's weight and bias for ``agc`` (timm leaves out the last two parameters)."""
    from timm.models import model_parameters
    from timm.utils import dispatch_clip_grad
    dispatch_clip_grad(model_parameters(module, exclude_head='agc' in mode), value=value, mode=mode)


class ModelEma(nn.Module):
    """Exponential moving average of a model's weights (timm ``ModelEmaV3`` semantics).

    ``ema = decay * ema + (1 - decay) * model`` for floating-point parameters and buffers after every optimizer
    update, other buffers copied; the first update (``step=1``) copies the model. With ``warmup`` the decay ramps
    as ``1 - step ** -2/3`` up to ``decay``. The copy is never trained.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup: bool = False,
                 device: Optional[torch.device] = None):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        if device is not None:
            self.module.to(device=device)
        self.decay = decay
        self.warmup = warmup

    def get_decay(self, step: Optional[int]) -> float:
        if step is None:
            return self.decay
        step = step - 1  # ``step`` counts updates done, so the first update (step 1) copies the model
        if step <= 0:
            return 0.0
        if not self.warmup:
            return self.decay
        return max(0.0, min(self.decay, 1 - (1 + step) ** (-2 / 3)))

    def _pairs(self, model: nn.Module):
        """(ema float tensors, model float tensors, other pairs), built once per model object."""
        ref = self.__dict__.get('_pairs_for')  # a weakref, kept out of nn.Module's submodule registry
        if ref is None or ref() is not model:
            ema_f, model_f, other = [], [], []
            model_sd = model.state_dict(keep_vars=True)
            for key, ema_v in self.module.state_dict(keep_vars=True).items():
                model_v = model_sd[key]
                if ema_v.is_floating_point():
                    ema_f.append(ema_v.data)
                    model_f.append(model_v)
                else:
                    other.append((ema_v.data, model_v))
            self.__dict__['_cache'] = (ema_f, model_f, other)
            self.__dict__['_pairs_for'] = weakref.ref(model)
        return self.__dict__['_cache']

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        weight = 1.0 - self.get_decay(step)
        ema_f, model_f, other = self._pairs(model)
        for ema_v, model_v in other:
            ema_v.copy_(model_v.detach())
        if ema_f:
            src = [m.detach().to(device=e.device, dtype=e.dtype) for e, m in zip(ema_f, model_f)]
            torch._foreach_lerp_(ema_f, src, weight)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
