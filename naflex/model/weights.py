"""Reading weight / checkpoint files: the one place that opens them (timm's or this project's).

Our parameter names equal timm's (SigLIP 2 NaFlex, arXiv:2502.14786), so the published timm checkpoints
(``naflexvit_base_patch16_*.e300_s576_in1k``) load as they are. Accepted files: ``.safetensors``, ``.pth``,
``.pt``, ``.bin``, ``.ckpt``, ``.pth.tar`` holding a plain state dict or one wrapped under 'state_dict_ema',
'model_ema', 'state_dict' or 'model' (EMA first unless ``use_ema=False``, as timm's ``load_state_dict``),
including timm ``train.py`` checkpoints whose 'args' is an ``argparse.Namespace``. DDP 'module.' and
torch.compile '_orig_mod.' prefixes are stripped. Everything loads with ``weights_only=True``. Any problem
(missing file, unreadable file, no state dict, missing / unexpected / mis-shaped tensors) raises one clear
one-line error.

NVIDIA's original C-RADIO checkpoints (keys under ``radio_model.model.``) are converted to these names on reading,
as timm's ``checkpoint_filter_fn`` converts them; JAX / Flax ``.npz`` files are read by ``naflex.model.big_vision``.

Published weights (``timm/<name>.<tag>`` on the Hugging Face Hub) are fetched by timm's own loader into
huggingface_hub's cache (``HF_HUB_CACHE`` / ``HF_HOME``), exactly as ``timm.create_model(..., pretrained=True)``
does; ``HF_HUB_OFFLINE=1`` reads that cache without touching the network.

``load_into`` is the one way a state dict enters a model (strict, or with a re-initialized classifier), with
one mismatch message for ``create_model(pretrained=)``, ``validate.py``, ``--initial-checkpoint`` and ``--resume``.
"""
import argparse
import math
import os
from typing import Any, Dict, List

import torch
import torch.nn as nn

EMA_KEYS = ('state_dict_ema', 'model_ema')
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
        raise FileNotFoundError(f'weights file not found: {path!r} (pass a local .safetensors / .pth / .bin path)')
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


def is_npz(path) -> bool:
    """A JAX / Flax NumPy checkpoint, which only a model can read (``naflex.model.big_vision``), as timm decides it:
    by the extension."""
    return os.fspath(path).lower().endswith(('.npz', '.npy'))


_RADIO = 'radio_model.model.'


def convert_radio(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """NVIDIA's C-RADIO layout (``radio_model.model.*``, as in its Hugging Face repositories) in our names, with
    timm 1.0.31's conversion: the bias-free patch projection of (C, p, p) patches becomes our (p, p, C) linear with a
    zero bias; the flattened 128x128 position table a grid; the first of the per-teacher summary tokens the class
    token and the others registers; layer-scale 'grandma' the 'gamma'. The input conditioner (mean / std: the
    pretrained_cfg's), summary indices and teacher adaptor heads are dropped."""
    out = {}
    for key, v in state.items():
        if not key.startswith(_RADIO):
            continue
        key = key[len(_RADIO):]
        if key == 'patch_generator.embedder.weight':
            p = math.isqrt(v.shape[1] // 3)
            out['embeds.proj.weight'] = v.reshape(v.shape[0], 3, p, p).permute(0, 2, 3, 1).reshape(v.shape[0], -1)
            out['embeds.proj.bias'] = v.new_zeros(v.shape[0])
        elif key == 'patch_generator.pos_embed':
            side = math.isqrt(v.shape[-2])
            if v.ndim == 3 and side * side != v.shape[-2]:
                raise ValueError(f'C-RADIO position table of {v.shape[-2]} positions is not a square grid')
            out['embeds.pos_embed'] = v.reshape(1, side, side, v.shape[-1]) if v.ndim == 3 else v
        elif key == 'patch_generator.cls_token.token':
            out['embeds.cls_token'] = v[None, :1]
            if v.shape[0] > 1:
                out['embeds.reg_token'] = v[None, 1:]
        elif key.startswith('blocks.'):
            out[key.replace('.grandma', '.gamma')] = v
    return out


def state_dict_from(obj: Any, use_ema: bool = True, require_ema: bool = False,
                    path: str = '') -> Dict[str, torch.Tensor]:
    """The model state dict inside a loaded file: under 'state_dict_ema' / 'model_ema' (if ``use_ema``), then
    'state_dict' / 'model', else ``obj`` itself; prefixes stripped. ``require_ema``: no EMA copy is an error."""
    where = f'{path!r}' if path else 'the checkpoint'
    keys = (EMA_KEYS if use_ema or require_ema else ()) + (() if require_ema else _PLAIN_KEYS)
    found = None
    if isinstance(obj, dict):
        found = next((k for k in keys if isinstance(obj.get(k), dict)), None)
    if require_ema and found is None:
        raise ValueError(f'{where} holds no EMA weights ({" / ".join(EMA_KEYS)}; train with --model-ema)')
    state = obj[found] if found else obj
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f'{where} does not hold a state dict of tensors '
                         f'(also looked under {", ".join(repr(k) for k in keys)})')
    state = strip_prefixes(state)
    return convert_radio(state) if f'{_RADIO}patch_generator.embedder.weight' in state else state


def read_state_dict(path, use_ema: bool = True, require_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The model state dict in ``path`` (see ``state_dict_from``); FileNotFoundError / ValueError, one line."""
    return state_dict_from(read_file(path), use_ema=use_ema, require_ema=require_ema, path=os.fspath(path))


# The files a timm save_for_hf folder may hold, in the order timm 1.0.31's load_state_dict_from_path looks for them;
# without any, the first file (sorted) of the first extension that has one.
DIR_FILES = ('model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth',
             'open_clip_model.safetensors', 'open_clip_pytorch_model.safetensors', 'open_clip_pytorch_model.bin',
             'open_clip_pytorch_model.pth')
DIR_EXTENSIONS = ('.safetensors', '.pth', '.pth.tar', '.bin')


def dir_weights_file(folder) -> str:
    """The weights file timm reads from ``folder`` (``local-dir:`` names); FileNotFoundError, one line, if none."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'weights folder not found: {folder!r}')
    for name in DIR_FILES:
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    for ext in DIR_EXTENSIONS:
        found = sorted(n for n in os.listdir(folder) if n.endswith(ext))
        if found:
            return os.path.join(folder, found[0])
    raise FileNotFoundError(f'no weights file in {folder!r} (looked for {", ".join(DIR_FILES[:2])}, *.safetensors, '
                            '*.pth, *.bin)')


class WeightsMismatch(ValueError):
    """A state dict does not fit a model; the message lists missing / unexpected / mis-shaped tensors."""


def _listing(label: str, items: List[str], shown: int = 5) -> str:
    more = f' (+{len(items) - shown} more)' if len(items) > shown else ''
    return f'{label}: {items[:shown]}{more}'


def load_into(model: nn.Module, state: Dict[str, torch.Tensor], *, source: str = 'the checkpoint',
              reinit_head: bool = False) -> List[str]:
    """Load ``state`` into ``model``: every tensor must be present with its shape, nothing may be left over.

    ``reinit_head``: a classifier (``head.*``) whose shape differs from the model's, that the model does not have
    (``num_classes=0``), or that the weights do not have (a backbone's, such as C-RADIO's), keeps the model's fresh
    initialization instead (another ``--num-classes``).
    Returns the head keys skipped that way. Anything else raises ``WeightsMismatch``, one line naming up to
    five keys of each kind with their counts: the one message train.py, validate.py and ``create_model`` print.
    """
    own = model.state_dict()
    skipped = []
    if reinit_head:
        skipped = [k for k in _HEAD_KEYS
                   if (k in state) != (k in own) or (k in own and own[k].shape != state[k].shape)]
        state = {k: v for k, v in state.items() if k not in skipped}
    missing = sorted(k for k in own if k not in state and k not in skipped)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f'{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}'
                    for k in state if k in own and state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture', type(model).__name__)
        parts = [_listing(label, items) for label, items in
                 (('missing', missing), ('unexpected', unexpected), ('shape mismatch', shapes)) if items]
        raise WeightsMismatch(f'{source} does not fit the model {arch}: ' + '; '.join(parts))
    model.load_state_dict(state, strict=not skipped)
    return skipped


class HubUnavailable(FileNotFoundError):
    """Published weights that are neither in the local Hugging Face cache nor reachable (no network, or
    ``HF_HUB_OFFLINE=1`` with an empty cache); the message names the repository and the cache folder."""


HUB_FILE = 'model.safetensors'  # what every timm repository on the Hub holds


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub endpoint accepts a connection within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == 'https' else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def read_hub_state_dict(repo: str, filename: str = HUB_FILE) -> Dict[str, torch.Tensor]:
    """The state dict published in the Hugging Face Hub repository ``repo`` (e.g.
    'timm/naflexvit_base_patch16_gap.e300_s576_in1k'), through timm's loader and huggingface_hub's cache
    (``filename``: another file of the repository, a pretrained_cfg's ``hf_hub_filename``).

    Raises ``HubUnavailable`` when it is not cached and the Hub cannot be reached, ValueError (one line) for any
    other failure (no such repository, a gated one, a broken file)."""
    from huggingface_hub import constants, hf_hub_download
    from timm.models import load_state_dict_from_hf
    offline = constants.HF_HUB_OFFLINE or not hub_reachable()
    try:
        if offline:  # the cached copy only: huggingface_hub would retry an unreachable Hub for ~25 s first
            obj = read_file(hf_hub_download(repo, filename, local_files_only=True))
        else:  # naming the safetensors file skips timm's fallback to pytorch_model.bin: one request, no pickle
            obj = load_state_dict_from_hf(repo, filename=filename)
    except (FileNotFoundError, ConnectionError):  # huggingface_hub's LocalEntryNotFoundError / OfflineModeIsEnabled
        why = ' (HF_HUB_OFFLINE=1)' if constants.HF_HUB_OFFLINE else f' (no connection to {constants.ENDPOINT})'
        raise HubUnavailable(f'{repo} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and the Hub cannot '
                             f'be reached{why}') from None
    except Exception as e:  # HTTP errors (no such repository, gated), unreadable file
        raise ValueError(f'could not fetch {repo} from the Hugging Face Hub: {_first_line(e)}') from None
    return state_dict_from(obj, path=f'hf-hub:{repo}')

