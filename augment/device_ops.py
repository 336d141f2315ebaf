"""Photometric augmentations applied on the device to a whole packed uint8 batch (NaViT arXiv:2307.06304 packing),
with the pixels of the per-image CPU path.

Why: with augmentation on the device, loader workers only decode and draw parameters; the step then applies each
op to every image of the batch at once. Each function here is a fixed sequence of tensor ops whatever the batch:
no Python loop over images, no ``.item()``/``.tolist()``, no data-dependent shape or branch, no host tensor; the
same code runs on CPU and CUDA tensors (tests/test_device_ops.py checks it on fake CUDA tensors).

Layout: the loader's packed batch as it is (loaders.packing): ``x_TD`` uint8 [T, P*P*3], one token per row, pixels
P-P-C inside a token, each image's tokens row-major over its patch grid, images back to back. Colour ops are
per-pixel with per-image scalars gathered per token (``PackedLayout.seg_T``); the ops that need a pixel's
neighbours (sharpness) or move pixels (flips) find the neighbouring tokens from each token's grid position, so no
image-major copy of the batch is made. Parameters are [B] tensors on the batch's device, one entry per image;
``apply_B`` (bool [B]) selects the images an op changes: the others come out bit for bit unchanged and their
parameters are ignored, so one call serves a batch where each image drew its own ops.

Semantics are those of the CPU path (augment.randaugment.OPS and augment.photometric on PIL images, i.e. Pillow's
C code through torchvision's PIL kernels), mirrored operation by operation in the same float precision:
- brightness, contrast, saturation (PIL's "Color"), sharpness: ``ImageEnhance``, i.e. ``Image.blend(degenerate,
  img, f)``, ``trunc(clip(d + f * (x - d)))`` in float32 (Blend.c), with the degenerate image black, the grey of
  ``int(mean luma + 0.5)`` (ImageStat), the luma image, or ``ImageFilter.SMOOTH`` (Filter.c's 3x3 float32 taps,
  kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, +0.5 and truncation; the image's outermost rows and columns copied);
- luma (saturation, contrast's mean, grayscale): ITU-R 601-2 ``(19595 R + 38470 G + 7471 B + 2**15) >> 16``
  (Convert.c ``rgb2l``);
- posterize, solarize, solarize-add, invert: ``ImageOps`` look-up tables, with randaugment's extensions (0 bits:
  black; threshold >= 256: identity);
- equalize and autocontrast: ``ImageOps.equalize`` / ``autocontrast`` per image and channel from its histogram
  (equalize: step = (count - count of the last used level) // 255; autocontrast: int(i * 255 / (hi - lo) - lo *
  scale) in float64, as Python computes it);
- hue (torchvision's ``adjust_hue`` on PIL): Pillow's RGB -> HSV (Convert.c ``rgb2hsv``), hue byte + int(255 h)
  mod 256, HSV -> RGB (``hsv2rgb``), with Pillow's mix of float32 and float64 steps; pass hue factors as float64;
- colour jitter: torchvision's ColorJitter order semantics: the four adjustments in a per-image order;
- horizontal / vertical flip of each image, and the final normalisation to float (``normalize_patches``).

Tolerance against the CPU path: every op is exact (0 levels) in eager mode, checked on the CPU per image against
the PIL implementation on generated and natural images. CUDA runs the same IEEE float32/float64 element-wise ops
in the same order, so it is expected to be exact too, to be confirmed on a GPU. A compiler that fuses ``a * b + c``
into one FMA (torch.compile) can move a blended value across an integer: up to 1 level there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

C = 3  # RGB; patches are P-P-C
# Pillow's SMOOTH kernel (ImageFilter.SMOOTH: 3x3, scale 13) as _imaging.c hands it to Filter.c: float32 k / 13.
_K1 = float(np.float32(1) / np.float32(13))
_K5 = float(np.float32(5) / np.float32(13))


@dataclass
class PackedLayout:
    """Where each token of a packed batch lies (per-token image index and patch-grid position), made once per batch
    on the batch's device from the loader's metadata, and shared by every op of the step."""
    seg_T: torch.Tensor    # int64 [T]: the image each token belongs to
    y_T: torch.Tensor      # int64 [T]: its patch row in that image
    x_T: torch.Tensor      # int64 [T]: its patch column
    grid_B2: torch.Tensor  # int64 [B, 2]: each image's patch grid (h, w)
    start_B: torch.Tensor  # int64 [B]: each image's first token
    patch_size: int

    @classmethod
    def from_batch(cls, batch: Dict) -> 'PackedLayout':
        """From loaders.packing.pack's dict (its tensors on the device): cu_seqlens, patch_coord, grid_sizes."""
        cu = batch['cu_seqlens'].long()
        tokens = torch.arange(batch['patches'].shape[0], device=cu.device)
        seg = torch.searchsorted(cu[1:], tokens, right=True)  # image i holds tokens cu[i] <= t < cu[i + 1]
        coord = batch['patch_coord'].long()
        return cls(seg, coord[:, 0], coord[:, 1], batch['grid_sizes'].long(), cu[:-1], int(batch['patch_size']))

    @property
    def num_images(self) -> int:
        return self.grid_B2.shape[0]

    def per_token(self, v_B: torch.Tensor) -> torch.Tensor:
        """[B, ...] per-image values -> [T, ...] per-token values."""
        return v_B.index_select(0, self.seg_T)

    def neighbour(self, dy: int, dx: int) -> torch.Tensor:
        """int64 [T]: the token (dy, dx) patches away in the same image; the token itself where that is off the
        grid (only image-border pixels would read it, and those are not filtered)."""
        grid_T2 = self.per_token(self.grid_B2)
        y, x = self.y_T + dy, self.x_T + dx
        inside = (y >= 0) & (y < grid_T2[:, 0]) & (x >= 0) & (x < grid_T2[:, 1])
        index = self.per_token(self.start_B) + y * grid_T2[:, 1] + x
        return torch.where(inside, index, torch.arange(self.seg_T.shape[0], device=self.seg_T.device))


def _per_token(layout: PackedLayout, v_B: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-image values gathered per token and shaped to broadcast against ``like`` ([T, ...])."""
    return layout.per_token(v_B).view(-1, *([1] * (like.dim() - 1)))


def _where_applied(layout: PackedLayout, apply_B: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(_per_token(layout, apply_B, new), new, old)


def _div(a: torch.Tensor, b: float) -> torch.Tensor:
    """a / b rounded once, as C divides. torch computes ``b / tensor`` as ``reciprocal(tensor) * b``, and CUDA
    divides by a host scalar through its reciprocal; a 0-d device tensor takes the plain division kernel."""
    return a / torch.full((), b, dtype=a.dtype, device=a.device)


def _luma(x_TD: torch.Tensor) -> torch.Tensor:
    """int32 [T, P*P]: Pillow's RGB -> L (Convert.c rgb2l, ITU-R 601-2 in 16-bit fixed point)."""
    rgb = x_TD.view(x_TD.shape[0], -1, C).to(torch.int32)
    return (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16


def _blend(layout: PackedLayout, x_TD: torch.Tensor, degenerate: Optional[torch.Tensor], factor_B: torch.Tensor,
           apply_B: torch.Tensor) -> torch.Tensor:
    """``Image.blend(degenerate, image, factor)`` for uint8 images (Pillow's Blend.c): the float32 value
    ``d + f * (x - d)``, clipped to [0, 255] and truncated. ``degenerate`` broadcasts against [T, P*P, C]; None is
    a black image, for which the value is ``f * x`` exactly (two passes fewer)."""
    x = x_TD.view(x_TD.shape[0], -1, C)
    xf = x.to(torch.float32)
    f = _per_token(layout, factor_B.to(torch.float32), xf)
    value = f * xf if degenerate is None else degenerate + f * (xf - degenerate)
    out = value.clamp_(0, 255).to(torch.uint8)  # float -> uint8 truncates
    return _where_applied(layout, apply_B, out, x).view_as(x_TD)


# ------------------------------------------------------------------------------------------- ImageEnhance ops
def brightness(x_TD: torch.Tensor, layout: PackedLayout, apply_B: torch.Tensor, factor_B: torch.Tensor):
    """``ImageEnhance.Brightness``: blend with a black image (``F.adjust_brightness`` on PIL)."""
    return _blend(layout, x_TD, None, factor_B, apply_B)


def _mean_grey(luma_TN: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """int64 [B]: ``int(mean + 0.5)`` of each image's L values (ImageStat's mean of the L histogram), exactly, in
    integers: floor((2 sum + n) / 2n)."""
    sum_B = torch.zeros(layout.num_images, dtype=torch.int64, device=luma_TN.device).index_add_(
        0, layout.seg_T, luma_TN.sum(1, dtype=torch.int64))
    pixels_B = layout.grid_B2[:, 0] * layout.grid_B2[:, 1] * (layout.patch_size ** 2)
    return torch.div(2 * sum_B + pixels_B, 2 * pixels_B, rounding_mode='floor')


def contrast(x_TD: torch.Tensor, layout: PackedLayout, apply_B: torch.Tensor, factor_B: torch.Tensor):
    """``ImageEnhance.Contrast``: blend with a grey image of each image's rounded mean luma."""
    mean_B = _mean_grey(_luma(x_TD), layout)
    return _blend(layout, x_TD, layout.per_token(mean_B.to(torch.float32)).view(-1, 1, 1), factor_B, apply_B)


def saturation(x_TD: torch.Tensor, layout: PackedLayout, apply_B: torch.Tensor, factor_B: torch.Tensor):
    """``ImageEnhance.Color``: blend with the image's own luma (``F.adjust_saturation`` on PIL; RandAugment's
    Color / Desaturate)."""
    return _blend(layout, x_TD, _luma(x_TD).to(torch.float32).unsqueeze(-1), factor_B, apply_B)


def _padded_tiles(x_TD: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """uint8 [T, P+2, P+2, C]: each token with a one-pixel ring taken from its 8 neighbouring tokens (itself where
    the image ends), so a 3x3 filter runs on every token independently."""
    P = layout.patch_size
    x4 = x_TD.view(-1, P, P, C)

    def take(view, dy, dx):
        return view.index_select(0, layout.neighbour(dy, dx))

    top = torch.cat([take(x4[:, P - 1:, P - 1:], -1, -1), take(x4[:, P - 1:], -1, 0), take(x4[:, P - 1:, :1], -1, 1)],
                    dim=2)
    middle = torch.cat([take(x4[:, :, P - 1:], 0, -1), x4, take(x4[:, :, :1], 0, 1)], dim=2)
    bottom = torch.cat([take(x4[:, :1, P - 1:], 1, -1), take(x4[:, :1], 1, 0), take(x4[:, :1, :1], 1, 1)], dim=2)
    return torch.cat([top, middle, bottom], dim=1)


def _image_border(layout: PackedLayout) -> torch.Tensor:
    """bool [T, P, P, 1]: pixels on their image's outermost rows and columns."""
    P = layout.patch_size
    grid_T2 = layout.per_token(layout.grid_B2)
    p = torch.arange(P, device=layout.seg_T.device)
    top = (layout.y_T == 0).view(-1, 1, 1, 1) & (p == 0).view(1, P, 1, 1)
    bottom = (layout.y_T == grid_T2[:, 0] - 1).view(-1, 1, 1, 1) & (p == P - 1).view(1, P, 1, 1)
    left = (layout.x_T == 0).view(-1, 1, 1, 1) & (p == 0).view(1, 1, P, 1)
    right = (layout.x_T == grid_T2[:, 1] - 1).view(-1, 1, 1, 1) & (p == P - 1).view(1, 1, P, 1)
    return top | bottom | left | right


def smooth(x_TD: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """``img.filter(ImageFilter.SMOOTH)`` of every image (Filter.c ImagingFilter3x3): per pixel and channel the
    float32 sum 0.5 + row below + row + row above, each row (left * k0 + centre * k1) + right * k2, clipped and
    truncated; the image's outermost rows and columns are copied."""
    P = layout.patch_size
    tile = _padded_tiles(x_TD, layout).to(torch.float32)

    def row(r, k_side, k_mid):  # one kernel row over the tile rows r .. r + P - 1
        w = tile[:, r:r + P]
        return (w[:, :, 0:P] * k_side + w[:, :, 1:P + 1] * k_mid) + w[:, :, 2:P + 2] * k_side

    ss = 0.5 + row(2, _K1, _K1)
    ss = ss + row(1, _K1, _K5)
    ss = ss + row(0, _K1, _K1)
    out = ss.clamp_(0, 255).to(torch.uint8)
    return torch.where(_image_border(layout), x_TD.view(-1, P, P, C), out).view_as(x_TD)


def sharpness(x_TD: torch.Tensor, layout: PackedLayout, apply_B: torch.Tensor, factor_B: torch.Tensor):
    """``ImageEnhance.Sharpness``: blend with the SMOOTH-filtered image (``F.adjust_sharpness`` on PIL)."""
    degenerate = smooth(x_TD, layout).view(x_TD.shape[0], -1, C).to(torch.float32)
    return _blend(layout, x_TD, degenerate, factor_B, apply_B)


# ------------------------------------------------------------------------------------------ look-up-table ops
def posterize(x_TD: torch.Tensor, layout: PackedLayout, apply_B: torch.Tensor, bits_B: torch.Tensor):
    """``ImageOps.posterize``: keep the ``bits`` most significant bits (randaugment.op_posterize: <= 0 bits is
    black, >= 8 the identity)."""
    drop_B = 8 - bits_B.to(torch.int32).clamp(0, 8)
    mask_B = (256 - torch.bitwise_left_shift(torch.ones_like(drop_B), drop_B)).to(torch.uint8)
    mask_B = torch.where(apply_B, mask_B, 255)
    return x_TD & _per_token(layout, mask_B, x_TD)


def solarize(x_TD: torch.Tensor, layout: PackedLayout, apply_B: torch.Tensor, threshold_B: torch.Tensor):
    """``ImageOps.solarize``: levels >= threshold are inverted (randaugment.op_solarize: >= 256 is the identity,
    <= 0 inverts everything, which the same rule gives)."""
    threshold_B = torch.where(apply_B, threshold_B.to(torch.int32).clamp(0, 256), 256).to(torch.int16)
    inverted = x_TD.to(torch.int16) >= _per_token(layout, threshold_B, x_TD)
    return torch.where(inverted, 255 - x_TD, x_TD)


def solarize_add(x_TD: torch.Tensor, layout: PackedLayout, apply_B: torch.Tensor, add_B: torch.Tensor,
                 threshold: int = 128):
    """randaugment.op_solarize_add (timm's SolarizeAdd): levels below ``threshold`` get ``add``, capped at 255."""
    add_B = torch.where(apply_B, add_B.to(torch.int16), 0)
    added = (x_TD.to(torch.int16) + _per_token(layout, add_B, x_TD)).clamp_(0, 255).to(torch.uint8)
    return torch.where(x_TD < threshold, added, x_TD)


def invert(x_TD: torch.Tensor, layout: PackedLayout, apply_B: torch.Tensor):
    """``ImageOps.invert``: 255 - x, written as x XOR 255 on the applied images."""
    mask_B = torch.where(apply_B, 255, 0).to(torch.uint8)
    return x_TD ^ _per_token(layout, mask_B, x_TD)


def grayscale(x_TD: torch.Tensor, layout: PackedLayout, apply_B: torch.Tensor):
    """``F.rgb_to_grayscale(img, 3)`` on PIL: the L image (Pillow's luma) in all three channels."""
    grey = _luma(x_TD).to(torch.uint8).unsqueeze(-1).expand(-1, -1, C)
    return _where_applied(layout, apply_B, grey, x_TD.view(x_TD.shape[0], -1, C)).reshape(x_TD.shape)


def _histogram_index(x_TD: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """int32 [T*P*P*C]: each value's bin in the per-(image, channel) histograms laid out [B, C, 256]."""
    chan = torch.arange(C, dtype=torch.int32, device=x_TD.device)
    base = (layout.seg_T.to(torch.int32).view(-1, 1, 1) * C + chan) * 256
    return (base + x_TD.view(x_TD.shape[0], -1, C).to(torch.int32)).view(-1)


def _histograms(index: torch.Tensor, num_images: int) -> torch.Tensor:
    """int32 [B, C, 256] counts (an index_add: bincount's output size would depend on the data)."""
    ones = torch.ones((), dtype=torch.int32, device=index.device).expand(index.shape[0])
    hist = torch.zeros(num_images * C * 256, dtype=torch.int32, device=index.device).index_add_(0, index, ones)
    return hist.view(num_images, C, 256)


def _apply_luts(x_TD, layout, apply_B, index, lut_BC256):
    out = lut_BC256.to(torch.uint8).view(-1).index_select(0, index).view(x_TD.shape[0], -1, C)
    return _where_applied(layout, apply_B, out, x_TD.view(x_TD.shape[0], -1, C)).view_as(x_TD)


def equalize(x_TD: torch.Tensor, layout: PackedLayout, apply_B: torch.Tensor):
    """``ImageOps.equalize`` per image and channel: step = (n - n_last) // 255 over the used levels (n_last: count
    of the highest used level), lut[i] = (step // 2 + #values below i) // step clipped to 255 (Pillow's point()
    clips); identity where one level or less is used or step is 0."""
    index = _histogram_index(x_TD, layout)
    h = _histograms(index, layout.num_images).to(torch.int64)
    levels = torch.arange(256, device=x_TD.device)
    used = h > 0
    last = torch.where(used, levels, 0).amax(-1, keepdim=True)
    step = (h.sum(-1, keepdim=True) - h.gather(-1, last)) // 255
    below = h.cumsum(-1) - h
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp_(max=255)
    identity = (used.sum(-1, keepdim=True) <= 1) | (step == 0)
    lut = torch.where(identity, levels, lut)
    return _apply_luts(x_TD, layout, apply_B, index, lut)


def autocontrast(x_TD: torch.Tensor, layout: PackedLayout, apply_B: torch.Tensor):
    """``ImageOps.autocontrast`` (no cutoff) per image and channel: lo/hi the lowest/highest used levels, lut[i] =
    int(i * scale + offset) clipped to [0, 255] with scale = 255.0 / (hi - lo), offset = -lo * scale in float64 as
    Python computes them; identity where hi <= lo."""
    index = _histogram_index(x_TD, layout)
    used = _histograms(index, layout.num_images) > 0
    levels = torch.arange(256, device=x_TD.device)
    lo = torch.where(used, levels, 255).amin(-1, keepdim=True)
    hi = torch.where(used, levels, 0).amax(-1, keepdim=True)
    span = (hi - lo).clamp(min=1).to(torch.float64)
    scale = torch.full_like(span, 255.0) / span
    offset = (-lo).to(torch.float64) * scale
    lut = (levels.to(torch.float64) * scale + offset).trunc_().clamp_(0, 255).to(torch.int64)
    lut = torch.where(hi <= lo, levels, lut)
    return _apply_luts(x_TD, layout, apply_B, index, lut)


# ------------------------------------------------------------------------------------------------------- hue
def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's round() for v >= 0 (torch.round rounds half to even)."""
    fl = v.floor()
    return fl + (v - fl >= 0.5).to(v.dtype)


def _rgb_to_hsv(rgb):
    """Pillow's rgb2hsv_row (Convert.c), float32 where it uses float, float64 where its constants are double."""
    f32, f64 = torch.float32, torch.float64
    r, g, b = (rgb[..., i].to(torch.int32) for i in range(C))
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    grey = maxc == minc
    cr = torch.where(grey, 1, maxc - minc).to(f32)
    s = cr / torch.where(grey, 1, maxc).to(f32)
    rc, gc, bc = ((maxc - c).to(f32) / cr for c in (r, g, b))
    h = torch.where(r == maxc, bc - gc, torch.where(
        g == maxc, ((2.0 + rc.to(f64)) - bc.to(f64)).to(f32), ((4.0 + gc.to(f64)) - rc.to(f64)).to(f32)))
    h = torch.fmod(_div(h.to(f64), 6.0) + 1.0, 1.0).to(f32)
    uh = torch.where(grey, 0, (h.to(f64) * 255.0).trunc().clamp(0, 255).to(torch.int32))
    us = torch.where(grey, 0, (s.to(f64) * 255.0).trunc().clamp(0, 255).to(torch.int32))
    return uh, us, maxc


def _hsv_to_rgb(h, s, v):
    """Pillow's hsv2rgb (Convert.c): sector i = floor(6h / 255), C round() of the p/q/t levels."""
    f32, f64 = torch.float32, torch.float64
    h6 = _div(h.to(f32).to(f64) * 6.0, 255.0)
    i = h6.floor()
    f = (h6 - i).to(f32)
    fs = _div(s.to(f64), 255.0).to(f32)
    vd = v.to(f64)
    p = _round_half_away(vd * (1.0 - fs.to(f64)))
    q = _round_half_away(vd * (1.0 - (fs * f).to(f64)))
    t = _round_half_away(vd * (1.0 - fs.to(f64) * (1.0 - f.to(f64))))
    p, q, t = (c.clamp(0, 255).to(torch.int32) for c in (p, q, t))
    sector = i.to(torch.int64) % 6

    def pick(*by_sector):  # hsv2rgb's switch: the value a channel takes in sectors 0..5
        out = by_sector[5]
        for k in range(4, -1, -1):
            out = torch.where(sector == k, by_sector[k], out)
        return out

    rgb = torch.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], -1)
    return torch.where((s == 0).unsqueeze(-1), v.unsqueeze(-1).expand_as(rgb), rgb)


def hue(x_TD: torch.Tensor, layout: PackedLayout, apply_B: torch.Tensor, factor_B: torch.Tensor):
    """torchvision's ``adjust_hue`` on PIL: RGB -> HSV (Pillow), hue byte + int(factor * 255) mod 256, HSV -> RGB
    (Pillow). ``factor_B`` in [-0.5, 0.5]; float64 so that int(factor * 255) is Python's."""
    rgb = x_TD.view(x_TD.shape[0], -1, C)
    h, s, v = _rgb_to_hsv(rgb)
    shift_B = (factor_B.to(torch.float64) * 255).trunc().to(torch.int32)
    h = (h + _per_token(layout, shift_B, h)) & 255  # numpy's uint8 wrap-around
    out = _hsv_to_rgb(h, s, v).to(torch.uint8)
    return _where_applied(layout, apply_B, out, rgb).view_as(x_TD)


# ------------------------------------------------------------------------------------------------ colour jitter
def color_jitter(x_TD: torch.Tensor, layout: PackedLayout, apply_B: torch.Tensor, order_B4: torch.Tensor,
                 factor_B4: torch.Tensor, active_B4: torch.Tensor, with_hue: bool = True):
    """augment.photometric.color_jitter (torchvision ColorJitter's semantics): per image, brightness (0), contrast
    (1), saturation (2) and hue (3) in the image's drawn order ``order_B4`` (a permutation of 0..3), each where
    ``active_B4`` is set, with ``factor_B4`` (float64: the hue column is used as float64).

    The four positions are applied in turn. Brightness, contrast and saturation are all ``Image.blend`` with a
    different degenerate image (black, the mean grey, the luma), so each position is one blend whose degenerate
    image is picked per image, then hue on the images that have it there: 4 blends (+ 4 hue passes; none with
    ``with_hue=False``, a host setting from the jitter strength, never from the data)."""
    for k in range(4):
        op_B = order_B4[:, k]
        factor_B = factor_B4.gather(1, op_B.view(-1, 1)).squeeze(1)
        on_B = apply_B & active_B4.gather(1, op_B.view(-1, 1)).squeeze(1)
        luma = _luma(x_TD)
        mean_T11 = layout.per_token(_mean_grey(luma, layout).to(torch.float32)).view(-1, 1, 1)
        op_T11 = layout.per_token(op_B).view(-1, 1, 1)
        luma_TN1 = luma.to(torch.float32).unsqueeze(-1)
        degenerate = torch.where(op_T11 == 0, 0.0, torch.where(op_T11 == 1, mean_T11, luma_TN1))
        x_TD = _blend(layout, x_TD, degenerate, factor_B, on_B & (op_B < 3))
        if with_hue:
            x_TD = hue(x_TD, layout, on_B & (op_B == 3), factor_B)
    return x_TD


def stack_color_jitter(draws: Sequence[Optional[Tuple[Sequence[int], Sequence[Optional[float]]]]]):
    """Host side (loader): per-image draws of augment.photometric.sample_color_jitter (None: no jitter) ->
    (apply_B bool, order_B4 int64, factor_B4 float64, active_B4 bool), CPU tensors to move with the batch."""
    n = len(draws)
    apply = torch.zeros(n, dtype=torch.bool)
    order = torch.arange(4).repeat(n, 1)
    factor = torch.ones(n, 4, dtype=torch.float64)
    active = torch.zeros(n, 4, dtype=torch.bool)
    for i, draw in enumerate(draws):
        if draw is None:
            continue
        apply[i] = True
        order[i] = torch.as_tensor(list(draw[0]))
        for j, f in enumerate(draw[1]):
            if f is not None:
                factor[i, j], active[i, j] = f, True
    return apply, order, factor, active


# ----------------------------------------------------------------------------------------------------- flips
def _flip(x_TD: torch.Tensor, layout: PackedLayout, apply_B: torch.Tensor, horizontal: bool):
    P = layout.patch_size
    grid_T2 = layout.per_token(layout.grid_B2)
    y, x = layout.y_T, layout.x_T
    if horizontal:
        x = grid_T2[:, 1] - 1 - x
    else:
        y = grid_T2[:, 0] - 1 - y
    apply_T = layout.per_token(apply_B)
    src = torch.where(apply_T, layout.per_token(layout.start_B) + y * grid_T2[:, 1] + x,
                      torch.arange(x_TD.shape[0], device=x_TD.device))
    moved = x_TD.index_select(0, src).view(-1, P, P, C)
    out = torch.where(apply_T.view(-1, 1, 1, 1), moved.flip(2 if horizontal else 1), moved)
    return out.view_as(x_TD)


def hflip(x_TD: torch.Tensor, layout: PackedLayout, apply_B: torch.Tensor):
    """``F.horizontal_flip``: tokens mirrored within each row of the image's patch grid, pixels within each
    token. Token order and patch_coord are unchanged (the content moves)."""
    return _flip(x_TD, layout, apply_B, horizontal=True)


def vflip(x_TD: torch.Tensor, layout: PackedLayout, apply_B: torch.Tensor):
    """``F.vertical_flip``: as ``hflip`` over the grid's rows."""
    return _flip(x_TD, layout, apply_B, horizontal=False)


# ------------------------------------------------------------------------------------------------ to float
def normalize_patches(patches: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., P*P*C] -> dtype ``(p / 255 - mean[c]) / std[c]``, channel = last index % C, computed as
    ``p * (1 / (255 std)) - mean / std``. ``mean``/``std`` are [C] on the same device. The step's last op on
    uint8: the model sees floats from here on."""
    num_c = mean.numel()
    shape = patches.shape
    x = patches.view(*shape[:-1], shape[-1] // num_c, num_c).to(torch.float32)
    scale = 1.0 / (255.0 * std)
    shift = mean / std
    return (x * scale - shift).to(dtype).view(shape)
