"""Colour jitter, random grayscale and Gaussian blur for the NaFlex training transform (per image, explicit RNG).

timm's rule (transforms_factory): colour jitter is used only when no RandAugment/AutoAugment policy is set
(``--color-jitter``, scalar s -> brightness/contrast/saturation factors uniform in [max(0, 1-s), 1+s], hue
optional, applied in a random order like torchvision's ColorJitter); ``--grayscale-prob`` converts to
3-channel grey. Both are ``torchvision.transforms.v2.functional`` calls, so they run on PIL images (CPU
workers) or uint8 tensors. Used by the SigLIP 2 / NaFlex (arXiv:2502.14786) style training pipeline.
"""
from __future__ import annotations

import random
from typing import Optional, Sequence, Tuple, Union

from torchvision.transforms.v2 import functional as F


def parse_color_jitter(value: Union[None, float, Sequence[float]]) -> Optional[Tuple[float, float, float, float]]:
    """Scalar -> (s, s, s, 0); 3- or 4-sequence -> (b, c, s, h). None/0 -> None (disabled)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        v = float(value)
        return None if v <= 0 else (v, v, v, 0.0)
    vals = [float(v) for v in value]
    if len(vals) == 1:
        return parse_color_jitter(vals[0])
    if len(vals) not in (3, 4):
        raise ValueError(f"color jitter needs 1, 3 or 4 values, got {value!r}")
    if len(vals) == 3:
        vals.append(0.0)
    return None if not any(vals) else tuple(vals)


def color_jitter(img, strength: Tuple[float, float, float, float], rng: random.Random):
    b, c, s, h = strength
    order = [0, 1, 2, 3]
    rng.shuffle(order)
    for i in order:
        if i == 0 and b > 0:
            img = F.adjust_brightness(img, rng.uniform(max(0.0, 1 - b), 1 + b))
        elif i == 1 and c > 0:
            img = F.adjust_contrast(img, rng.uniform(max(0.0, 1 - c), 1 + c))
        elif i == 2 and s > 0:
            img = F.adjust_saturation(img, rng.uniform(max(0.0, 1 - s), 1 + s))
        elif i == 3 and h > 0:
            img = F.adjust_hue(img, rng.uniform(-min(h, 0.5), min(h, 0.5)))
    return img


def random_grayscale(img, prob: float, rng: random.Random):
    if prob > 0 and rng.random() < prob:
        return F.rgb_to_grayscale(img, num_output_channels=3)
    return img


BLUR_KERNEL = 23            # timm's transforms_factory: GaussianBlur(kernel_size=23)
BLUR_SIGMA = (0.1, 2.0)     # torchvision's GaussianBlur default, drawn per image


def random_gaussian_blur(img, prob: float, rng: random.Random):
    """``--gaussian-blur-prob``: with probability ``prob`` a Gaussian blur of kernel 23 and sigma uniform in
    [0.1, 2.0], as timm's ``RandomApply([GaussianBlur(23)])``."""
    if prob > 0 and rng.random() < prob:
        sigma = rng.uniform(*BLUR_SIGMA)
        return F.gaussian_blur(img, [BLUR_KERNEL, BLUR_KERNEL], [sigma, sigma])
    return img
