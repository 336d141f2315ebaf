"""Crop + resize of decoded source images straight into the packed token layout, on the device, with Pillow's
pixels: stage A of the device-side augmentation path (the photometric ops of augment.device_ops follow it).

Why: with augmentation on the device, loader workers only decode (JPEG draft included) and draw each image's crop
box, output grid, interpolation and flip; the step then resamples every image of the batch at once. The code is a
fixed sequence of tensor ops for a given tap count ``taps`` (a host setting): no Python loop over images, no
``.item()``/``.tolist()``, no data-dependent shape or branch, no host tensor; the same code runs on CPU and CUDA
tensors (tests/test_device_resize.py audits it on fake CUDA tensors).

Semantics: ``img.resize((gw * P, gh * P), resample, box=(left, top, left + width, top + height))`` of Pillow
(Resample.c, ImagingResample for 8-bit images), then ``transpose(FLIP_LEFT_RIGHT)`` where the flip is set, what
loaders.decode.decode_resized and the flip of augment.policy give on the CPU:
- the box reaches C as float32 (``PyArg_ParseTuple`` "(ffff)"); per axis ``scale = (double)(in1 - in0) / out``
  (the difference taken in float32), ``filterscale = max(scale, 1)``, ``support = filter support * filterscale``
  (antialiasing: the filter is stretched by the downscale factor);
- output sample ``o``: ``center = in0 + (o + 0.5) * scale``, taps ``xmin = (int)(center - support + 0.5)``
  clipped to >= 0 up to ``(int)(center + support + 0.5)`` clipped to the source size, weight
  ``filter((x + xmin - center + 0.5) / filterscale)`` (bilinear: triangle of support 1; bicubic: Keys' cubic with
  a = -0.5, support 2), summed in tap order and normalised by that sum (``precompute_coeffs``);
- weights to fixed point with 22 fraction bits, ``(int)(w * 2**22 +- 0.5)`` (``normalize_coeffs_8bpc``);
- two separable passes, each value ``2**21 + sum(pixel * weight)`` in int32, shifted right by 22 and clipped to
  [0, 255] (``clip8``), the second pass reading the first pass's rounded 8-bit values (Pillow's ``imTemp``).
  Resample.c on Pillow's main branch (2026-08) always passes horizontally first; the Pillow 13.0 release (the
  tested one) passes vertically first when the output is shorter than the source image and ``2 * (out_w -
  src_w) > out_h - src_h`` (sizes of the whole source image, not the box). Measured against it on ~1,400 random
  boxes, sizes and filters and on full grids of output sizes: every case matches exactly one order, and this rule
  picks it (tests/test_device_resize.py fails if the order is wrong).
  Pillow skips a pass whose box and size leave the axis unchanged; the tables then hold the single weight 1.0 at
  each pixel, so the pass is the identity here too.
Every step is repeated in the same float64 / int32 arithmetic, so the output is Pillow's bit for bit.

Taps: every output value reads ``taps`` x ``taps`` source pixels (zero weights pad a shorter window). A window
spans fewer than ``2 * support + 1`` positions, so ``taps_for(downscale)`` = ceil(2 * filter support * max(1,
downscale)) covers every image whose crop is at most ``downscale`` times its output on either axis: bicubic 8 taps
at 2x, bilinear 4. With JPEG draft the workers decode to the smallest DCT scale that keeps the crop >= its output,
so the remaining downscale is below 2 for JPEGs the draft can reduce enough (the loader picks the setting, e.g.
``taps_for(2.0)`` = 8, plus margin for the aspect rounding of the grid; ``downscale`` of each image is a host
number the worker has). Beyond the limit, the window is cut to its central ``taps`` positions and renormalised
over them: a slightly narrower antialiasing filter, never an error or a sync (the worker can avoid it by reducing
the source first, e.g. ``Image.reduce``). The work is ``taps**2`` gathers per output value: the separable passes
are not shared between neighbouring output rows (that needs a per-image intermediate whose size depends on the
crops), which keeps every shape a function of the output token count alone.

Inputs: ``src`` uint8, the decoded RGB images back to back in HWC order (any shape, read as [N, 3] pixels); per
image (tensors [B] on the device) the first pixel ``offset``, the source ``height``/``width``, the ``box`` float64
[B, 4] (top, left, height, width in source pixels, fractional after a draft decode), the grid int64 [B, 2] (h, w),
``bicubic`` and ``flip`` bool; host ints ``patch_size``, ``num_tokens`` (the sum of the grids' areas: the output's
shape) and ``taps``. ``stack_resize_params`` builds them on the host from the worker's numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

C = 3
PRECISION_BITS = 22  # Resample.c: 32 - 8 - 2 for 8-bit images
SUPPORT = {'bilinear': 1.0, 'bicubic': 2.0}  # Resample.c's filters' support


def downscale(box_hw: Tuple[float, float], out_hw: Tuple[int, int]) -> float:
    """Host side: how many source pixels one output pixel spans on the more reduced axis."""
    return max(box_hw[0] / out_hw[0], box_hw[1] / out_hw[1])


def taps_for(max_downscale: float, interpolation: str = 'bicubic') -> int:
    """Host side: the tap count that reproduces Pillow exactly for every image reduced at most ``max_downscale``
    times (xmin > center - support - 0.5 and xmax <= center + support + 0.5, so a window is shorter than
    2 * support + 1)."""
    return max(1, math.ceil(2 * SUPPORT[interpolation] * max(1.0, max_downscale)))


@dataclass
class ResizeParams:
    """Per-image tensors of one batch (CPU from ``stack_resize_params``; ``to`` moves them with the batch) and the
    host ints the output's shape needs."""
    offset_B: torch.Tensor   # int64: first pixel of the image in the source buffer
    height_B: torch.Tensor   # int64: source height
    width_B: torch.Tensor    # int64: source width
    box_B4: torch.Tensor     # float64: top, left, height, width of the crop, in source pixels
    grid_B2: torch.Tensor    # int64: output patch grid (h, w)
    bicubic_B: torch.Tensor  # bool: bicubic, else bilinear
    flip_B: torch.Tensor     # bool: horizontal flip after the resize
    patch_size: int
    num_tokens: int
    max_seqlen: int

    def to(self, device, non_blocking: bool = False) -> 'ResizeParams':
        moved = {k: getattr(self, k).to(device, non_blocking=non_blocking)
                 for k in ('offset_B', 'height_B', 'width_B', 'box_B4', 'grid_B2', 'bicubic_B', 'flip_B')}
        return ResizeParams(**moved, patch_size=self.patch_size, num_tokens=self.num_tokens,
                            max_seqlen=self.max_seqlen)


def stack_resize_params(shapes: Sequence[Tuple[int, int]], boxes: Sequence[Tuple[float, float, float, float]],
                        grids: Sequence[Tuple[int, int]], interpolations: Sequence[str], flips: Sequence[bool],
                        patch_size: int) -> ResizeParams:
    """Host side (loader): the images' source (h, w) in buffer order, crop boxes (top, left, height, width), grids
    (h, w), 'bilinear'/'bicubic' and flips -> ResizeParams with CPU tensors. The images lie back to back in the
    source buffer, so each offset is the sum of the areas before it."""
    offsets, total = [], 0
    for h, w in shapes:
        offsets.append(total)
        total += h * w
    for name in interpolations:
        if name not in SUPPORT:
            raise ValueError(f'device resize supports {sorted(SUPPORT)}, not {name!r}')
    lens = [gh * gw for gh, gw in grids]
    return ResizeParams(
        offset_B=torch.tensor(offsets, dtype=torch.int64),
        height_B=torch.tensor([h for h, _ in shapes], dtype=torch.int64),
        width_B=torch.tensor([w for _, w in shapes], dtype=torch.int64),
        box_B4=torch.tensor([list(map(float, b)) for b in boxes], dtype=torch.float64).view(-1, 4),
        grid_B2=torch.tensor(list(grids), dtype=torch.int64).view(-1, 2),
        bicubic_B=torch.tensor([name == 'bicubic' for name in interpolations], dtype=torch.bool),
        flip_B=torch.tensor(list(flips), dtype=torch.bool),
        patch_size=patch_size, num_tokens=sum(lens), max_seqlen=max(lens, default=0))


def _filter(arg: torch.Tensor, bicubic: torch.Tensor) -> torch.Tensor:
    """Resample.c's bilinear_filter / bicubic_filter (a = -0.5) in float64, C's evaluation order."""
    a = arg.abs()
    linear = torch.where(a < 1.0, 1.0 - a, 0.0)
    near = ((1.5 * a - 2.5) * a) * a + 1.0
    far = ((((a - 5.0) * a) + 8.0) * a - 4.0) * -0.5
    cubic = torch.where(a < 1.0, near, torch.where(a < 2.0, far, 0.0))
    return torch.where(bicubic, cubic, linear)


def _coefficients(in0: torch.Tensor, length: torch.Tensor, in_size: torch.Tensor, out_size: torch.Tensor,
                  out_pos: torch.Tensor, bicubic: torch.Tensor, taps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for the output samples ``out_pos`` (int64 [T, P]) of
    one axis; per-token [T, 1] box start (float64), box length, source and output sizes, filter choice. Returns
    the first tap int64 [T, P] and the fixed-point weights int32 [T, P, taps] (zero past the window)."""
    f32, f64 = torch.float32, torch.float64
    box0 = in0.to(f32)
    box1 = (in0 + length).to(f32)  # Python adds in double; PIL's "(ffff)" makes each coordinate a float32
    scale = (box1 - box0).to(f64) / out_size.to(f64)
    filterscale = scale.clamp(min=1.0)
    support = torch.where(bicubic, 2.0, 1.0) * filterscale
    center = box0.to(f64) + (out_pos.to(f64) + 0.5) * scale
    ss = torch.ones((), dtype=f64, device=scale.device) / filterscale  # a true division, as C divides
    xmin = (center - support + 0.5).trunc().clamp(min=0).to(torch.int64)
    xmax = torch.minimum((center + support + 0.5).trunc().to(torch.int64), in_size) - xmin
    over = (xmax - taps).clamp(min=0)  # beyond the tap limit: keep the central window (module docstring)
    xmin, xmax = xmin + over // 2, xmax - over
    x = torch.arange(taps, device=center.device)
    arg = (((x + xmin.unsqueeze(-1)).to(f64) - center.unsqueeze(-1)) + 0.5) * ss.unsqueeze(-1)
    w = torch.where(x < xmax.unsqueeze(-1), _filter(arg, bicubic.unsqueeze(-1)), 0.0)
    ww = w[..., 0]
    for k in range(1, taps):  # summed in tap order, as precompute_coeffs does (zeros past the window add nothing)
        ww = ww + w[..., k]
    w = torch.where((ww != 0).unsqueeze(-1), w / ww.unsqueeze(-1), w)
    fixed = w * float(1 << PRECISION_BITS)
    fixed = torch.where(w < 0, fixed - 0.5, fixed + 0.5).trunc().to(torch.int32)
    return xmin, fixed


def packed_layout(grid_B2: torch.Tensor, num_tokens: int) -> Dict[str, torch.Tensor]:
    """loaders.packing.pack's metadata computed on the device from the grids: cu_seqlens, seq_lens, grid_sizes,
    patch_coord (int32, row-major over each grid), and the per-token image index ``seg_T`` (int64)."""
    grid = grid_B2.long()
    seq = grid[:, 0] * grid[:, 1]
    cu = torch.cat([torch.zeros(1, dtype=torch.int64, device=grid.device), seq.cumsum(0)])
    tokens = torch.arange(num_tokens, device=grid.device)
    seg = torch.searchsorted(cu[1:], tokens, right=True)  # image i holds tokens cu[i] <= t < cu[i + 1]
    within = tokens - cu.index_select(0, seg)
    gw = grid[:, 1].index_select(0, seg)
    y = torch.div(within, gw, rounding_mode='floor')
    coord = torch.stack([y, within - y * gw], dim=1).to(torch.int32)
    return {'patch_coord': coord, 'seq_lens': seq.to(torch.int32), 'cu_seqlens': cu.to(torch.int32),
            'grid_sizes': grid.to(torch.int32), 'seg_T': seg}


def resize_to_packed(src: torch.Tensor, params: ResizeParams, taps: int,
                     layout: Optional[Dict[str, torch.Tensor]] = None) -> Dict:
    """The packed batch (loaders.packing.pack's dict: patches uint8 [T, P*P*3] P-P-C, patch_coord, seq_lens,
    cu_seqlens, grid_sizes, max_seqlen, patch_size) of every image's crop resized to its grid with Pillow's
    resampling (module docstring), flipped where ``flip_B`` is set. ``taps``: see ``taps_for``."""
    P, T = params.patch_size, params.num_tokens
    if layout is None:
        layout = packed_layout(params.grid_B2, T)
    seg = layout['seg_T']
    coord = layout['patch_coord'].long()
    p = torch.arange(P, device=seg.device)

    def per_token(v_B):  # [B] -> [T, 1]
        return v_B.index_select(0, seg).unsqueeze(1)

    grid_T = params.grid_B2.long().index_select(0, seg)
    bicubic, flip = per_token(params.bicubic_B), per_token(params.flip_B)
    height, width = per_token(params.height_B.long()), per_token(params.width_B.long())
    box = params.box_B4.to(torch.float64).index_select(0, seg)
    oy = coord[:, :1] * P + p  # [T, P] output rows of each token
    ox = coord[:, 1:] * P + p  # [T, P] output columns; a flipped image reads the mirrored column
    out_w = grid_T[:, 1:] * P
    ox = torch.where(flip, out_w - 1 - ox, ox)
    ymin, wy = _coefficients(box[:, :1], box[:, 2:3], height, grid_T[:, :1] * P, oy, bicubic, taps)
    xmin, wx = _coefficients(box[:, 1:2], box[:, 3:4], width, out_w, ox, bicubic, taps)

    pixels = src.reshape(-1, C)
    base = per_token(params.offset_B.long()).unsqueeze(2)
    # Pillow 13.0 passes vertically first when the output is shorter than the source and 2 (out_w - src_w) >
    # out_h - src_h (the module docstring); per image, so each tap pair picks its source pixel per token.
    out_h = grid_T[:, :1] * P
    vfirst = ((out_h < height) & (2 * (out_w - width) > out_h - height)).unsqueeze(2)  # [T, 1, 1]
    rows = [(base + torch.minimum(ymin + j, height - 1).unsqueeze(2) * width.unsqueeze(2)) for j in range(taps)]
    cols = [torch.minimum(xmin + k, width - 1).unsqueeze(1) for k in range(taps)]  # padded taps clamp inside
    half = 1 << (PRECISION_BITS - 1)
    acc_2 = torch.full((T, P, P, C), half, dtype=torch.int32, device=seg.device)
    for o in range(taps):  # the second pass's taps: each is one first pass, rounded to 8 bits as Pillow's imTemp
        acc_1 = torch.full((T, P, P, C), half, dtype=torch.int32, device=seg.device)
        for i in range(taps):
            index = torch.where(vfirst, rows[i] + cols[o], rows[o] + cols[i])  # [T, P, P]
            value = pixels.index_select(0, index.view(-1)).view(T, P, P, C)
            weight = torch.where(vfirst, wy[:, :, None, i], wx[:, None, :, i])
            acc_1 += value.to(torch.int32) * weight.unsqueeze(-1)
        weight = torch.where(vfirst, wx[:, None, :, o], wy[:, :, None, o])
        acc_2 += (acc_1 >> PRECISION_BITS).clamp_(0, 255) * weight.unsqueeze(-1)
    patches = (acc_2 >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8).view(T, P * P * C)
    out = {k: v for k, v in layout.items() if k != 'seg_T'}
    out.update(patches=patches, max_seqlen=params.max_seqlen, patch_size=P)
    return out
