"""Random erasing for NaFlex training, with the semantics of timm's NaFlex ``PatchRandomErasing`` ('region'
mode): rectangles aligned to the patch grid, on uint8 HWC images in the worker.

In the NaFlex pipeline (NaViT arXiv:2307.06304, SigLIP 2 arXiv:2502.14786) tokens stay uint8 until the GPU,
so erasing runs on the uint8 image before patchify (timm erases normalised patches in its GPU prefetcher).
Per image, with probability ``prob``: ``count`` = randint(1, recount) rectangles; each one covers an area
fraction uniform in [0.02, 1/3] of the patch grid with log-uniform aspect in [0.3, 1/0.3] (10 attempts, a
rectangle must fit in the grid). Fill, as timm's modes in normalised space: 'const' = 0 (the mean colour),
'rand' = one N(0, 1) colour per rectangle, 'pixel' = N(0, 1) per pixel, mapped back to uint8 through the
model's mean/std (``255 * (mean + std * z)``, rounded and clipped to [0, 255]: the normal's tails beyond the
pixel range are truncated — the one difference from timm).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .config import ERASE_MODES, NORM_MEAN, NORM_STD


@dataclass(frozen=True)
class ErasingDraw:
    """One image's erasing: rectangles (top, left, height, width) in patches, and the seed of the fill values."""
    boxes: List[Tuple[int, int, int, int]]
    seed: int


class RandomErasing:
    def __init__(self, prob: float = 0.25, mode: str = 'pixel', max_count: int = 1, *,
                 mean: Sequence[float] = NORM_MEAN, std: Sequence[float] = NORM_STD,
                 min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3):
        if mode not in ERASE_MODES:
            raise ValueError(f"remode must be one of {'|'.join(ERASE_MODES)}, got {mode!r}")
        self.prob, self.mode, self.max_count = prob, mode, max(1, int(max_count))
        self.mean = torch.tensor([float(m) for m in mean])
        self.std = torch.tensor([float(s) for s in std])
        self.min_area, self.max_area = min_area, max_area
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _fill(self, shape, gen: torch.Generator) -> torch.Tensor:
        h, w, c = shape
        if self.mode == 'const':
            z = torch.zeros(1, 1, c)
        elif self.mode == 'rand':
            z = torch.randn(1, 1, c, generator=gen)
        else:
            z = torch.randn(h, w, c, generator=gen)
        v = (self.mean + self.std * z) * 255.0
        return v.round_().clamp_(0, 255).to(torch.uint8).expand(h, w, c)

    def draw(self, rng: random.Random, grid_h: int, grid_w: int) -> Optional[ErasingDraw]:
        """The rectangles (in patches) one image of ``grid_h`` x ``grid_w`` patches gets, or None: the one drawing
        code of the CPU path (``__call__``) and the device path."""
        if self.prob <= 0 or rng.random() >= self.prob:
            return None
        if grid_h == 0 or grid_w == 0:
            return None
        total = grid_h * grid_w
        count = rng.randint(1, self.max_count)
        seed = rng.getrandbits(62)
        boxes = []
        for _ in range(count):
            for _attempt in range(10):
                target = rng.uniform(self.min_area, self.max_area) * total
                aspect = math.exp(rng.uniform(*self.log_aspect))
                h = int(round(math.sqrt(target * aspect)))
                w = int(round(math.sqrt(target / aspect)))
                if not (0 < h <= grid_h and 0 < w <= grid_w):
                    continue
                boxes.append((rng.randint(0, grid_h - h), rng.randint(0, grid_w - w), h, w))
                break
        return ErasingDraw(boxes, seed)

    def apply(self, img_HWC: torch.Tensor, draw: Optional[ErasingDraw], patch_size: int = 1) -> torch.Tensor:
        """Erase ``draw``'s rectangles in place (and return ``img_HWC``), fill values from its seed."""
        if draw is None:
            return img_HWC
        P, c = patch_size, img_HWC.shape[2]
        gen = torch.Generator().manual_seed(draw.seed)
        for top, left, h, w in draw.boxes:
            y0, x0 = top * P, left * P
            img_HWC[y0:y0 + h * P, x0:x0 + w * P] = self._fill((h * P, w * P, c), gen)
        return img_HWC

    def __call__(self, img_HWC: torch.Tensor, rng: random.Random, patch_size: int = 1) -> torch.Tensor:
        """Erase in place (and return) ``img_HWC`` uint8 [H, W, 3]; rectangles on the ``patch_size`` grid."""
        H, W, _ = img_HWC.shape
        return self.apply(img_HWC, self.draw(rng, H // patch_size, W // patch_size), patch_size)
