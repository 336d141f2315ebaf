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
from typing import Optional

from torchvision.transforms.v2 import functional as F

from .config import AugConfig
from .erasing import RandomErasing
from .photometric import color_jitter, parse_color_jitter, random_gaussian_blur, random_grayscale
from .randaugment import RandAugment
from .stages import StageHook, stage


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

    def __call__(self, img, rng: random.Random):
        cfg = self.cfg
        if cfg.no_aug:
            return img
        with stage(self.timer, 'flip'):
            if cfg.hflip > 0 and rng.random() < cfg.hflip:
                img = F.horizontal_flip(img)
            if cfg.vflip > 0 and rng.random() < cfg.vflip:  # after hflip, as timm's transform list
                img = F.vertical_flip(img)
        if self.rand_augment is not None:
            with stage(self.timer, 'RandAugment'):
                img = self.rand_augment(img, rng)
        with stage(self.timer, 'jitter/grayscale'):
            if self.jitter is not None and (cfg.color_jitter_prob is None or rng.random() < cfg.color_jitter_prob):
                img = color_jitter(img, self.jitter, rng)
            if cfg.grayscale_prob > 0:
                img = random_grayscale(img, cfg.grayscale_prob, rng)
        if cfg.gaussian_blur_prob > 0:
            with stage(self.timer, 'blur'):
                img = random_gaussian_blur(img, cfg.gaussian_blur_prob, rng)
        return img

    def after_mix(self, img_HWC, rng: random.Random, patch_size: int):
        """Random erasing (patch-aligned rectangles, in place) on a uint8 [H, W, 3] image; identity when off."""
        if self.erasing is None:
            return img_HWC
        with stage(self.timer, 'random erasing'):
            return self.erasing(img_HWC, rng, patch_size)
