"""Per-token position embeddings for variable grids, without host syncs.

NaFlex (SigLIP 2, arXiv:2502.14786) keeps a learned 16x16 position-embedding table and resizes it to each
image's patch grid; NaViT (arXiv:2307.06304) adds factorized (separate y / x tables) and aspect-preserving
variants; RADIO (arXiv:2412.07679) stores a 128x128 table and resizes it bilinearly, without anti-aliasing, to a
square of the larger grid side (cropped top-left). timm resizes the table per distinct grid size with
``F.interpolate`` and Python loops over the batch (``.item()`` calls, compiler disabled). Here the resize is done
per token instead:

Separable interpolation means ``F.interpolate(table, (H, W))[y, x] = sum_ij Wy[y, i] * Wx[x, j] * table[i, j]``,
where ``Wy`` is the 1-D resize matrix from the table height to ``H`` (and ``Wx`` likewise). Each row of a 1-D
resize matrix has a closed form (the filter weights PyTorch itself uses), so for every token we compute its
row of ``Wy`` and ``Wx`` from ``(y, H)`` and ``(x, W)`` with tensor ops only. Everything stays on the device and
has static shapes, so it compiles into one graph. Two ways to apply the weights:
- anti-aliased kernels, whose support widens with the downsampling factor: dense rows, one matmul of the
  [T, Gh*Gw] outer products against the flattened table (cheap for the 16x16 tables these variants use);
- plain kernels, a fixed 2 (bilinear) or 4 (bicubic) taps per axis: the taps' table rows are summed with their
  weights by ``F.embedding_bag``, so the cost does not grow with the table (128x128 for RADIO).

Supported resize kernels, each with ``align_corners`` False or True (PyTorch's meanings):
- ``bicubic`` / ``bilinear`` with ``antialias=True``: PyTorch's separable anti-aliased kernels (Keys cubic
  with a=-0.5 / triangle), support widened by the scale when downsampling, weights normalised over the taps
  that fall inside the input (border clipping).
- ``bicubic`` / ``bilinear`` without anti-aliasing: PyTorch's plain kernels (cubic a=-0.75 with clamped border
  taps / linear with clamped source index). ``linear`` (1-D, factorized tables) uses the bilinear rule.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

INTERP_MODES = ('bicubic', 'bilinear')


def _aa_filter(x: torch.Tensor, mode: str) -> torch.Tensor:
    """PyTorch's anti-aliasing filters: Keys cubic (a=-0.5) and triangle."""
    x = x.abs()
    if mode == 'bicubic':
        a = -0.5
        near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
        return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))
    return (1.0 - x).clamp(min=0.0)


def _check_mode(mode: str) -> str:
    mode = 'bilinear' if mode == 'linear' else mode
    if mode not in INTERP_MODES:
        raise ValueError(f'unsupported interpolation mode {mode!r}, expected one of {INTERP_MODES}')
    return mode


def _scale(out_len: torch.Tensor, in_len: int, align_corners: bool) -> torch.Tensor:
    """PyTorch's source-per-output step: in / out, or (in - 1) / (out - 1) with align_corners (0 for out == 1)."""
    out_len = out_len.to(torch.float32)
    # a true division: ``number / tensor`` multiplies by the reciprocal, one rounding more than PyTorch's kernels
    if align_corners:
        steps = torch.full_like(out_len, float(in_len - 1)) / (out_len - 1).clamp(min=1.0)
        return torch.where(out_len > 1, steps, torch.zeros_like(out_len))
    return torch.full_like(out_len, float(in_len)) / out_len


def axis_taps(
        pos: torch.Tensor,
        out_len: torch.Tensor,
        in_len: int,
        mode: str = 'bicubic',
        align_corners: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The input taps and weights of PyTorch's plain (not anti-aliased) 1-D kernels, per token.

    Args:
        pos: [T] output index of each token along this axis.
        out_len: [T] output length along this axis for each token.
        in_len: length of the learned table along this axis.
        mode: 'bicubic' (4 taps) or 'bilinear' / 'linear' (2 taps).
        align_corners: PyTorch's ``align_corners``.

    Returns:
        ([T, K] long input indices, [T, K] float32 weights); border taps are clamped into the table, so an
        index may repeat (its weights then add up).
    """
    mode = _check_mode(mode)
    pos = pos.to(torch.float32)
    scale = _scale(out_len, in_len, align_corners)
    src = scale * pos if align_corners else scale * (pos + 0.5) - 0.5
    if mode == 'bilinear':
        src = src.clamp(min=0.0)
        i0 = torch.floor(src)
        lam = src - i0
        i0 = i0.long().clamp(max=in_len - 1)
        i1 = (i0 + 1).clamp(max=in_len - 1)
        return torch.stack([i0, i1], dim=1), torch.stack([1.0 - lam, lam], dim=1)
    a = -0.75
    i0 = torch.floor(src)
    t = src - i0

    def near(x):  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

    wts = torch.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], dim=1)
    offs = torch.arange(-1, 3, device=pos.device)
    return (i0.long()[:, None] + offs[None, :]).clamp(0, in_len - 1), wts


def axis_weights(
        pos: torch.Tensor,
        out_len: torch.Tensor,
        in_len: int,
        mode: str = 'bicubic',
        antialias: bool = True,
        align_corners: bool = False,
) -> torch.Tensor:
    """Rows of the 1-D resize matrix ``in_len -> out_len`` for each token.

    Args:
        pos: [T] output index of each token along this axis (int or float tensor).
        out_len: [T] output length along this axis for each token (the token's grid size, or max side
            for aspect-preserving resizes).
        in_len: length of the learned table along this axis.
        mode: 'bicubic' or 'bilinear' ('linear' is treated as 'bilinear').
        antialias: use PyTorch's anti-aliased kernels (matches ``F.interpolate(..., antialias=True)``).
        align_corners: PyTorch's ``align_corners``.

    Returns:
        [T, in_len] float32 weights ``W`` such that ``W @ table`` equals ``F.interpolate`` of the table to
        ``out_len``, sampled at ``pos``.
    """
    mode = _check_mode(mode)
    if not antialias:
        idx, wts = axis_taps(pos, out_len, in_len, mode, align_corners)
        return wts.new_zeros(pos.shape[0], in_len).scatter_add(1, idx, wts)  # a method call, so torch.fx records it
    pos = pos.to(torch.float32)
    scale = _scale(out_len, in_len, align_corners)  # [T]
    k = torch.arange(in_len, device=pos.device, dtype=torch.float32)  # input taps
    base_support = 2.0 if mode == 'bicubic' else 1.0
    down = scale >= 1.0
    support = torch.where(down, base_support * scale, torch.full_like(scale, base_support))
    inv_scale = torch.where(down, 1.0 / scale, torch.ones_like(scale))
    center = scale * (pos + 0.5)  # PyTorch's anti-aliased kernels centre the same way with align_corners
    w = _aa_filter((k[None, :] + 0.5 - center[:, None]) * inv_scale[:, None], mode)
    # taps PyTorch visits: [max(int(c - s + .5), 0), min(int(c + s + .5), in_len))
    lo = torch.floor(center - support + 0.5).clamp(min=0.0)
    hi = torch.floor(center + support + 0.5).clamp(max=float(in_len))
    w = torch.where((k[None, :] >= lo[:, None]) & (k[None, :] < hi[:, None]), w, torch.zeros_like(w))
    return w / w.sum(dim=1, keepdim=True)


def learned_pos_embed(
        table: torch.Tensor,
        coord: torch.Tensor,
        grid: torch.Tensor,
        mode: str = 'bicubic',
        antialias: bool = True,
        ar_preserving: bool = False,
        table_size: Optional[Tuple[int, int]] = None,
        align_corners: bool = False,
) -> torch.Tensor:
    """Position embedding of each token from a learned 2-D table, as timm's NaFlex resize would give it.

    Args:
        table: [1, Gh, Gw, C] (or [Gh, Gw, C]) learned table.
        coord: [T, 2] (y, x) patch coordinates.
        grid: [T, 2] (h, w) grid size of the image each token belongs to.
        ar_preserving: resize the table to (L, L), L = max(h, w), and take the top-left (h, w) crop.
        table_size: (Gh, Gw) as Python ints, when the caller knows them: torch.fx sees a parameter's shape as
            symbols, and the resize weights need numbers (default: read from ``table``).
        align_corners: PyTorch's ``align_corners`` for the resize.

    Returns:
        [T, C] float32 position embeddings.
    """
    gh, gw = table_size or (table.shape[-3], table.shape[-2])
    table = table.reshape(gh * gw, -1).float()
    out_h, out_w = grid[:, 0], grid[:, 1]
    if ar_preserving:
        out_h = out_w = torch.maximum(out_h, out_w)
    if not antialias:  # fixed taps: gather K x K table rows per token instead of a dense [T, Gh*Gw] matmul
        iy, wy = axis_taps(coord[:, 0], out_h, gh, mode, align_corners)  # [T, K]
        ix, wx = axis_taps(coord[:, 1], out_w, gw, mode, align_corners)
        idx = (iy[:, :, None] * gw + ix[:, None, :]).flatten(1)  # [T, K*K] rows of the flattened table
        w = (wy[:, :, None] * wx[:, None, :]).flatten(1)
        return F.embedding_bag(idx, table, per_sample_weights=w, mode='sum')
    wy = axis_weights(coord[:, 0], out_h, gh, mode, antialias, align_corners)  # [T, Gh]
    wx = axis_weights(coord[:, 1], out_w, gw, mode, antialias, align_corners)  # [T, Gw]
    w = (wy[:, :, None] * wx[:, None, :]).reshape(-1, gh * gw)
    return w @ table


def factorized_pos_embed(
        table_y: torch.Tensor,
        table_x: torch.Tensor,
        coord: torch.Tensor,
        grid: torch.Tensor,
        ar_preserving: bool = False,
        table_size: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Factorized (NaViT) position embedding: linearly resized y and x tables, summed per token.

    Args:
        table_y: [1, Gh, C] (or [Gh, C]); table_x: [1, Gw, C] (or [Gw, C]).
        coord: [T, 2] (y, x); grid: [T, 2] (h, w).
        table_size: (Gh, Gw) as Python ints when known (see ``learned_pos_embed``).

    Returns:
        [T, C] float32.
    """
    gh, gw = table_size or (table_y.shape[-2], table_x.shape[-2])
    table_y = table_y.reshape(gh, -1).float()
    table_x = table_x.reshape(gw, -1).float()
    out_h, out_w = grid[:, 0], grid[:, 1]
    if ar_preserving:
        out_h = out_w = torch.maximum(out_h, out_w)
    wy = axis_weights(coord[:, 0], out_h, gh, 'linear', antialias=False)
    wx = axis_weights(coord[:, 1], out_w, gw, 'linear', antialias=False)
    return wy @ table_y + wx @ table_x

