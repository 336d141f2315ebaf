"""Per-image training augmentation policy for NaFlex training (SigLIP 2 arXiv:2502.14786, NaViT
arXiv:2307.06304): the config with timm's flag names and the post-crop photometric/geometric chain.

Order (as timm's transforms_factory): [random-resized-crop to the sequence grid, done at decode time by
loaders.pipeline] -> horizontal flip -> RandAugment (``--aa``) -> colour jitter (only when no ``--aa``)
-> random grayscale. Random erasing (``--reprob``) runs later on the uint8 image, after MixUp/CutMix,
like timm where it runs in the prefetcher after mixing.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

from torchvision.transforms.v2 import functional as F

from .erasing import RandomErasing
from .photometric import color_jitter, parse_color_jitter, random_grayscale
from .randaugment import RandAugment


@dataclass
class AugConfig:
    """Training augmentation flags (timm train.py names in comments). Defaults are timm's."""
    scale: Tuple[float, float] = (0.08, 1.0)          # --scale
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)       # --ratio (multiplier of the source aspect)
    interpolation: str = 'random'                     # --train-interpolation: random|bilinear|bicubic|...
    hflip: float = 0.5                                # --hflip
    aa: Optional[str] = None                          # --aa, e.g. 'rand-m8-inc1-mstd1.0'
    color_jitter: Union[None, float, Sequence[float]] = 0.4  # --color-jitter (ignored with --aa)
    grayscale_prob: float = 0.0                       # --grayscale-prob
    reprob: float = 0.0                               # --reprob
    remode: str = 'pixel'                             # --remode
    recount: int = 1                                  # --recount
    mean: Tuple[float, float, float] = (0.5, 0.5, 0.5)  # model mean (RA fill colour, erasing values)
    std: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    draft: bool = True                                # JPEG reduced-DCT decoding when downscaling >= 2x
    # Rotate/Shear resampling in RandAugment. None: 'bilinear' when interpolation is 'random' (speed; timm
    # draws bilinear or bicubic per op), else ``interpolation`` like timm. 'random' gives timm's behaviour.
    ra_interpolation: Optional[str] = None

    def interpolations(self) -> Tuple[str, ...]:
        return ('bilinear', 'bicubic') if self.interpolation == 'random' else (self.interpolation,)


class ImageAugment:
    """flip -> RandAugment -> colour jitter (no AA only) -> grayscale, on a PIL image or uint8 CHW tensor."""

    def __init__(self, cfg: AugConfig):
        self.cfg = cfg
        fill = tuple(min(255, round(255 * m)) for m in cfg.mean)
        self.rand_augment = None
        if cfg.aa:
            if not cfg.aa.startswith('rand'):
                raise ValueError(f"only RandAugment specs ('rand-...') are supported for --aa, got {cfg.aa!r}")
            ra_interp = cfg.ra_interpolation or ('bilinear' if cfg.interpolation == 'random' else cfg.interpolation)
            self.rand_augment = RandAugment(cfg.aa, fill=fill, interpolation=ra_interp)
        # timm: jitter is disabled whenever an AA policy is given (unless '3a' is in the spec).
        use_jitter = self.rand_augment is None or '3a' in (cfg.aa or '')
        self.jitter = parse_color_jitter(cfg.color_jitter) if use_jitter else None
        self.erasing = (RandomErasing(cfg.reprob, cfg.remode, cfg.recount, mean=cfg.mean, std=cfg.std)
                        if cfg.reprob > 0 else None)

    def __call__(self, img, rng: random.Random):
        if self.cfg.hflip > 0 and rng.random() < self.cfg.hflip:
            img = F.horizontal_flip(img)
        if self.rand_augment is not None:
            img = self.rand_augment(img, rng)
        if self.jitter is not None:
            img = color_jitter(img, self.jitter, rng)
        if self.cfg.grayscale_prob > 0:
            img = random_grayscale(img, self.cfg.grayscale_prob, rng)
        return img
