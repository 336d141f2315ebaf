"""RandAugment's geometric ops (Rotate, ShearX/Y, TranslateX/Y and their relative forms) applied on the device to a
whole packed uint8 batch, with the pixels of the per-image CPU path.

Why: with augmentation on the device, loader workers only draw each image's op and its argument; the step then
resamples every image of the batch at once. Each output pixel finds its source position in its own image through the
image's affine map and gathers its interpolation taps from the packed tokens: one batched gather per tap, no Python
loop over images, no ``.item()``/``.tolist()``, no data-dependent shape or branch, no host tensor; the same code runs
on CPU and CUDA tensors (tests/test_device_geometry.py audits it on fake CUDA tensors).

Layout and conventions: those of augment.device_ops (``x_TD`` uint8 [T, P*P*3], ``PackedLayout``, per-image [B]
parameters, ``apply_B`` leaves the other images bit for bit unchanged). Per image: ``matrix_B6`` float64 [B, 6], the
map (a, b, c, d, e, f) from an output pixel centre (x + 0.5, y + 0.5) to the source position (a x + b y + c,
d x + e y + f), as Pillow's ``Image.transform(size, AFFINE, data)`` takes it; ``bicubic_B`` bool; ``fill_B3`` the
colour of output pixels whose source lies outside the image. The host helpers below give the matrix of each op from
its RandAugment argument exactly as the CPU op builds it (Python floats, so the same float64 numbers).

Semantics: the CPU path (augment.randaugment.OPS on PIL images) resamples with Pillow's ``ImagingGenericTransform``
(Geometry.c): Rotate is torchvision's ``F.rotate`` -> ``Image.rotate`` (centre (w/2, h/2), matrix entries
``round(cos/sin, 15)``, no expand), Shear is ``Image.transform(AFFINE, (1, f, 0, 0, 1, 0))`` about the top-left
corner, Translate is a whole-pixel shift (``int(round(dx))``, crop + paste), which is the identity matrix plus that
integer offset (a resample at whole-pixel offsets copies pixels exactly; ``whole_pixels=False`` gives timm's
sub-pixel translate instead: tests/test_device_geometry.py checks every op against timm's too). Pillow, per output
pixel and channel, in double precision:
- source position ``xs = (a * (x + .5) + b * (y + .5)) + c`` (``ys`` alike); outside ``0 <= xs < w, 0 <= ys < h``
  the pixel keeps the fill colour (``Image.transform`` starts from an image of ``fillcolor``);
- ``xs - 0.5 = x0 + dx`` with ``x0 = floor``; taps x0, x0 + 1 (bilinear) or x0 - 1 .. x0 + 2 (bicubic), indices
  clamped to the image (Pillow clamps columns and repeats the last valid row, which is the same);
- bilinear: ``v = a + (b - a) * d`` along each row, then down the column, truncated to uint8;
- bicubic: ``p1 = v2, p2 = v3 - v1, p3 = 2 (v1 - v2) + v3 - v4, p4 = v2 - v1 - v3 + v4``,
  ``v = p1 + d (p2 + d (p3 + d p4))`` along each row, then down the column, 0 if v <= 0, 255 if v >= 255, else
  truncated (Pillow's cubic with a = -1, no normalisation).
The same float64 operations run in the same order, so the output equals Pillow's bit for bit (tested on the CPU per
image; CUDA runs the same IEEE float64 element-wise ops one kernel each, so it is expected to be exact too, to be
confirmed on a GPU; a compiler that fuses ``a * b + c`` into one FMA could move a value across an integer: 1 level).

Cost: 16 taps (4 with ``filters=('bilinear',)``, a host setting) gathered per output pixel, float64 arithmetic on
[T, P, P, 3] values (the first pass's tap differences in exact int16), one row of taps held at a time, the four
interpolated rows kept for the second pass (docs/performance.md has time and memory). ``nearest`` is not supported
(Pillow's nearest affine path accumulates positions row by row).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

from .device_ops import C, PackedLayout

FILTERS = ('bilinear', 'bicubic')
Matrix = Tuple[float, float, float, float, float, float]


# ------------------------------------------------------------------------------------------- host side (worker)
def rotate_matrix(degrees: float, width: int, height: int) -> Matrix:
    """``Image.rotate(degrees)``'s map (counter-clockwise, about (w/2, h/2), no expand) as Pillow computes it.
    Pillow's transposes for multiples of 90 degrees give the same pixels as this matrix (tested)."""
    angle = -math.radians(degrees % 360.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = width / 2, height / 2
    return a, b, (a * -cx + b * -cy + 0.0) + cx, d, e, (d * -cx + e * -cy + 0.0) + cy


def shear_matrix(factor: float, axis: str) -> Matrix:
    """augment.randaugment.op_shear: about the top-left corner, x + factor * y (axis 'x') or y + factor * x."""
    if axis not in ('x', 'y'):
        raise ValueError(f"shear axis is 'x' or 'y', not {axis!r}")
    return (1.0, float(factor), 0.0, 0.0, 1.0, 0.0) if axis == 'x' else (1.0, 0.0, 0.0, float(factor), 1.0, 0.0)


def translate_matrix(dx: float, dy: float, whole_pixels: bool = True) -> Matrix:
    """augment.randaugment.op_translate on PIL images: output (x, y) shows input (x + round(dx), y + round(dy)).
    ``whole_pixels=False``: timm's translate, resampled at the sub-pixel offset with the op's filter."""
    if whole_pixels:
        dx, dy = int(round(dx)), int(round(dy))
    return 1.0, 0.0, float(dx), 0.0, 1.0, float(dy)


def op_matrix(name: str, arg: float, width: int, height: int, whole_pixels: bool = True) -> Matrix:
    """The matrix of RandAugment op ``name`` (augment.randaugment.OPS) with its drawn argument, for a width x height
    image. TranslateX/Y take pixels, TranslateX/YRel a fraction of the width/height; ``whole_pixels``: see
    ``translate_matrix``."""
    if name == 'Rotate':
        return rotate_matrix(arg, width, height)
    if name in ('ShearX', 'ShearY'):
        return shear_matrix(arg, name[-1].lower())
    shifts = {'TranslateX': (arg, 0.0), 'TranslateY': (0.0, arg),
              'TranslateXRel': (arg * width, 0.0), 'TranslateYRel': (0.0, arg * height)}
    if name not in shifts:
        raise ValueError(f"{name!r} is not a geometric op; supported: Rotate, ShearX, ShearY, {', '.join(shifts)}")
    return translate_matrix(*shifts[name], whole_pixels=whole_pixels)


def stack_affine(matrices: Sequence[Matrix | None], interpolations: Sequence[str],
                 fills: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host side (loader): per image a matrix (None: not applied), 'bilinear'/'bicubic' and the fill colour ->
    (apply_B bool, matrix_B6 float64, bicubic_B bool, fill_B3 uint8), CPU tensors to move with the batch."""
    for name in interpolations:
        if name not in FILTERS:
            raise ValueError(f'device geometric ops support {list(FILTERS)}, not {name!r}')
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    return (torch.tensor([m is not None for m in matrices], dtype=torch.bool),
            torch.tensor([list(identity if m is None else m) for m in matrices], dtype=torch.float64).view(-1, 6),
            torch.tensor([name == 'bicubic' for name in interpolations], dtype=torch.bool),
            torch.tensor([list(f) for f in fills], dtype=torch.uint8).view(-1, C))


# ------------------------------------------------------------------------------------------------- device side
def _lerp(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Geometry.c's BILINEAR, a + (b - a) * d, on int16 taps (the difference exact) or float64 rows."""
    return (b - a).to(d.dtype).mul_(d).add_(a)


def _cubic(v1, v2, v3, v4, d):
    """Geometry.c's BICUBIC on int16 taps or float64 rows: p2 = v3 - v1, p3 = 2 (v1 - v2) + v3 - v4,
    p4 = v2 - v1 - v3 + v4 (each step exact on integers, in C's order on doubles), then
    v2 + d (p2 + d (p3 + d p4)), computed in place (the same roundings: + and * commute exactly)."""
    p2 = v3 - v1
    p3 = (v1 - v2).mul_(2).add_(v3).sub_(v4)
    p4 = (v2 - v1).sub_(v3).add_(v4)
    return p4.to(d.dtype).mul_(d).add_(p3).mul_(d).add_(p2).mul_(d).add_(v2)


def affine(x_TD: torch.Tensor, layout: PackedLayout, apply_B: torch.Tensor, matrix_B6: torch.Tensor,
           bicubic_B: torch.Tensor, fill_B3: torch.Tensor, filters: Sequence[str] = FILTERS) -> torch.Tensor:
    """Every applied image resampled through its affine map with Pillow's arithmetic (module docstring).

    ``matrix_B6`` float64 [B, 6] (output pixel centre -> source position), ``bicubic_B`` bool [B], ``fill_B3``
    [B, 3] (uint8 levels). ``filters``: the filters the batch may use, a host setting (the RandAugment
    interpolation): with bilinear alone, 4 taps per pixel are read instead of 16."""
    cubic = 'bicubic' in filters
    if any(f not in FILTERS for f in filters) or not filters:
        raise ValueError(f'filters must be a non-empty subset of {FILTERS}, got {tuple(filters)}')
    P, T = layout.patch_size, x_TD.shape[0]
    f64 = torch.float64
    grid_T2 = layout.per_token(layout.grid_B2)
    gw_T = grid_T2[:, 1].view(-1, 1, 1)
    h_T, w_T = (grid_T2[:, 0] * P).view(-1, 1, 1), (gw_T * P)
    a = layout.per_token(matrix_B6.to(f64)).view(T, 6, 1, 1)
    p = torch.arange(P, device=x_TD.device)
    yin = ((layout.y_T.view(-1, 1, 1) * P + p.view(1, P, 1)).to(f64) + 0.5)  # [T, P, 1] output row centres
    xin = ((layout.x_T.view(-1, 1, 1) * P + p.view(1, 1, P)).to(f64) + 0.5)  # [T, 1, P] output column centres
    xs = (a[:, 0] * xin + a[:, 1] * yin) + a[:, 2]  # [T, P, P] source position, Pillow's affine_transform
    ys = (a[:, 3] * xin + a[:, 4] * yin) + a[:, 5]
    inside = (xs >= 0) & (xs < w_T.to(f64)) & (ys >= 0) & (ys < h_T.to(f64))
    xs, ys = torch.where(inside, xs, 0.5) - 0.5, torch.where(inside, ys, 0.5) - 0.5  # outside: any valid tap
    x0, y0 = xs.floor(), ys.floor()
    dx, dy = (xs - x0).unsqueeze(-1), (ys - y0).unsqueeze(-1)
    x0, y0 = x0.long(), y0.long()

    pixels = x_TD.view(-1, C)
    base_T = layout.per_token(layout.start_B).view(-1, 1, 1)
    offsets = range(-1, 3) if cubic else range(0, 2)
    cols = []
    for k in offsets:  # per column tap: its token column and the column inside the token
        c = (x0 + k).clamp(min=0).minimum(w_T - 1)
        cols.append((torch.div(c, P, rounding_mode='floor'), c % P))
    i = 1 if cubic else 0  # the bilinear taps x0, x0 + 1 (rows y0, y0 + 1) inside the bicubic window
    linear_rows, cubic_rows = [], []
    for j in offsets:  # per row: its taps gathered and interpolated along the row (only one row's taps held)
        r = (y0 + j).clamp(min=0).minimum(h_T - 1)
        row_token = base_T + torch.div(r, P, rounding_mode='floor') * gw_T
        row_pixel = (r % P) * P
        taps = [pixels.index_select(0, ((row_token + tc) * (P * P) + row_pixel + pc).view(-1)).view(T, P, P, C)
                .to(torch.int16) for tc, pc in cols]
        if j in (0, 1):
            linear_rows.append(_lerp(taps[i], taps[i + 1], dx))
        if cubic:
            cubic_rows.append(_cubic(*taps, dx))
        del taps
    out = _lerp(*linear_rows, dy).to(torch.uint8)  # in [0, 255]: a convex combination; truncates
    if cubic:
        bicubic = _cubic(*cubic_rows, dy).clamp_(0, 255).to(torch.uint8)  # v <= 0: 0, v >= 255: 255, else truncated
        out = torch.where(layout.per_token(bicubic_B).view(-1, 1, 1, 1), bicubic, out)
    fill = layout.per_token(fill_B3.to(torch.uint8)).view(-1, 1, 1, C)
    out = torch.where(inside.unsqueeze(-1), out, fill)
    old = x_TD.view(T, P, P, C)
    return torch.where(layout.per_token(apply_B).view(-1, 1, 1, 1), out, old).view_as(x_TD)
