"""Optimizer side of training: parameter groups, torch optimizers, gradient clipping, weight EMA.

- Parameter groups follow timm (``timm.optim.create_optimizer_v2``): no weight decay on 1-d parameters
  (biases, norm scales) and on the names the model lists in ``no_weight_decay()`` (position embedding,
  class/register tokens); ``--layer-decay`` scales each group's lr by ``decay ** (num_layers - 1 - layer)``
  with layers from ``model.group_matcher()`` (BEiT-style layer-wise lr decay).
- Optimizers are torch's own, using the fused (CUDA) or foreach (multi-tensor) kernels where they exist:
  ``nadamw`` = ``torch.optim.NAdam(decoupled_weight_decay=True)``, ``adamw``, ``sgd`` (Nesterov, timm's
  default) and ``momentum`` (classical momentum). For ``nadamw`` torch's Dozat momentum-decay warmup is
  switched off (``momentum_decay`` huge -> mu_t = beta1) so the update is the one timm's NAdamW (the
  MLCommons AlgoPerf variant used for the SigLIP 2 / NaFlexViT recipes) makes, up to the first-moment bias
  correction of the first few steps (tests/test_optim.py states the tolerance).
- ``ModelEma`` keeps an exponential moving average of the weights like timm's ``ModelEmaV3``.
"""
import copy
import fnmatch
import logging
import weakref
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from .config import CLIP_MODES, OPTIMIZERS, OptimConfig

_logger = logging.getLogger(__name__)

# mu_t = beta1 * (1 - 0.5 * 0.96 ** (t * momentum_decay)) == beta1 for any t >= 1 (0.96 ** 1e6 underflows to 0).
_NADAM_CONSTANT_MOMENTUM = 1e6


def _layer_map(model: nn.Module) -> Dict[str, int]:
    """Parameter name -> layer index (0 = stem ... last = head) from the model's ``group_matcher``."""
    from timm.models import group_parameters  # timm is a dependency; its grouping keeps layer ids identical
    return group_parameters(model, model.group_matcher(coarse=False), reverse=True)


def param_groups(
        model: nn.Module,
        weight_decay: float,
        layer_decay: Optional[float] = None,
        layer_decay_min_scale: float = 0.0,
) -> List[Dict]:
    """Split trainable parameters into weight-decay / no-weight-decay (and per-layer with layer decay) groups."""
    skip = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    layer_of, scales = None, None
    if layer_decay is not None:
        layer_of = _layer_map(model)
        num_layers = max(layer_of.values()) + 1
        scales = [max(layer_decay_min_scale, layer_decay ** (num_layers - 1 - i)) for i in range(num_layers)]
    groups: Dict[str, Dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_wd = (param.ndim <= 1 or name.endswith('.bias') or any(fnmatch.fnmatch(name, p) for p in skip)
                 or not weight_decay)
        key = 'no_decay' if no_wd else 'decay'
        group = {'weight_decay': 0.0 if no_wd else weight_decay}
        if layer_of is not None:
            layer = layer_of.get(name, len(scales) - 1)
            key = f'layer_{layer}_{key}'
            group['lr_scale'] = scales[layer]
        groups.setdefault(key, dict(group, params=[]))['params'].append(param)
    return list(groups.values())


def create_optimizer(model: nn.Module, cfg: OptimConfig, lr: Optional[float] = None) -> torch.optim.Optimizer:
    """The optimizer ``cfg.opt`` names, with timm's semantics for lr, weight decay, eps, betas and momentum.
    ``lr``: the resolved peak lr (``OptimConfig.resolved_lr``), default ``cfg.lr``."""
    name = cfg.opt.lower()
    if name not in OPTIMIZERS:
        raise ValueError(f'unknown optimizer {cfg.opt!r}; valid: {", ".join(OPTIMIZERS)}')
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay, cfg.layer_decay_min_scale)
    params = [p for g in groups for p in g['params']]
    on_cuda = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    kw: Dict = {'lr': cfg.lr if lr is None else lr, 'weight_decay': cfg.weight_decay}
    if name in ('nadamw', 'adamw'):
        if cfg.eps is not None:
            kw['eps'] = cfg.eps
        if cfg.betas is not None:
            kw['betas'] = tuple(cfg.betas)
    if name == 'nadamw':
        return torch.optim.NAdam(groups, decoupled_weight_decay=True, momentum_decay=_NADAM_CONSTANT_MOMENTUM,
                                 foreach=True if on_cuda else None, **kw)
    fused = {'fused': True} if on_cuda else {}
    if name == 'adamw':
        return torch.optim.AdamW(groups, **fused, **kw)
    return torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=name == 'sgd', **fused, **kw)


def clip_gradients(params: Iterable[torch.Tensor], value: float, mode: str = 'norm') -> Optional[torch.Tensor]:
    """Clip gradients in place; returns the pre-clip total norm for ``norm`` mode (a device tensor, no sync)."""
    params = [p for p in params if p.grad is not None]
    if mode == 'norm':
        return torch.nn.utils.clip_grad_norm_(params, value, foreach=True)
    if mode == 'value':
        torch.nn.utils.clip_grad_value_(params, value, foreach=True)
        return None
    raise ValueError(f'unknown clip mode {mode!r}; valid: {", ".join(CLIP_MODES)}')


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
