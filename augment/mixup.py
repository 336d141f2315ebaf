"""MixUp / CutMix for a batch of images with different sizes (NaFlex training, SigLIP 2 arXiv:2502.14786;
images keep their native aspect ratio as in NaViT arXiv:2307.06304, so a batch cannot be stacked).

Images are paired with a neighbour of similar aspect ratio (sorted by w/h, then the order is shuffled inside
windows of ``local_shuffle`` so pairs change between steps), as timm 1.0.31's NaFlexMixup does; the draws come
from the caller's ``random.Random`` instead of the global RNGs. Each image of a pair is mixed with the other
one's pixels inside the centred overlap of the two (no resizing):

- MixUp: the overlap is blended ``lam * own + (1 - lam) * other``;
- CutMix: a random rectangle of ``sqrt(1 - lam)`` x the overlap's sides is pasted from the other image.

The soft target uses the *true* fraction of the image that comes from each source:
own weight = 1 - (1 - lam) * overlap_area / area (MixUp) or 1 - cut_area / area (CutMix), so targets sum to
1 and match the pixels (tested; CutMix exactly, MixUp up to uint8 quantisation of the blended values:
tensors round, Pillow's blend truncates, i.e. at most 1 grey level). Label smoothing uses timm's one-hot values
(off = s / C, on = 1 - s + s / C). With an odd batch size one image stays unmixed.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image

from .config import Problems, flag, is_prob, same_flag


@dataclass
class MixupConfig:
    num_classes: int
    mixup_alpha: float = flag('--mixup', default=0.8, cli_default=0.0, help='mixup alpha (0 = off)')
    cutmix_alpha: float = flag('--cutmix', default=1.0, cli_default=0.0, help='cutmix alpha (0 = off)')
    prob: float = flag('--mixup-prob', default=1.0, help='probability of mixup/cutmix per batch')
    switch_prob: float = flag('--mixup-switch-prob', default=0.5, help='cutmix instead of mixup probability')
    smoothing: float = same_flag('--smoothing', default=0.1)
    local_shuffle: int = 4
    off_epoch: int = flag('--mixup-off-epoch', default=0, help='turn mixup off from this epoch (0 = never)')

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def validate(self, name: Optional[Callable[[str], str]] = None) -> None:
        """Raise ValueError naming every bad value (``name`` maps field names to what the user typed)."""
        p = Problems(name)
        p.need(self.mixup_alpha >= 0, 'mixup_alpha', 'must be >= 0')
        p.need(self.cutmix_alpha >= 0, 'cutmix_alpha', 'must be >= 0')
        p.need(is_prob(self.prob), 'prob', f'must be a probability in [0, 1], got {self.prob}')
        p.need(is_prob(self.switch_prob), 'switch_prob', f'must be a probability in [0, 1], got {self.switch_prob}')
        p.need(0 <= self.smoothing < 1, 'smoothing', f'must be in [0, 1), got {self.smoothing}')
        p.need(self.off_epoch >= 0, 'off_epoch', 'must be >= 0 (0 = never off)')
        p.need(self.local_shuffle >= 1, 'local_shuffle', 'must be >= 1')
        p.raise_any()


def smooth_one_hot(targets: Sequence[int], num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """[B] class indices -> float32 [B, num_classes] (timm's off = s/C, on = 1 - s + s/C)."""
    t = torch.as_tensor(list(targets), dtype=torch.int64)
    off = smoothing / num_classes
    out = torch.full((t.numel(), num_classes), off, dtype=torch.float32)
    out.scatter_(1, t.view(-1, 1), 1.0 - smoothing + off)
    return out


def pair_by_aspect(sizes_hw: Sequence[Tuple[int, int]], rng: random.Random, local_shuffle: int = 4) -> List[int]:
    """Indices sorted by aspect (w/h), shuffled within windows; consecutive entries are partners."""
    order = sorted(range(len(sizes_hw)), key=lambda i: sizes_hw[i][1] / sizes_hw[i][0])
    if local_shuffle > 1:
        for start in range(0, len(order), local_shuffle):
            window = order[start:start + local_shuffle]
            rng.shuffle(window)
            order[start:start + local_shuffle] = window  # the slice is a copy: write it back
    return order


# Images are uint8 HWC tensors or RGB PIL images (the loader mixes PIL images: Pillow's 8-bit blend/paste
# are several times cheaper than float tensor arithmetic).

def _hw(x) -> Tuple[int, int]:
    return (x.height, x.width) if isinstance(x, Image.Image) else tuple(x.shape[:2])


def _region(x, top: int, left: int, h: int, w: int):
    if isinstance(x, Image.Image):
        return x.crop((left, top, left + w, top + h))
    return x[top:top + h, left:left + w].clone()


def _copy(x):
    return x.copy() if isinstance(x, Image.Image) else x.clone()


def _paste(dst, src, top: int, left: int) -> None:
    if isinstance(dst, Image.Image):
        dst.paste(src, (left, top))
    else:
        dst[top:top + src.shape[0], left:left + src.shape[1]] = src


def _blend(own, other, lam: float):
    """lam * own + (1 - lam) * other, rounded to uint8."""
    if isinstance(own, Image.Image):
        return Image.blend(other, own, lam)
    return torch.lerp(other.float(), own.float(), lam).add_(0.5).to(torch.uint8)  # +0.5: truncation rounds


@dataclass(frozen=True)
class MixDraw:
    """A step's MixUp/CutMix draws, made from the images' sizes alone: the mode, lambda, the pairs (partners of
    similar aspect) and, for CutMix, each image's cut (y, x, h, w) inside the pair's centred overlap. The one drawing
    code of the CPU path (``mix_variable_size``) and the device path."""
    cutmix: bool
    lam: float
    pairs: List[Tuple[int, int]]
    cuts: Dict[int, Tuple[int, int, int, int]]


def overlap(hw_a: Tuple[int, int], hw_b: Tuple[int, int]) -> Tuple[int, int, Tuple[int, int], Tuple[int, int]]:
    """The centred overlap of two images: (height, width, a's top-left corner, b's top-left corner)."""
    (ha, wa), (hb, wb) = hw_a, hw_b
    oh, ow = min(ha, hb), min(wa, wb)
    return oh, ow, ((ha - oh) // 2, (wa - ow) // 2), ((hb - oh) // 2, (wb - ow) // 2)


def draw_mix(sizes_hw: Sequence[Tuple[int, int]], cfg: MixupConfig, rng: random.Random,
             epoch: Optional[int] = None) -> Optional[MixDraw]:
    """The draws for images of these (h, w) sizes, or None when the step is not mixed."""
    n = len(sizes_hw)
    off = cfg.off_epoch and epoch is not None and epoch >= cfg.off_epoch
    if n < 2 or not cfg.active or off or rng.random() >= cfg.prob:
        return None
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        use_cutmix = rng.random() < cfg.switch_prob
    else:
        use_cutmix = cfg.cutmix_alpha > 0
    alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
    lam = min(1.0, max(0.0, rng.betavariate(alpha, alpha)))
    order = pair_by_aspect(sizes_hw, rng, cfg.local_shuffle)
    pairs = list(zip(order[0::2], order[1::2]))
    cuts = {}
    if use_cutmix:
        r = math.sqrt(1.0 - lam)
        for a, b in pairs:
            oh, ow, _, _ = overlap(sizes_hw[a], sizes_hw[b])
            ch, cw = int(oh * r), int(ow * r)
            for i in (a, b):
                cuts[i] = (rng.randint(0, oh - ch), rng.randint(0, ow - cw), ch, cw)
    return MixDraw(use_cutmix, lam, pairs, cuts)


def mix_weights(sizes_hw: Sequence[Tuple[int, int]],
                draw: Optional[MixDraw]) -> Tuple[List[float], List[Optional[int]]]:
    """(own weight, partner or None) per image: the true share of its pixels that stay its own."""
    n = len(sizes_hw)
    own, partner = [1.0] * n, [None] * n
    if draw is None:
        return own, partner
    for a, b in draw.pairs:
        oh, ow, _, _ = overlap(sizes_hw[a], sizes_hw[b])
        for i, j in ((a, b), (b, a)):
            hi, wi = sizes_hw[i]
            if draw.cutmix:
                _, _, ch, cw = draw.cuts[i]
                other_frac = (ch * cw) / float(hi * wi)
            else:
                other_frac = (1.0 - draw.lam) * (oh * ow) / float(hi * wi)
            own[i], partner[i] = 1.0 - other_frac, j
    return own, partner


def mix_targets(targets: Sequence[int], cfg: MixupConfig, own: Sequence[float],
                partner: Sequence[Optional[int]]) -> torch.Tensor:
    """Soft targets [B, C] float32: each image's smoothed one-hot blended with its partner's by the own weight."""
    base = smooth_one_hot(targets, cfg.num_classes, cfg.smoothing)
    soft = base.clone()
    for i, j in enumerate(partner):
        if j is not None:
            soft[i] = base[i] * own[i] + base[j] * (1.0 - own[i])
    return soft


def apply_mix(imgs: List, draw: Optional[MixDraw], inplace: bool = False) -> List:
    """The images mixed as ``draw`` says (uint8 HWC tensors or RGB PIL images; ``inplace`` overwrites them)."""
    if draw is None:
        return imgs
    sizes = [_hw(x) for x in imgs]
    out = list(imgs)
    for a, b in draw.pairs:
        oh, ow, corner_a, corner_b = overlap(sizes[a], sizes[b])
        corner = {a: corner_a, b: corner_b}
        # Everything one image gives the other lies in its centred overlap: keep the originals of those two
        # regions, then write each mixed image (in place when allowed, else into a copy).
        src = {k: _region(imgs[k], corner[k][0], corner[k][1], oh, ow) for k in (a, b)}
        for i, j in ((a, b), (b, a)):
            ti, li = corner[i]
            mixed = imgs[i] if inplace else _copy(imgs[i])
            if draw.cutmix:
                y, x, ch, cw = draw.cuts[i]
                _paste(mixed, _region(src[j], y, x, ch, cw), ti + y, li + x)
            else:
                _paste(mixed, _blend(src[i], src[j], draw.lam), ti, li)
            out[i] = mixed
    return out


def mix_variable_size(
        imgs: List,
        targets: Sequence[int],
        cfg: MixupConfig,
        rng: random.Random,
        inplace: bool = False,
        epoch: Optional[int] = None,
) -> Tuple[List, torch.Tensor, List[float], List[Optional[int]]]:
    """Mix a list of images of different sizes: uint8 HWC tensors or RGB PIL images (``inplace=True``
    overwrites the inputs).

    Returns (images, soft targets [B, C] float32, own-weight per image, partner index per image or None).
    """
    sizes = [_hw(x) for x in imgs]
    draw = draw_mix(sizes, cfg, rng, epoch)
    own, partner = mix_weights(sizes, draw)
    return apply_mix(imgs, draw, inplace), mix_targets(targets, cfg, own, partner), own, partner
