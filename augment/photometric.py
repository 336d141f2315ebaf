"""Colour jitter, random grayscale and Gaussian blur for the NaFlex training transform (per image, explicit RNG).

timm's rule (transforms_factory): colour jitter is used only when no RandAugment/AutoAugment policy is set
(``--color-jitter``, scalar s -> brightness/contrast/saturation factors uniform in [max(0, 1-s), 1+s], hue
optional, applied in a random order like torchvision's ColorJitter); ``--grayscale-prob`` converts to
3-channel grey. Both are ``torchvision.transforms.v2.functional`` calls, so they run on PIL images (CPU
workers) or uint8 tensors. Used by the SigLIP 2 / NaFlex (arXiv:2502.14786) style training pipeline.
"""
from __future__ import annotations

import random
from typing import List, Optional, Sequence, Tuple, Union

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


def sample_color_jitter(strength: Tuple[float, float, float, float], rng: random.Random):
    """The draws of one ``color_jitter`` call: (order, factors), ``order`` a permutation of brightness (0), contrast
    (1), saturation (2), hue (3) as torchvision's ColorJitter shuffles them, ``factors`` one per adjustment (None
    where its strength is 0). Drawn apart from their application so that the device path (augment.device_ops) gets
    the same values from the same RNG stream."""
    b, c, s, h = strength
    order = [0, 1, 2, 3]
    rng.shuffle(order)
    factors: List[Optional[float]] = [None] * 4
    for i in order:
        if i == 0 and b > 0:
            factors[0] = rng.uniform(max(0.0, 1 - b), 1 + b)
        elif i == 1 and c > 0:
            factors[1] = rng.uniform(max(0.0, 1 - c), 1 + c)
        elif i == 2 and s > 0:
            factors[2] = rng.uniform(max(0.0, 1 - s), 1 + s)
        elif i == 3 and h > 0:
            factors[3] = rng.uniform(-min(h, 0.5), min(h, 0.5))
    return order, factors


_ADJUST = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


def apply_color_jitter(img, order: Sequence[int], factors: Sequence[Optional[float]]):
    for i in order:
        if factors[i] is not None:
            img = _ADJUST[i](img, factors[i])
    return img


def color_jitter(img, strength: Tuple[float, float, float, float], rng: random.Random):
    return apply_color_jitter(img, *sample_color_jitter(strength, rng))


def draw_grayscale(prob: float, rng: random.Random) -> bool:
    """Whether an image turns grey (a draw only where ``prob`` > 0, as the CPU path always did)."""
    return prob > 0 and rng.random() < prob


def grayscale(img):
    return F.rgb_to_grayscale(img, num_output_channels=3)


def random_grayscale(img, prob: float, rng: random.Random):
    return grayscale(img) if draw_grayscale(prob, rng) else img


BLUR_KERNEL = 23            # timm's transforms_factory: GaussianBlur(kernel_size=23)
BLUR_SIGMA = (0.1, 2.0)     # torchvision's GaussianBlur default, drawn per image


def random_gaussian_blur(img, prob: float, rng: random.Random):
    """``--gaussian-blur-prob``: with probability ``prob`` a Gaussian blur of kernel 23 and sigma uniform in
    [0.1, 2.0], as timm's ``RandomApply([GaussianBlur(23)])``."""
    sigma = draw_gaussian_blur(prob, rng)
    return img if sigma is None else gaussian_blur(img, sigma)


def draw_gaussian_blur(prob: float, rng: random.Random) -> Optional[float]:
    """The blur's sigma, or None for no blur."""
    if prob > 0 and rng.random() < prob:
        return rng.uniform(*BLUR_SIGMA)
    return None


def gaussian_blur(img, sigma: float):
    return F.gaussian_blur(img, [BLUR_KERNEL, BLUR_KERNEL], [sigma, sigma])
