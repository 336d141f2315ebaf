"""Loading pretrained NaFlexViT weights from local files (timm checkpoints or this project's).

Our parameter names equal timm's (SigLIP 2 NaFlex, arXiv:2502.14786), so the published timm checkpoints
(``naflexvit_base_patch16_*.e300_s576_in1k``) load as they are. Accepted files: ``.safetensors``, ``.pth``,
``.pt``, ``.bin``, ``.ckpt`` holding a plain state dict or one wrapped under 'state_dict_ema', 'model_ema',
'state_dict' or 'model', EMA first as timm's ``load_state_dict(use_ema=True)`` (DDP 'module.' prefixes are
stripped). Nothing is downloaded. Any problem (missing file, unreadable file, missing / unexpected /
mis-shaped tensors) raises one clear error.
"""
import os
from typing import Dict

import torch
import torch.nn as nn

_WRAPPER_KEYS = ('state_dict_ema', 'model_ema', 'state_dict', 'model')  # this order, like timm's load_state_dict
_HEAD_KEYS = ('head.weight', 'head.bias')


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a state dict from a local file; raises FileNotFoundError / ValueError with a clear message."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'pretrained weights file not found: {path!r} (nothing is downloaded; '
                                'pass a local .safetensors / .pth / .bin path)')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            obj = load_file(path, device='cpu')
        else:
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # corrupt / foreign file
        raise ValueError(f'could not read weights from {path!r}: {type(e).__name__}: {e}') from e
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f'{path!r} does not hold a state dict of tensors (also looked under {_WRAPPER_KEYS})')
    if all(k.startswith('module.') for k in obj):
        obj = {k[len('module.'):]: v for k, v in obj.items()}
    return obj


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
