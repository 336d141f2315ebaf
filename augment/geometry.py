"""Sequence-length geometry: which patch grid an image gets for a token budget, and random-resized-crop params.

NaViT (arXiv:2307.06304) and SigLIP 2's NaFlex (arXiv:2502.14786) keep each image's native aspect ratio and
resize it so its patch grid fits a sequence length L. The rule here is the one timm 1.0.31 uses for NaFlex
(``get_image_size_for_seq``): the largest scale r (capped at 100) such that
``ceil(h*r/P) * ceil(w*r/P) <= L``, each side at least one patch; output size = grid * P.
timm finds r by a float binary search (``eps=1e-5``); we enumerate the finitely many grid breakpoints with
integer arithmetic, which finds the largest grid exactly. That is timm's grid except where its search stops
within eps below a breakpoint, about 1 in 10,000 random sizes (e.g. 1799x1724 at L=576, P=16: timm 24x23 =
552 patches, ours 25x23 = 575; tested).

``sample_rrc`` is timm's RandomResizedCropToSequence parameter sampling (area fraction ``scale``, aspect
*multiplier* ``ratio`` relative to the source aspect, log-uniform, 10 attempts, centre fallback), drawing
from an explicit ``random.Random`` so results depend only on the caller's seed.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence, Tuple

MAX_SCALE = 100  # timm's binary-search upper bound on the resize ratio


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _best_grid_at_breakpoints(a: int, b: int, pa: int, pb: int, max_seq_len: int) -> Tuple[int, int]:
    """Best grid fitting max_seq_len over the breakpoints r = ga*pa/a (axis a's grid exactly ga, the other
    max(1, ceil(b*r/pb)), r <= MAX_SCALE); the first to reach the maximum wins, (1, 1) if nothing beats it."""
    best, best_n = (1, 1), 1
    for ga in range(1, max_seq_len + 1):
        if ga * pa > MAX_SCALE * a:
            break
        gb = max(1, _ceil_div(b * ga * pa, a * pb))
        if ga * gb > max_seq_len:
            break
        if ga * gb > best_n:
            best, best_n = (ga, gb), ga * gb
    return best


def fit_grid_to_seq(h: int, w: int, patch_size: int | Tuple[int, int], max_seq_len: int) -> Tuple[int, int]:
    """Largest (grid_h, grid_w) for an h x w image, aspect kept, with grid_h * grid_w <= max_seq_len.

    timm's rule (``get_image_size_for_seq(...)[1] // patch``) solved exactly: the grid at the largest feasible
    ratio r <= 100, where at ratio r the grid is (max(1, ceil(h*r/ph)), max(1, ceil(w*r/pw))).
    The grid only changes where h*r/ph or w*r/pw crosses an integer, so the best r is one of those
    breakpoints (or the cap); we test each breakpoint exactly with integers.
    """
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    if h <= 0 or w <= 0 or max_seq_len <= 0:
        raise ValueError(f"bad size {h}x{w} or max_seq_len {max_seq_len}")
    # Breakpoints where the height grid is whole, then where the width grid is (ties: the height one).
    best = _best_grid_at_breakpoints(h, w, ph, pw, max_seq_len)
    gw, gh = _best_grid_at_breakpoints(w, h, pw, ph, max_seq_len)
    if gh * gw > best[0] * best[1]:
        best = (gh, gw)
    # The cap itself (r = 100) when every breakpoint below it fits.
    gh = max(1, _ceil_div(h * MAX_SCALE, ph))
    gw = max(1, _ceil_div(w * MAX_SCALE, pw))
    if gh * gw <= max_seq_len and gh * gw > best[0] * best[1]:
        best = (gh, gw)
    return best


@dataclass(frozen=True)
class CropParams:
    top: int
    left: int
    height: int
    width: int
    grid_h: int
    grid_w: int


def sample_rrc(
        h: int,
        w: int,
        rng: random.Random,
        *,
        patch_size: int,
        max_seq_len: int,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        attempts: int = 10,
) -> CropParams:
    """Random crop (area fraction in ``scale``, aspect = source aspect x factor log-uniform in ``ratio``),
    then the largest patch grid for the crop that fits ``max_seq_len``. timm's RandomResizedCropToSequence."""
    area = h * w
    src_aspect = w / h
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = src_aspect * math.exp(rng.uniform(log_lo, log_hi))
        ch = int(round(math.sqrt(target_area / aspect)))
        cw = int(round(math.sqrt(target_area * aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = rng.randint(0, h - ch)
            left = rng.randint(0, w - cw)
            break
    else:
        # Centre crop with the aspect clamped into the ratio range (a no-op clamp for a relative range
        # containing 1, kept for ranges that exclude it).
        lo_aspect, hi_aspect = src_aspect * ratio[0], src_aspect * ratio[1]
        if src_aspect < lo_aspect:
            cw, ch = w, min(int(round(w / lo_aspect)), h)
        elif src_aspect > hi_aspect:
            ch, cw = h, min(int(round(h * hi_aspect)), w)
        else:
            ch, cw = h, w
        ch, cw = max(1, ch), max(1, cw)
        top, left = (h - ch) // 2, (w - cw) // 2
    gh, gw = fit_grid_to_seq(ch, cw, patch_size, max_seq_len)
    return CropParams(top, left, ch, cw, gh, gw)
