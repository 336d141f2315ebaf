"""Patch embedding for pre-patchified NaFlex inputs, with FlexiViT patch-size resampling.

The embedding is a linear projection of flattened P x P x C patches (P-P-C order, channel fastest, exactly
like timm's ``batch_patchify(channels_last=True)``), followed by a position embedding computed per token
(see ``naflex.pos_embed``). Parameter names (``embeds.proj``, ``embeds.pos_embed``, ``embeds.pos_embed_y`` /
``_x``, ``embeds.cls_token``, ``embeds.reg_token``) equal timm's ``NaFlexEmbeds`` so checkpoints load as-is.

Variable patch size follows FlexiViT (arXiv:2212.08013): the base P x P kernel is mapped to a new size p with
the pseudo-inverse of the resize operator, ``w_new = w @ pinv(R)``, where ``R`` ([p*p, P*P]) resizes a P x P
patch to p x p (bicubic, anti-aliased). ``R`` is separable, ``R = Ry (x) Rx``, so ``pinv(R) = pinv(Ry) (x)
pinv(Rx)``; we invert the two 1-D matrices (in float64) instead of a 256 x p^2 one. NaFlex: SigLIP 2
(arXiv:2502.14786).
"""
import contextlib
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .pos_embed import factorized_pos_embed, learned_pos_embed


def resize_matrix_1d(old: int, new: int, mode: str = 'bicubic', antialias: bool = True) -> torch.Tensor:
    """[new, old] float64 matrix of the 1-D resize ``old -> new`` (an identity image resized along one axis)."""
    eye = torch.eye(old, dtype=torch.float64)[None, None]
    return F.interpolate(eye, size=(new, old), mode=mode, antialias=antialias, align_corners=False)[0, 0]


def flexi_pinv_1d(old: int, new: int, mode: str = 'bicubic', antialias: bool = True) -> torch.Tensor:
    """[old, new] float64 pseudo-inverse of the 1-D resize matrix (FlexiViT's PI-resize, one axis)."""
    return torch.linalg.pinv(resize_matrix_1d(old, new, mode, antialias))


def apply_pinv(weight: torch.Tensor, py: torch.Tensor, px: torch.Tensor, in_chans: int = 3) -> torch.Tensor:
    """Map a linear patch-embed weight [D, Ph*Pw*C] (P-P-C order) through per-axis pseudo-inverses
    ``py`` [Ph, ph], ``px`` [Pw, pw] -> [D, ph*pw*C]. Computed in the matrices' dtype, returned in the weight's."""
    d = weight.shape[0]
    w = weight.reshape(d, py.shape[0], px.shape[0], in_chans).to(py.dtype)
    w = torch.einsum('dyxc,yY,xX->dYXc', w, py, px)
    return w.reshape(d, -1).to(weight.dtype)


def resample_patch_weight(
        weight: torch.Tensor,
        base_size: Tuple[int, int],
        new_size: Tuple[int, int],
        in_chans: int = 3,
        mode: str = 'bicubic',
        antialias: bool = True,
) -> torch.Tensor:
    """FlexiViT PI-resize of a linear patch-embed weight [D, Ph*Pw*C] (P-P-C order) to [D, ph*pw*C]."""
    if tuple(base_size) == tuple(new_size):
        return weight
    py = flexi_pinv_1d(base_size[0], new_size[0], mode, antialias).to(weight.device)
    px = flexi_pinv_1d(base_size[1], new_size[1], mode, antialias).to(weight.device)
    return apply_pinv(weight, py, px, in_chans)


def _autocast_off(like: torch.Tensor):
    """Autocast disabled on ``like``'s device. Under torch.fx symbolic tracing ``like`` is a Proxy whose device is
    unknown, and a graph records no context manager anyway: the traced module computes in its inputs' dtype."""
    if isinstance(like, torch.fx.Proxy):
        return contextlib.nullcontext()
    return torch.autocast(like.device.type, enabled=False)


class NaFlexEmbeds(nn.Module):
    """Linear patch projection + per-token position embedding + prefix (class / register) tokens.

    The module does not place tokens into sequences; the model does (packed or padded). It exposes:
    ``project(patches, patch_size)`` -> [..., D]; ``pos_embed_tokens(coord, grid)`` -> [T, D];
    ``prefix_tokens()`` -> [num_prefix, D] or None.
    """

    def __init__(
            self,
            patch_size: int = 16,
            in_chans: int = 3,
            embed_dim: int = 768,
            proj_bias: bool = True,
            class_token: bool = False,
            reg_tokens: int = 0,
            pos_embed: str = 'learned',
            pos_embed_grid_size: Tuple[int, int] = (16, 16),
            pos_embed_interp_mode: str = 'bicubic',
            pos_embed_ar_preserving: bool = False,
            pos_embed_antialias: bool = True,
            pos_embed_align_corners: bool = False,
            pos_drop_rate: float = 0.0,
    ):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.pos_embed_type = pos_embed if pos_embed in ('learned', 'factorized') else 'none'
        self.pos_embed_interp_mode = pos_embed_interp_mode
        self.pos_embed_ar_preserving = pos_embed_ar_preserving
        self.pos_embed_antialias = pos_embed_antialias
        self.pos_embed_align_corners = pos_embed_align_corners
        self.num_prefix_tokens = int(class_token) + reg_tokens

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        self.proj = nn.Linear(patch_size * patch_size * in_chans, embed_dim, bias=proj_bias)
        self.norm = nn.Identity()  # timm's (unused by NaFlexViT variants) post-projection norm slot
        gh, gw = pos_embed_grid_size
        self.pos_embed_grid_size = (gh, gw)  # the table's size as numbers, which torch.fx cannot read off a parameter
        self.pos_embed = self.pos_embed_y = self.pos_embed_x = None
        if self.pos_embed_type == 'learned':
            self.pos_embed = nn.Parameter(torch.zeros(1, gh, gw, embed_dim))
        elif self.pos_embed_type == 'factorized':
            self.pos_embed_y = nn.Parameter(torch.zeros(1, gh, embed_dim))
            self.pos_embed_x = nn.Parameter(torch.zeros(1, gw, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self._weight_cache: Dict[Tuple, torch.Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for tok in (self.cls_token, self.reg_token):
            if tok is not None:
                nn.init.normal_(tok, std=1e-6)
        for pe in (self.pos_embed, self.pos_embed_y, self.pos_embed_x):
            if pe is not None:
                nn.init.normal_(pe, std=0.02)

    def _resampled_weight(self, patch_size: Tuple[int, int]) -> torch.Tensor:
        weight = self.proj.weight
        if patch_size == self.patch_size:
            return weight
        # The pseudo-inverses only depend on sizes: cache them (float32, like timm) and apply to the live weight
        # so gradients flow to ``proj.weight``.
        key = (patch_size, weight.device)
        if key not in self._weight_cache:
            self._weight_cache[key] = tuple(
                flexi_pinv_1d(b, n, self.pos_embed_interp_mode).to(weight.device, torch.float32)
                for b, n in zip(self.patch_size, patch_size))
        py, px = self._weight_cache[key]
        return apply_pinv(weight, py, px, self.in_chans)

    def prewarm_patch_sizes(self, sizes) -> None:
        """Build the resampling matrices for ``sizes`` now (call before torch.compile, after ``.to(device)``)."""
        for p in sizes:
            self._resampled_weight((p, p) if isinstance(p, int) else tuple(p))

    def _apply(self, fn, *args, **kwargs):
        self._weight_cache.clear()  # device / dtype moves invalidate cached matrices
        return super()._apply(fn, *args, **kwargs)

    def project(self, patches: torch.Tensor, patch_size: Tuple[int, int]) -> torch.Tensor:
        """Linear embedding of flattened (P-P-C) patches [..., p*p*C] -> [..., D], resampling the kernel if needed.
        Patches come in the weights' dtype (a model cast to bfloat16 takes the loader's float32 patches)."""
        weight = self._resampled_weight(tuple(patch_size))
        return self.norm(F.linear(patches.to(weight.dtype), weight, self.proj.bias))

    def pos_embed_tokens(self, coord: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """[T, D] float32 position embedding of tokens at ``coord`` [T, 2] (y, x) in grids ``grid`` [T, 2] (h, w).

        Computed in float32 even under autocast (timm resizes the table in float32 too)."""
        with _autocast_off(coord):
            if self.pos_embed_type == 'learned':
                return learned_pos_embed(
                    self.pos_embed, coord, grid, self.pos_embed_interp_mode, self.pos_embed_antialias,
                    self.pos_embed_ar_preserving, self.pos_embed_grid_size, self.pos_embed_align_corners)
            if self.pos_embed_type == 'factorized':
                return factorized_pos_embed(
                    self.pos_embed_y, self.pos_embed_x, coord, grid, self.pos_embed_ar_preserving,
                    self.pos_embed_grid_size)
        raise RuntimeError('model has no position embedding')

    def prefix_tokens(self):
        """[num_prefix, D] class token then register tokens (timm order), or None."""
        toks = [t.reshape(-1, self.embed_dim) for t in (self.cls_token, self.reg_token) if t is not None]
        return torch.cat(toks, dim=0) if toks else None
