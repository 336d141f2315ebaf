"""Per-image training augmentation policy for NaFlex training (SigLIP 2 arXiv:2502.14786, NaViT
arXiv:2307.06304): the post-crop photometric/geometric chain that ``AugConfig`` (augment.config) describes.

Order (as timm's transforms_factory): [random-resized-crop to the sequence grid, done at decode time by
loaders.pipeline] -> horizontal flip -> vertical flip -> RandAugment (``--aa``) -> colour jitter (only when no
``--aa``) -> random grayscale (``__call__``, on PIL images) ... [MixUp/CutMix over the batch] ... random
erasing (``--reprob``, ``after_mix``, on the uint8 image), like timm where erasing runs in the prefetcher after
mixing. The loaders call the two stages in that order; this module decides what each stage does.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from torchvision.transforms.v2 import functional as F

from .config import AugConfig
from .erasing import RandomErasing
from .photometric import (apply_color_jitter, draw_gaussian_blur, draw_grayscale, gaussian_blur, grayscale,
                          parse_color_jitter, sample_color_jitter)
from .randaugment import OpDraw, RandAugment
from .stages import StageHook, stage


@dataclass
class ImageDraws:
    """Every random choice of ``ImageAugment`` for one image, drawn before any pixel is touched, so that the CPU path
    (``ImageAugment.apply``) and the device path (loaders.device_step) apply the same values."""
    hflip: bool = False
    vflip: bool = False
    ra: List[OpDraw] = field(default_factory=list)
    jitter: Optional[Tuple[Sequence[int], Sequence[Optional[float]]]] = None  # (order, factors) of ColorJitter
    grayscale: bool = False
    blur_sigma: Optional[float] = None


class ImageAugment:
    """flip -> RandAugment -> colour jitter (no AA only; with ``color_jitter_prob``: that share of images) ->
    grayscale -> Gaussian blur on a PIL image or uint8 CHW tensor (timm's order); ``after_mix``: random erasing on
    the uint8 HWC image once the batch has been mixed. ``no_aug``: identity. ``timer``: an optional stage hook
    (augment.stages) called around each stage."""

    def __init__(self, cfg: AugConfig, timer: Optional[StageHook] = None):
        self.cfg = cfg
        self.timer = timer
        fill = tuple(min(255, round(255 * m)) for m in cfg.mean)
        self.rand_augment = None
        if cfg.aa:
            if not cfg.aa.startswith('rand'):
                raise ValueError(f"only RandAugment specs ('rand-...') are supported for --aa, got {cfg.aa!r}")
            ra_interp = cfg.ra_interpolation or cfg.interpolation  # timm: the train interpolation, 'random' included
            self.rand_augment = RandAugment(cfg.aa, fill=fill, interpolation=ra_interp)
        # timm: jitter is disabled whenever an AA policy is given (unless '3a' is in the spec).
        use_jitter = self.rand_augment is None or '3a' in (cfg.aa or '')
        self.jitter = parse_color_jitter(cfg.color_jitter) if use_jitter else None
        self.erasing = (RandomErasing(cfg.reprob, cfg.remode, cfg.recount, mean=cfg.mean, std=cfg.std)
                        if cfg.reprob > 0 and not cfg.no_aug else None)

    def draw(self, rng: random.Random) -> ImageDraws:
        """The draws of one image, consuming ``rng`` in the order the stages run."""
        cfg, d = self.cfg, ImageDraws()
        if cfg.no_aug:
            return d
        d.hflip = cfg.hflip > 0 and rng.random() < cfg.hflip
        d.vflip = cfg.vflip > 0 and rng.random() < cfg.vflip  # after hflip, as timm's transform list
        if self.rand_augment is not None:
            d.ra = self.rand_augment.draw(rng)
        if self.jitter is not None and (cfg.color_jitter_prob is None or rng.random() < cfg.color_jitter_prob):
            d.jitter = sample_color_jitter(self.jitter, rng)
        d.grayscale = draw_grayscale(cfg.grayscale_prob, rng)
        d.blur_sigma = draw_gaussian_blur(cfg.gaussian_blur_prob, rng)
        return d

    def apply(self, img, d: ImageDraws):
        """The stages on a PIL image or uint8 CHW tensor with the draws ``d``."""
        with stage(self.timer, 'flip'):
            if d.hflip:
                img = F.horizontal_flip(img)
            if d.vflip:
                img = F.vertical_flip(img)
        if self.rand_augment is not None:
            with stage(self.timer, 'RandAugment'):
                img = self.rand_augment.apply(img, d.ra)
        with stage(self.timer, 'jitter/grayscale'):
            if d.jitter is not None:
                img = apply_color_jitter(img, *d.jitter)
            if d.grayscale:
                img = grayscale(img)
        if d.blur_sigma is not None:
            with stage(self.timer, 'blur'):
                img = gaussian_blur(img, d.blur_sigma)
        return img

    def __call__(self, img, rng: random.Random):
        return self.apply(img, self.draw(rng))

    def after_mix(self, img_HWC, rng: random.Random, patch_size: int):
        """Random erasing (patch-aligned rectangles, in place) on a uint8 [H, W, 3] image; identity when off."""
        if self.erasing is None:
            return img_HWC
        with stage(self.timer, 'random erasing'):
            return self.erasing(img_HWC, rng, patch_size)
