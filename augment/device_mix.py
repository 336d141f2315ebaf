"""MixUp / CutMix between images of different sizes, and random erasing, applied on the device to a whole packed
uint8 batch, with the pixels and soft targets of the per-image CPU path.

Why: with augmentation on the device, the loader only draws the batch's pairing, mode, lambda, boxes and erasing
rectangles; the step then mixes and erases every image at once. Each function is a fixed sequence of tensor ops for
a given batch: no Python loop over images, no ``.item()``/``.tolist()``, no data-dependent shape or branch, no host
tensor; the same code runs on CPU and CUDA tensors (tests/test_device_mix.py audits it on fake CUDA tensors).
Layout and conventions: those of augment.device_ops (``x_TD`` uint8 [T, P*P*3], ``PackedLayout``, per-image [B]
parameters; an image without a partner, or without boxes, comes out bit for bit unchanged).

MixUp / CutMix (augment.mixup.mix_variable_size, MixUp arXiv:1710.09412, CutMix arXiv:1905.04899): image i and its
partner j share their centred overlap (min of the heights x min of the widths, each image's corner at
((h - oh) // 2, (w - ow) // 2)); pixel (u, v) of the overlap of i takes pixel (u, v) of the overlap of j:
- MixUp: ``Image.blend(other, own, lam)`` as the CPU path runs it on PIL images (Blend.c): float32
  ``other + lam * (own - other)`` truncated (no rounding: Pillow truncates);
- CutMix: inside the image's drawn box (top, left, height, width in overlap pixels) the partner's pixel.
Both read the images as they were before mixing. The soft target is ``base[i] * own + base[j] * (1 - own)`` with
own = 1 - (1 - lam) * overlap_area / area (MixUp) or 1 - box_area / area (CutMix), in float64 as Python computes
it, then float32 as the CPU path's tensors multiply. Pixels and targets equal the CPU path's exactly (tested).

Random erasing (augment.erasing.RandomErasing, timm's RandomErasing semantics, arXiv:1708.04896): patch-aligned
rectangles on the uint8 image after mixing, later rectangles over earlier ones; the fill in normalised space maps
back to uint8 as ``round((mean + std * z) * 255)`` clipped (float32), z = 0 ('const'), one N(0, 1) colour per
rectangle ('rand') or N(0, 1) per pixel ('pixel'). The rectangles are the drawn ones, exactly; z comes from
torch's generator on the batch's device (one draw of fixed shape per batch), so its values cannot equal the CPU
path's but follow the same distribution (tested).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .config import ERASE_MODES
from .device_ops import C, PackedLayout

Box = Tuple[int, int, int, int]  # top, left, height, width


# ------------------------------------------------------------------------------------------- host side (loader)
def stack_mix(partners: Sequence[Optional[int]], cutmix: bool, lam: float,
              boxes: Sequence[Optional[Box]]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch's mixing draws (partner per image or None, the mode, lambda, each image's CutMix box inside the
    overlap or None) -> (partner_B int64, -1 = unmixed; cutmix_B bool; lam_B float64; box_B4 int64), CPU tensors
    to move with the batch."""
    n = len(partners)
    return (torch.tensor([-1 if p is None else p for p in partners], dtype=torch.int64),
            torch.full((n,), bool(cutmix), dtype=torch.bool),
            torch.full((n,), float(lam), dtype=torch.float64),
            torch.tensor([list(b) if b is not None else [0, 0, 0, 0] for b in boxes], dtype=torch.int64).view(n, 4))


def stack_erase_boxes(boxes: Sequence[Sequence[Box]], max_count: int) -> torch.Tensor:
    """Per image its erased rectangles in patches, in drawing order (at most ``max_count``, the --recount setting, so
    the shape is the same for every batch) -> int64 [B, max_count, 4], unused slots of height 0."""
    out = torch.zeros(len(boxes), max_count, 4, dtype=torch.int64)
    for i, image_boxes in enumerate(boxes):
        if len(image_boxes) > max_count:
            raise ValueError(f'image {i} has {len(image_boxes)} erasing rectangles, more than max_count={max_count}')
        for k, box in enumerate(image_boxes):
            out[i, k] = torch.tensor(list(box))
    return out


# ------------------------------------------------------------------------------------------------- MixUp / CutMix
def _overlap(layout: PackedLayout, partner_B: torch.Tensor):
    """Per image: its size (h, w) in pixels, its partner's, the overlap's and its corner in the image (int64 [B])."""
    P = layout.patch_size
    hw_B2 = layout.grid_B2 * P
    other_B2 = hw_B2.index_select(0, partner_B.clamp(min=0))
    overlap_B2 = torch.minimum(hw_B2, other_B2)
    return hw_B2, other_B2, overlap_B2, torch.div(hw_B2 - overlap_B2, 2, rounding_mode='floor')


def own_fraction(layout: PackedLayout, partner_B: torch.Tensor, cutmix_B: torch.Tensor, lam_B: torch.Tensor,
                 box_B4: torch.Tensor) -> torch.Tensor:
    """float64 [B]: the part of each image that is its own after mixing (1 for unmixed images), as
    mix_variable_size computes it in Python floats."""
    hw_B2, _, overlap_B2, _ = _overlap(layout, partner_B)
    area = (hw_B2[:, 0] * hw_B2[:, 1]).to(torch.float64)
    box_area = (box_B4[:, 2] * box_B4[:, 3]).to(torch.float64)
    overlap_area = (overlap_B2[:, 0] * overlap_B2[:, 1]).to(torch.float64)
    lam = lam_B.to(torch.float64)
    other = torch.where(cutmix_B, box_area / area, ((1.0 - lam) * overlap_area) / area)
    return torch.where(partner_B >= 0, 1.0 - other, 1.0)


def mix_targets(base_BC: torch.Tensor, layout: PackedLayout, partner_B: torch.Tensor, cutmix_B: torch.Tensor,
                lam_B: torch.Tensor, box_B4: torch.Tensor) -> torch.Tensor:
    """Soft targets [B, num_classes] float32 from the (smoothed one-hot) ``base_BC``: base[i] * own + base[j] *
    (1 - own), the weights rounded to float32 as a float32 tensor times a Python float is computed."""
    own = own_fraction(layout, partner_B, cutmix_B, lam_B, box_B4)
    partner_base = base_BC.index_select(0, partner_B.clamp(min=0))
    mixed = base_BC * own.to(torch.float32).unsqueeze(1) + partner_base * (1.0 - own).to(torch.float32).unsqueeze(1)
    return torch.where((partner_B >= 0).unsqueeze(1), mixed, base_BC)


def mix(x_TD: torch.Tensor, layout: PackedLayout, partner_B: torch.Tensor, cutmix_B: torch.Tensor,
        lam_B: torch.Tensor, box_B4: torch.Tensor) -> torch.Tensor:
    """Every image with a partner (``partner_B`` >= 0) mixed with it: MixUp blend of the centred overlap with
    weight ``lam_B`` (float64, used as float32 as Pillow does) on the own image, or the CutMix box ``box_B4`` (top,
    left, height, width inside the overlap) taken from the partner (module docstring)."""
    P, T = layout.patch_size, x_TD.shape[0]
    _, partner_hw_B2, overlap_B2, corner_B2 = _overlap(layout, partner_B)
    partner = partner_B.clamp(min=0)
    partner_corner_B2 = corner_B2.index_select(0, partner)

    def tok(v_B):  # [B] -> [T, 1, 1]
        return layout.per_token(v_B).view(-1, 1, 1)

    p = torch.arange(P, device=x_TD.device)
    u = layout.y_T.view(-1, 1, 1) * P + p.view(1, P, 1) - tok(corner_B2[:, 0])  # [T, P, 1] row in the overlap
    v = layout.x_T.view(-1, 1, 1) * P + p.view(1, 1, P) - tok(corner_B2[:, 1])  # [T, 1, P] column in the overlap
    in_overlap = (u >= 0) & (u < tok(overlap_B2[:, 0])) & (v >= 0) & (v < tok(overlap_B2[:, 1]))
    box = layout.per_token(box_B4).view(-1, 4, 1, 1)
    in_box = (u >= box[:, 0]) & (u < box[:, 0] + box[:, 2]) & (v >= box[:, 1]) & (v < box[:, 1] + box[:, 3])
    taken = in_overlap & torch.where(tok(cutmix_B), in_box, True) & tok(partner_B >= 0)

    # the partner's pixel at the same overlap position (clamped into its image where nothing is taken)
    sy = (u + tok(partner_corner_B2[:, 0])).clamp(min=0).minimum(tok(partner_hw_B2[:, 0]) - 1)
    sx = (v + tok(partner_corner_B2[:, 1])).clamp(min=0).minimum(tok(partner_hw_B2[:, 1]) - 1)
    gw = tok(layout.grid_B2.index_select(0, partner)[:, 1])
    token = tok(layout.start_B.index_select(0, partner)) + torch.div(sy, P, rounding_mode='floor') * gw + \
        torch.div(sx, P, rounding_mode='floor')
    index = (token * P + sy % P) * P + sx % P
    other = x_TD.view(-1, C).index_select(0, index.view(-1)).view(T, P, P, C)

    own = x_TD.view(T, P, P, C)
    lam = layout.per_token(lam_B.to(torch.float32)).view(-1, 1, 1, 1)
    of = other.to(torch.float32)
    blended = (of + lam * (own.to(torch.float32) - of)).to(torch.uint8)  # Blend.c, alpha in [0, 1]: truncates
    new = torch.where(tok(cutmix_B).unsqueeze(-1), other, blended)
    return torch.where(taken.unsqueeze(-1), new, own).view_as(x_TD)


# --------------------------------------------------------------------------------------------------- erasing

def _to_levels(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """augment.erasing's fill: round((mean + std * z) * 255) clipped to uint8, in float32 (z [..., C])."""
    v = (mean.to(torch.float32) + std.to(torch.float32) * z) * 255.0
    return v.round_().clamp_(0, 255).to(torch.uint8)


def erase(x_TD: torch.Tensor, layout: PackedLayout, box_BK4: torch.Tensor, mode: str, mean: torch.Tensor,
          std: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random erasing of the drawn rectangles ``box_BK4`` (int64 [B, K, 4]: top, left, height, width in patches;
    height 0 = no rectangle; K is the --recount setting) with the ``mode``'s fill (a host setting: 'pixel', 'rand',
    'const'); ``mean``/``std`` [C] on the device; normal values from ``generator`` (on the batch's device; None:
    torch's default one). Tokens inside a rectangle are replaced whole: the rectangles lie on the patch grid."""
    if mode not in ERASE_MODES:
        raise ValueError(f"remode must be one of {'|'.join(ERASE_MODES)}, got {mode!r}")
    T, K = x_TD.shape[0], box_BK4.shape[1]
    box = layout.per_token(box_BK4)  # [T, K, 4]
    y, x = layout.y_T.view(-1, 1), layout.x_T.view(-1, 1)
    covered = ((y >= box[..., 0]) & (y < box[..., 0] + box[..., 2]) &
               (x >= box[..., 1]) & (x < box[..., 1] + box[..., 3]))  # [T, K]
    erased = covered.any(1)
    if mode == 'pixel':
        z = torch.randn(T, x_TD.shape[1] // C, C, generator=generator, device=x_TD.device)
        fill = _to_levels(z, mean, std).view_as(x_TD)
    else:
        if mode == 'rand':  # one colour per rectangle; a token shows the last rectangle that covers it
            z = torch.randn(layout.num_images, K, C, generator=generator, device=x_TD.device)
            last = (covered * torch.arange(1, K + 1, device=x_TD.device)).amax(1).clamp(min=1) - 1  # [T]
            z = z.view(-1, C).index_select(0, layout.seg_T * K + last)
        else:
            z = torch.zeros(1, C, device=x_TD.device)
        fill = _to_levels(z, mean, std).repeat(1, x_TD.shape[1] // C)
    return torch.where(erased.unsqueeze(1), fill, x_TD)
