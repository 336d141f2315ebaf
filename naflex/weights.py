"""Reading weight / checkpoint files: the one place that opens them (timm's or this project's).

Our parameter names equal timm's (SigLIP 2 NaFlex, arXiv:2502.14786), so the published timm checkpoints
(``naflexvit_base_patch16_*.e300_s576_in1k``) load as they are. Accepted files: ``.safetensors``, ``.pth``,
``.pt``, ``.bin``, ``.ckpt``, ``.pth.tar`` holding a plain state dict or one wrapped under 'state_dict_ema',
'model_ema', 'state_dict' or 'model' (EMA first unless ``use_ema=False``, as timm's ``load_state_dict``),
including timm ``train.py`` checkpoints whose 'args' is an ``argparse.Namespace``. DDP 'module.' and
torch.compile '_orig_mod.' prefixes are stripped. Everything loads with ``weights_only=True``; nothing is
downloaded. Any problem (missing file, unreadable file, no state dict, missing / unexpected / mis-shaped
tensors) raises one clear one-line error.

Callers keep only their own policy: ``naflex.checkpoint`` (resume objects, classifier re-init),
``validate.py`` (strict load, class-count check) and ``load_pretrained`` here (``create_model(pretrained=)``).
"""
import argparse
import os
from typing import Any, Dict

import torch
import torch.nn as nn

_EMA_KEYS = ('state_dict_ema', 'model_ema')
_PLAIN_KEYS = ('state_dict', 'model')  # after the EMA keys (when wanted), like timm's load_state_dict
_PREFIXES = ('module.', '_orig_mod.')  # DDP / torch.compile wrappers
_HEAD_KEYS = ('head.weight', 'head.bias')


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f'{type(e).__name__}: {text.splitlines()[0]}' if text else type(e).__name__


def read_file(path) -> Any:
    """The object stored in ``path`` (a dict of tensors for .safetensors, whatever ``torch.save`` wrote
    otherwise, timm's argparse.Namespace 'args' allowed). FileNotFoundError / ValueError, one line each."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'weights file not found: {path!r} (nothing is downloaded; '
                                'pass a local .safetensors / .pth / .bin path)')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(path, device='cpu')
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # corrupt / foreign file
        raise ValueError(f'could not read weights from {path!r}: {_first_line(e)}') from None


def strip_prefixes(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Keys without DDP 'module.' / torch.compile '_orig_mod.' prefixes (any nesting)."""
    out = {}
    for k, v in state.items():
        while k.startswith(_PREFIXES):
            k = k[len(next(p for p in _PREFIXES if k.startswith(p))):]
        out[k] = v
    return out


def state_dict_from(obj: Any, use_ema: bool = True, require_ema: bool = False,
                    path: str = '') -> Dict[str, torch.Tensor]:
    """The model state dict inside a loaded file: under 'state_dict_ema' / 'model_ema' (if ``use_ema``), then
    'state_dict' / 'model', else ``obj`` itself; prefixes stripped. ``require_ema``: no EMA copy is an error."""
    where = f'{path!r}' if path else 'the checkpoint'
    keys = (_EMA_KEYS if use_ema or require_ema else ()) + (() if require_ema else _PLAIN_KEYS)
    found = None
    if isinstance(obj, dict):
        found = next((k for k in keys if isinstance(obj.get(k), dict)), None)
    if require_ema and found is None:
        raise ValueError(f'{where} holds no EMA weights ({" / ".join(_EMA_KEYS)}; train with --model-ema)')
    state = obj[found] if found else obj
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f'{where} does not hold a state dict of tensors '
                         f'(also looked under {", ".join(repr(k) for k in keys)})')
    return strip_prefixes(state)


def read_state_dict(path, use_ema: bool = True, require_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The model state dict in ``path`` (see ``state_dict_from``); FileNotFoundError / ValueError, one line."""
    return state_dict_from(read_file(path), use_ema=use_ema, require_ema=require_ema, path=os.fspath(path))


def load_pretrained(model: nn.Module, path: str) -> None:
    """Load ``path`` into ``model`` strictly; the classifier is skipped if the model's head differs in shape
    (e.g. ``num_classes`` overridden, or 0)."""
    state = read_state_dict(path)
    own = model.state_dict()
    head_mismatch = any(k in state and (k not in own or own[k].shape != state[k].shape) for k in _HEAD_KEYS)
    if head_mismatch:
        state = {k: v for k, v in state.items() if k not in _HEAD_KEYS}
    missing = sorted(k for k in own if k not in state and not (head_mismatch and k in _HEAD_KEYS))
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f'{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}'
                    for k in state if k in own and state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for label, items in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', shapes)):
            if items:
                more = f' (+{len(items) - 8} more)' if len(items) > 8 else ''
                parts.append(f'{label}: {items[:8]}{more}')
        raise ValueError(f'weights in {path!r} do not match {type(model).__name__} '
                         f'({model.pretrained_cfg.get("architecture", "?")}): ' + '; '.join(parts))
    model.load_state_dict(state, strict=not head_mismatch)
