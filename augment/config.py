"""Configuration of the per-image training augmentation: the one home of its defaults (timm's train.py values).

``AugConfig`` fields carry timm's flag names in their comments; ``validate()`` checks every value before a run
starts (a RandAugment spec, an interpolation name, a probability), so a typo is one clear error instead of a
failure inside a loader worker. NaFlex (SigLIP 2, arXiv:2502.14786) trains on crops resized to each step's
sequence length; the crop/resize parameters live here too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

# Resampling filters for the crop resize (``--train-interpolation``); 'random' picks bilinear or bicubic per
# image like timm. The loaders map the names onto Pillow's filters.
INTERPOLATIONS = ('random', 'bilinear', 'bicubic', 'nearest', 'lanczos', 'box', 'hamming')
RA_INTERPOLATIONS = ('random', 'bilinear', 'bicubic', 'nearest')  # what Rotate/Shear can resample with
ERASE_MODES = ('pixel', 'rand', 'const')
NORM_MEAN = (0.5, 0.5, 0.5)  # SigLIP / NaFlexViT normalization, until the trainer passes the model's
NORM_STD = (0.5, 0.5, 0.5)


class Problems:
    """Collects a config's problems and raises them as one ValueError; ``name`` turns a field into what the
    user typed (the CLI passes its flag names, library callers see field names)."""

    def __init__(self, name: Optional[Callable[[str], str]] = None):
        self.name = name or str
        self.items: List[str] = []

    def need(self, ok: bool, field: str, text: str) -> None:
        if not ok:
            self.items.append(f'{self.name(field)} {text}')

    def raise_any(self) -> None:
        if self.items:
            raise ValueError('; '.join(self.items))


def is_prob(p) -> bool:
    return p is not None and 0.0 <= p <= 1.0


def is_range(v) -> bool:
    return v is not None and len(v) == 2 and 0 < v[0] <= v[1]


@dataclass
class AugConfig:
    """Training augmentation flags (timm train.py names in comments). Defaults are timm's."""
    scale: Tuple[float, float] = (0.08, 1.0)          # --scale
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)       # --ratio (multiplier of the source aspect)
    interpolation: str = 'random'                     # --train-interpolation: random|bilinear|bicubic|...
    hflip: float = 0.5                                # --hflip
    vflip: float = 0.0                                # --vflip (after hflip, as timm)
    aa: Optional[str] = None                          # --aa, e.g. 'rand-m8-inc1-mstd1.0'
    color_jitter: Union[None, float, Sequence[float]] = 0.4  # --color-jitter (ignored with --aa)
    color_jitter_prob: Optional[float] = None         # --color-jitter-prob (None: jitter every image)
    grayscale_prob: float = 0.0                       # --grayscale-prob
    gaussian_blur_prob: float = 0.0                   # --gaussian-blur-prob (kernel 23, sigma 0.1-2, as timm)
    no_aug: bool = False                              # --no-aug: the eval resize (whole image, aspect kept), no
                                                      # flip, RandAugment, jitter, grayscale, blur or erasing
    reprob: float = 0.0                               # --reprob
    remode: str = 'pixel'                             # --remode
    recount: int = 1                                  # --recount
    mean: Tuple[float, float, float] = NORM_MEAN      # model mean (RA fill colour, erasing values)
    std: Tuple[float, float, float] = NORM_STD
    draft: bool = True                                # JPEG reduced-DCT decoding when downscaling >= 2x
                                                      # (--no-jpeg-draft: timm's full decode)
    exif_orientation: bool = False                    # --exif-orientation: turn images upright by their EXIF
                                                      # tag (timm applies none)
    # Rotate/Shear resampling in RandAugment. None: like timm, ``interpolation`` itself ('random': bilinear or
    # bicubic drawn per op). 'bilinear' saves ~0.16 CPU ms/image with the documented augmentations (PIL's bicubic
    # affine costs ~1.5-2x its bilinear one; 2 shared vCPUs, 2026-12-02), at the price of a deviation from timm.
    ra_interpolation: Optional[str] = None

    def interpolations(self) -> Tuple[str, ...]:
        return ('bilinear', 'bicubic') if self.interpolation == 'random' else (self.interpolation,)

    def validate(self, name: Optional[Callable[[str], str]] = None) -> None:
        """Raise ValueError naming every bad value (``name`` maps field names to what the user typed)."""
        from .photometric import parse_color_jitter
        from .randaugment import parse_rand_augment, rand_augment_help
        p = Problems(name)
        p.need(is_range(self.scale), 'scale', f'takes two values 0 < min <= max, got {self.scale}')
        p.need(is_range(self.ratio), 'ratio', f'takes two values 0 < min <= max, got {self.ratio}')
        p.need(self.interpolation in INTERPOLATIONS, 'interpolation',
               f'{self.interpolation!r} is not one of {", ".join(INTERPOLATIONS)}')
        p.need(self.ra_interpolation is None or self.ra_interpolation in RA_INTERPOLATIONS, 'ra_interpolation',
               f'{self.ra_interpolation!r} is not one of {", ".join(RA_INTERPOLATIONS)}')
        for field in ('hflip', 'vflip', 'grayscale_prob', 'gaussian_blur_prob', 'reprob'):
            p.need(is_prob(getattr(self, field)), field, f'must be a probability in [0, 1], got {getattr(self, field)}')
        p.need(self.color_jitter_prob is None or is_prob(self.color_jitter_prob), 'color_jitter_prob',
               f'must be a probability in [0, 1], got {self.color_jitter_prob}')
        p.need(self.remode in ERASE_MODES, 'remode', f'{self.remode!r} is not one of {", ".join(ERASE_MODES)}')
        p.need(self.recount >= 1, 'recount', 'must be >= 1')
        if self.aa:
            try:
                parse_rand_augment(self.aa)
            except ValueError as e:
                p.need(False, 'aa', f'{self.aa!r}: {e}; {rand_augment_help()}')
        try:
            parse_color_jitter(self.color_jitter)
        except (TypeError, ValueError) as e:
            p.need(False, 'color_jitter', str(e))
        p.raise_any()
