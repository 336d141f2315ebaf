"""Random erasing (Zhong et al. 2017, as in timm's RandomErasing) on uint8 HWC images, per image.

In the NaFlex pipeline (NaViT arXiv:2307.06304, SigLIP 2 arXiv:2502.14786) tokens stay uint8 until the GPU,
so erasing runs in the worker on the uint8 image before patchify. timm erases normalized float pixels with
0 ('const'), a per-channel N(0,1) colour ('rand') or per-pixel N(0,1) noise ('pixel'); here the same values
are mapped back through the model's mean/std to uint8 (``255 * (mean + std * z)``, rounded and clipped to
[0, 255], which truncates the normal tails beyond (0 - mean)/std and (1 - mean)/std). Rectangle sampling is
timm's: count in [1, recount], area fraction 0.02..1/3 of the image split over the count, log-uniform
aspect 0.3..1/0.3, 10 attempts per rectangle.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

import torch


class RandomErasing:
    def __init__(self, prob: float = 0.25, mode: str = 'pixel', max_count: int = 1, *,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3):
        if mode not in ('pixel', 'rand', 'const'):
            raise ValueError(f"remode must be pixel|rand|const, got {mode!r}")
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

    def __call__(self, img_HWC: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """Erase in place (and return) ``img_HWC`` uint8 [H, W, 3]."""
        if self.prob <= 0 or rng.random() >= self.prob:
            return img_HWC
        h, w, c = img_HWC.shape
        area = h * w
        count = 1 if self.max_count == 1 else rng.randint(1, self.max_count)
        gen = torch.Generator().manual_seed(rng.getrandbits(62))
        for _ in range(count):
            for _attempt in range(10):
                target = rng.uniform(self.min_area, self.max_area) * area / count
                aspect = math.exp(rng.uniform(*self.log_aspect))
                eh = int(round(math.sqrt(target * aspect)))
                ew = int(round(math.sqrt(target / aspect)))
                if 0 < eh < h and 0 < ew < w:
                    top = rng.randint(0, h - eh)
                    left = rng.randint(0, w - ew)
                    img_HWC[top:top + eh, left:left + ew] = self._fill((eh, ew, c), gen)
                    break
        return img_HWC
