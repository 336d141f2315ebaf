"""Reading JAX / Flax ``.npz`` checkpoints (big_vision's SigLIP 2 NaFlex encoders, original ViT releases).

timm 1.0.31 loads these into a NaFlexViT through ``model.load_pretrained(path)`` (its vision_transformer
``_load_weights``), reached from ``create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=PATH,
custom_load=True))`` and from ``load_checkpoint(model, PATH)``. Here the same file becomes a state dict in our
(= timm's) parameter names, holding exactly the tensors timm's loader writes, with timm's conversions:

- the layout is found from the keys: a prefix ('', 'opt/target/', 'params/', 'params/img/' or the caller's), then
  big_vision naming (``pos_embedding`` at the top, ``LayerNorm_0 / _1``, ``MlpBlock_0``) or the original ViT
  naming (``Transformer/posembed_input``, ``LayerNorm_0 / _2``, ``MultiHeadDotProductAttention_1``, ``MlpBlock_3``);
  blocks either stacked along a leading depth axis (``Transformer/encoderblock/...``, scanned) or one per block;
- the patch embedding is a Dense over flattened (h, w, c) patches or an HWIO convolution; another patch size is
  resampled (FlexiViT's pseudo-inverse, bilinear, no anti-aliasing) and another channel count adapted as timm does;
- the position table is (H, W, C) or flattened (1, N, C), the latter possibly with class / register positions in
  front, which are added to those tokens; another grid size is resized bilinearly without anti-aliasing;
- the final norm, the classifier (when its size matches) and the MAP head load when the model has them.

What timm leaves alone stays as initialized: layer-scale gammas, ``fc_norm``, register tokens (but for their
position rows), factorized position tables, a classifier of another size.
"""
import math
import os
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .patch_embed import resample_patch_weight

_PREFIXES = ('opt/target/', 'params/', 'params/img/')


class _Reader:
    """The arrays of one .npz file under one prefix, as torch tensors in PyTorch's layouts."""

    def __init__(self, npz, prefix: str, path: str):
        self.npz, self.prefix, self.path = npz, prefix, path

    def has(self, key: str) -> bool:
        return self.prefix + key in self.npz.files

    def get(self, key: str, transpose: bool = True, idx: Optional[int] = None) -> torch.Tensor:
        """Flax kernels [in, out] / HWIO / [in, heads, dim] to PyTorch's [out, in] / OIHW / [dim', heads, dim]
        (``transpose``); ``idx`` picks one block of a stacked (scanned) array."""
        if not self.has(key):
            raise ValueError(f'{self.path!r} lacks {self.prefix + key!r}, which the model needs')
        w = self.npz[self.prefix + key]
        if idx is not None:
            w = w[idx]
        if w.ndim == 4 and w.shape[0] == w.shape[1] == w.shape[2] == 1:
            w = w.flatten()
        if transpose:
            w = w.transpose({4: (3, 2, 0, 1), 3: (2, 0, 1), 2: (1, 0)}.get(w.ndim, tuple(range(w.ndim))))
        return torch.from_numpy(w.copy()).float()

    def qkv(self, base: str, kind: str, idx: Optional[int]) -> torch.Tensor:
        """Query / key / value kernels ([D, heads, dim] each) as one fused [3 * heads * dim, D] weight, or their
        biases as one vector."""
        parts = [self.get(f'{base}{n}/{kind}', transpose=False, idx=idx) for n in ('query', 'key', 'value')]
        return torch.cat([p.flatten(1).T if kind == 'kernel' else p.reshape(-1) for p in parts])


def _open(path: str, prefix: str) -> _Reader:
    import numpy as np
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f'weights file not found: {path!r}') from None
    except (EOFError, OSError, TypeError, ValueError) as e:
        raise ValueError(f'could not read {path!r} as a JAX/Flax .npz checkpoint: {type(e).__name__}: {e}') from None
    if not hasattr(npz, 'files'):
        raise ValueError(f'{path!r} is a single .npy array, not a keyed JAX/Flax .npz checkpoint')
    if not prefix:
        prefix = next((p for p in _PREFIXES if p + 'embedding/kernel' in npz.files), '')
    if prefix + 'embedding/kernel' not in npz.files:
        raise ValueError(f'{path!r} holds no ViT patch embedding ({prefix}embedding/kernel): not a big_vision / ViT '
                         'checkpoint')
    return _Reader(npz, prefix, path)


def _patch_weight(r: _Reader, embeds) -> torch.Tensor:
    """The checkpoint's patch embedding as our linear weight [D, p*p*C] in (p, p, C) order."""
    w = r.get('embedding/kernel')
    if w.ndim == 2:  # Dense over flattened (h, w, c) patches: recover OIHW (3 channels first, then the model's)
        for chans in dict.fromkeys((3, embeds.in_chans)):
            area, rest = divmod(w.shape[1], chans)
            p = math.isqrt(area)
            if not rest and p * p == area:
                w = w.reshape(w.shape[0], p, p, chans).permute(0, 3, 1, 2)
                break
        else:
            raise ValueError(f'{r.path!r}: a patch embedding of {w.shape[1]} inputs is no square patch of 3 or '
                             f'{embeds.in_chans} channels')
    elif w.ndim != 4:
        raise ValueError(f'{r.path!r}: unsupported patch embedding of rank {w.ndim}')
    if w.shape[1] != embeds.in_chans:
        from timm.layers import adapt_input_conv  # timm's rule for another channel count
        w = adapt_input_conv(embeds.in_chans, w)
    w = w.permute(0, 2, 3, 1)  # OHWI: our (p, p, C) order
    base = tuple(w.shape[1:3])
    w = w.reshape(w.shape[0], -1)
    if base != tuple(embeds.patch_size):
        w = resample_patch_weight(w, base, tuple(embeds.patch_size), embeds.in_chans, 'bilinear', antialias=False)
    return w


def _pos_embed(r: _Reader, model, big_vision: bool, out: Dict[str, torch.Tensor]) -> None:
    """The position table (resized to the model's) and any prefix-token positions, added to those tokens."""
    embeds = model.embeds
    key = 'pos_embedding' if big_vision else 'Transformer/posembed_input/pos_embedding'
    if embeds.pos_embed is None or not r.has(key):
        return
    pe = r.get(key, transpose=False)
    prefix_pe = None
    if pe.ndim == 2:
        pe = pe[None]
    if pe.ndim == 3 and pe.shape[0] == 1:  # flattened (1, N, C), maybe with prefix positions in front
        n = pe.shape[1]
        side = math.isqrt(n)
        if side * side != n:
            num_prefix = 1 if r.has('cls') else model.num_prefix_tokens
            side = math.isqrt(n - num_prefix)
            if side * side != n - num_prefix:
                raise ValueError(f'{r.path!r}: cannot infer a square position grid from {n} positions')
            prefix_pe, pe = pe[:, :num_prefix], pe[:, num_prefix:]
        pe = pe.reshape(1, side, side, -1)
    elif pe.ndim == 3:  # big_vision NaFlex: (H, W, C)
        pe = pe[None]
    if pe.ndim != 4:
        raise ValueError(f'{r.path!r}: unsupported position embedding shape {tuple(pe.shape)}')
    size = tuple(embeds.pos_embed.shape[1:3])
    if tuple(pe.shape[1:3]) != size:
        pe = F.interpolate(pe.permute(0, 3, 1, 2), size=size, mode='bilinear', antialias=False).permute(0, 2, 3, 1)
    out['embeds.pos_embed'] = pe
    if prefix_pe is None:
        return
    at = 0
    for name in ('cls_token', 'reg_token'):
        tok = getattr(embeds, name)
        if tok is None or prefix_pe.shape[1] <= at:
            continue
        count = min(tok.shape[1], prefix_pe.shape[1] - at)
        value = out.get(f'embeds.{name}', tok.detach().float().cpu()).clone()
        value[:, :count] += prefix_pe[:, at:at + count]
        out[f'embeds.{name}'] = value
        at += count


def _blocks(r: _Reader, model, big_vision: bool, out: Dict[str, torch.Tensor]) -> None:
    mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
    stacked = r.has('Transformer/encoderblock/LayerNorm_0/scale')
    for i in range(len(model.blocks)):
        base, idx = ('Transformer/encoderblock/', i) if stacked else (f'Transformer/encoderblock_{i}/', None)
        att = f'{base}MultiHeadDotProductAttention_{mha}/'
        b = f'blocks.{i}.'
        out[b + 'norm1.weight'] = r.get(f'{base}LayerNorm_0/scale', idx=idx)
        out[b + 'norm1.bias'] = r.get(f'{base}LayerNorm_0/bias', idx=idx)
        out[b + 'attn.qkv.weight'] = r.qkv(att, 'kernel', idx)
        out[b + 'attn.qkv.bias'] = r.qkv(att, 'bias', idx)
        out[b + 'attn.proj.weight'] = r.get(f'{att}out/kernel', idx=idx).flatten(1)
        out[b + 'attn.proj.bias'] = r.get(f'{att}out/bias', idx=idx)
        out[b + 'norm2.weight'] = r.get(f'{base}LayerNorm_{ln2}/scale', idx=idx)
        out[b + 'norm2.bias'] = r.get(f'{base}LayerNorm_{ln2}/bias', idx=idx)
        for j in range(2):
            out[f'{b}mlp.fc{j + 1}.weight'] = r.get(f'{base}MlpBlock_{mlp}/Dense_{j}/kernel', idx=idx)
            out[f'{b}mlp.fc{j + 1}.bias'] = r.get(f'{base}MlpBlock_{mlp}/Dense_{j}/bias', idx=idx)


def _map_head(r: _Reader, out: Dict[str, torch.Tensor]) -> None:
    base = 'MAPHead_0/'
    att = base + 'MultiHeadDotProductAttention_0/'
    out['attn_pool.latent'] = r.get(base + 'probe', transpose=False)
    out['attn_pool.q.weight'] = r.get(att + 'query/kernel', transpose=False).flatten(1).T
    out['attn_pool.q.bias'] = r.get(att + 'query/bias', transpose=False).reshape(-1)
    kv = [r.get(f'{att}{n}/kernel', transpose=False).flatten(1).T for n in ('key', 'value')]
    out['attn_pool.kv.weight'] = torch.cat(kv)
    kv_bias = [r.get(f'{att}{n}/bias', transpose=False).reshape(-1) for n in ('key', 'value')]
    out['attn_pool.kv.bias'] = torch.cat(kv_bias)
    out['attn_pool.proj.weight'] = r.get(att + 'out/kernel').flatten(1)
    out['attn_pool.proj.bias'] = r.get(att + 'out/bias')
    out['attn_pool.norm.weight'] = r.get(base + 'LayerNorm_0/scale')
    out['attn_pool.norm.bias'] = r.get(base + 'LayerNorm_0/bias')
    for j in range(2):
        out[f'attn_pool.mlp.fc{j + 1}.weight'] = r.get(f'{base}MlpBlock_0/Dense_{j}/kernel')
        out[f'attn_pool.mlp.fc{j + 1}.bias'] = r.get(f'{base}MlpBlock_0/Dense_{j}/bias')


def read_npz_state_dict(path, model: nn.Module, prefix: str = '') -> Dict[str, torch.Tensor]:
    """The tensors timm's ``load_pretrained`` would write into ``model`` from the .npz file at ``path``, under
    our parameter names. FileNotFoundError / ValueError (one line) for a missing, unreadable or foreign file."""
    path = os.fspath(path)
    r = _open(path, prefix)
    big_vision = (r.prefix.startswith('params/') or r.has('pos_embedding')
                  or r.has('Transformer/encoderblock/LayerNorm_0/scale'))
    embeds = model.embeds
    out = {'embeds.proj.weight': _patch_weight(r, embeds)}
    if embeds.proj.bias is not None and r.has('embedding/bias'):
        out['embeds.proj.bias'] = r.get('embedding/bias')
    if embeds.cls_token is not None and r.has('cls'):
        out['embeds.cls_token'] = r.get('cls', transpose=False)
    _pos_embed(r, model, big_vision, out)
    if isinstance(model.norm, nn.LayerNorm):
        out['norm.weight'] = r.get('Transformer/encoder_norm/scale')
        out['norm.bias'] = r.get('Transformer/encoder_norm/bias')
    head = model.head
    if isinstance(head, nn.Linear) and r.has('head/bias') and r.get('head/bias').shape[-1] == head.bias.shape[0]:
        out['head.weight'] = r.get('head/kernel')
        out['head.bias'] = r.get('head/bias')
    if model.attn_pool is not None:
        _map_head(r, out)
    _blocks(r, model, big_vision, out)
    return out


def load_npz(model: nn.Module, path, prefix: str = '') -> List[str]:
    """Load a .npz checkpoint into ``model`` as timm's ``model.load_pretrained(path)`` does (see the module
    docstring); every tensor read must fit its parameter. Returns the parameters left as they were."""
    state = read_npz_state_dict(path, model, prefix)
    own = model.state_dict()
    bad = [f'{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}' for k, v in state.items()
           if k in own and v.shape != own[k].shape]
    bad += [f'{k}: not in the model' for k in state if k not in own]
    if bad:
        more = f' (+{len(bad) - 5} more)' if len(bad) > 5 else ''
        raise ValueError(f'{os.fspath(path)!r} does not fit the model: {bad[:5]}{more}')
    model.load_state_dict(state, strict=False)
    return sorted(k for k in own if k not in state)
