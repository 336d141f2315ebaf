"""Per-sample pipeline: file -> uint8 HWC image whose patch grid fits the step's sequence length.

Train (NaViT arXiv:2307.06304 / SigLIP 2 NaFlex arXiv:2502.14786, timm's RandomResizedCropToSequence):
read the header, sample the crop in full-resolution coordinates, decode (JPEG draft when the output is
>= 2x smaller, unless ``--no-jpeg-draft``), crop+resize straight to grid*P (``--train-interpolation``;
'random' = bilinear or bicubic), then flip / RandAugment / jitter / grayscale / blur (augment.ImageAugment) on
the PIL image. ``--no-aug`` (timm's) uses the eval resize below instead, with no augmentation. An optional stage
hook (augment.stages) times each of these stages for the profiler.

Eval: timm's NaFlex eval rule (ResizeToSequence): aspect-preserving resize of the whole image to the largest
grid that fits ``max_seq_len``, no crop. JPEG draft is off by default here so pixels match timm's.
EXIF orientation is applied in either only when asked for (``AugConfig`` / ``EvalLoaderConfig.exif_orientation``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from augment.geometry import fit_grid_to_seq, sample_rrc
from augment.config import AugConfig
from augment.policy import ImageAugment, ImageDraws
from augment.stages import StageHook, stage

from .config import EvalLoaderConfig
from .decode import decode_resized, open_image, pil_to_hwc


@dataclass
class SampleDraws:
    """One training image's draws: the crop ``box`` (top, left, height, width; None: the whole image), its patch
    ``grid`` (h, w), the resize filter and the per-image augmentation draws."""
    box: Optional[Tuple[int, int, int, int]]
    grid: Tuple[int, int]
    patch_size: int
    interpolation: str
    image: ImageDraws

    @property
    def out_hw(self) -> Tuple[int, int]:
        return self.grid[0] * self.patch_size, self.grid[1] * self.patch_size


class TrainSampleBuilder:
    def __init__(self, aug: AugConfig, timer: Optional[StageHook] = None):
        self.cfg = aug
        self.timer = timer
        self.augment = ImageAugment(aug, timer=timer)
        self.interps = aug.interpolations()

    def __call__(self, path: str, seq_len: int, patch_size: int, rng: random.Random) -> torch.Tensor:
        """uint8 HWC tensor [grid_h * P, grid_w * P, 3]."""
        return pil_to_hwc(self.build_pil(path, seq_len, patch_size, rng))

    def build_pil(self, path: str, seq_len: int, patch_size: int, rng: random.Random):
        """The same image as an RGB PIL image (the loader mixes PIL images, then converts)."""
        with stage(self.timer, 'read + header'):
            opened = open_image(path, exif_orientation=self.cfg.exif_orientation)
        _, h, w, _ = opened
        with stage(self.timer, 'RRC params'):
            d = self.draw(h, w, seq_len, patch_size, rng)
        img = decode_resized(path, d.box, d.out_hw, d.interpolation, draft=self.cfg.draft, opened=opened,
                             timer=self.timer)
        return img if self.cfg.no_aug else self.augment.apply(img, d.image)

    def draw(self, h: int, w: int, seq_len: int, patch_size: int, rng: random.Random) -> SampleDraws:
        """Every draw of one h x w (upright) image: the crop and its grid, the resampling, then ``ImageAugment``'s;
        the one drawing code of the CPU path (``build_pil``) and the device path (loaders.device_worker)."""
        if self.cfg.no_aug:  # timm's --no-aug: the eval resize (whole image, aspect kept), no augmentation
            gh, gw = fit_grid_to_seq(h, w, patch_size, seq_len)
            return SampleDraws(None, (gh, gw), patch_size, self.interps[0], ImageDraws())
        crop = sample_rrc(h, w, rng, patch_size=patch_size, max_seq_len=seq_len, scale=self.cfg.scale,
                          ratio=self.cfg.ratio)
        interp = self.interps[0] if len(self.interps) == 1 else rng.choice(self.interps)
        return SampleDraws((crop.top, crop.left, crop.height, crop.width), (crop.grid_h, crop.grid_w), patch_size,
                           interp, self.augment.draw(rng))


def eval_sample(path: str, max_seq_len: int, patch_size: int, interpolation: str = EvalLoaderConfig.interpolation,
                draft: bool = EvalLoaderConfig.draft,
                exif_orientation: bool = EvalLoaderConfig.exif_orientation) -> torch.Tensor:
    opened = open_image(path, exif_orientation=exif_orientation)
    _, h, w, _ = opened
    gh, gw = fit_grid_to_seq(h, w, patch_size, max_seq_len)
    img = decode_resized(path, None, (gh * patch_size, gw * patch_size), interpolation, draft=draft, opened=opened)
    return pil_to_hwc(img)
