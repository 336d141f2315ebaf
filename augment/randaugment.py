"""RandAugment with timm's spec string, op set and magnitude mapping, built on torchvision.transforms.v2 ops.

Used by the NaFlex training transform (NaViT arXiv:2307.06304 / SigLIP 2 arXiv:2502.14786 train with
per-image RandAugment at the image's own size). The spec follows timm (``rand-m8-inc1-mstd1.0``):
``m`` magnitude (default 10), ``n`` ops per image (2), ``p`` per-op probability (0.5), ``mstd`` Gaussian
magnitude noise (> 100: uniform in [0, m]), ``mmax`` magnitude clip (default 10), ``inc`` increasing-severity
op set, ``t`` op set name (``weights``, ``3a``, ``3aw``). Magnitude -> argument mappings are timm's.

Every op is a ``torchvision.transforms.v2.functional`` call, so the same code runs on a PIL image (the CPU
workers: Pillow's C kernels) and on a uint8 ``[..., 3, H, W]`` tensor (batched, e.g. on the GPU).

Deliberate differences from timm 1.0.31 (documented, tested):
- Posterize with 0 (or fewer) bits returns a black image instead of raising (Pillow >= 12 rejects 0 bits;
  timm then drops the sample); Solarize with threshold >= 256 is the identity (torchvision rejects it).
- On tensors, bicubic affine resampling is done bilinear (torchvision's tensor ``affine`` has no bicubic);
  ShearX/ShearY on tensors reproduce timm's PIL geometry (shear about the top-left corner) with torchvision's
  centre-based ``affine`` plus the matching shift, equal to PIL's result up to resampling (tested).
- TranslateXRel/YRel on PIL images shift by whole pixels (crop + paste; the <= 0.5 px sub-pixel part is
  dropped) instead of resampling through PIL's slow generic affine path.

Rotate/Shear resample as timm: with 'random' (timm's default) bilinear or bicubic is drawn per op; names other than
bilinear/bicubic/nearest fall back to bicubic (PIL's affine has no other filters).
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

LEVEL_DENOM = 10.0

_INTERP = {'bilinear': InterpolationMode.BILINEAR, 'bicubic': InterpolationMode.BICUBIC,
           'nearest': InterpolationMode.NEAREST}
_PIL_RESAMPLE = {InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
                 InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
                 InterpolationMode.NEAREST: Image.Resampling.NEAREST}

# timm's op lists (auto_augment.py): plain and "increasing severity" RandAugment sets.
RAND_OPS = [
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd', 'Color',
    'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel',
]
RAND_INCREASING_OPS = [
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
    'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing',
    'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel',
]
RAND_3A_OPS = ['SolarizeIncreasing', 'Desaturate', 'GaussianBlur']
RAND_WEIGHTED_3A = {
    'SolarizeIncreasing': 6, 'Desaturate': 6, 'GaussianBlur': 6, 'Rotate': 3, 'ShearX': 2, 'ShearY': 2,
    'PosterizeIncreasing': 1, 'AutoContrast': 1, 'ColorIncreasing': 1, 'SharpnessIncreasing': 1,
    'ContrastIncreasing': 1, 'BrightnessIncreasing': 1, 'Equalize': 1, 'Invert': 1,
}
RAND_WEIGHTED_0 = {
    'Rotate': 3, 'ShearX': 2, 'ShearY': 2, 'TranslateXRel': 1, 'TranslateYRel': 1, 'ColorIncreasing': .25,
    'SharpnessIncreasing': 0.25, 'AutoContrast': 0.25, 'SolarizeIncreasing': .05, 'SolarizeAdd': .05,
    'ContrastIncreasing': .05, 'BrightnessIncreasing': .05, 'Equalize': .05, 'PosterizeIncreasing': 0.05,
    'Invert': 0.05,
}


# ---------------------------------------------------------------------------------------------------------
# Magnitude (level in [0, mmax]) -> op arguments. ``rng`` decides the random sign where timm negates.

def _signed(v: float, rng: random.Random) -> float:
    return -v if rng.random() > 0.5 else v


def _enhance(level, rng):
    return (level / LEVEL_DENOM) * 1.8 + 0.1


def _enhance_inc(level, rng):
    return max(0.1, 1.0 + _signed((level / LEVEL_DENOM) * 0.9, rng))


def _posterize(level, rng):
    return int((level / LEVEL_DENOM) * 4)


LEVEL_TO_ARG: Dict[str, Optional[Callable]] = {
    'AutoContrast': None, 'Equalize': None, 'Invert': None,
    'Rotate': lambda lv, rng: _signed((lv / LEVEL_DENOM) * 30.0, rng),
    'Posterize': _posterize,
    'PosterizeIncreasing': lambda lv, rng: 4 - _posterize(lv, rng),
    'PosterizeOriginal': lambda lv, rng: _posterize(lv, rng) + 4,
    'Solarize': lambda lv, rng: min(256, int((lv / LEVEL_DENOM) * 256)),
    'SolarizeIncreasing': lambda lv, rng: 256 - min(256, int((lv / LEVEL_DENOM) * 256)),
    'SolarizeAdd': lambda lv, rng: min(128, int((lv / LEVEL_DENOM) * 110)),
    'Color': _enhance, 'ColorIncreasing': _enhance_inc,
    'Contrast': _enhance, 'ContrastIncreasing': _enhance_inc,
    'Brightness': _enhance, 'BrightnessIncreasing': _enhance_inc,
    'Sharpness': _enhance, 'SharpnessIncreasing': _enhance_inc,
    'ShearX': lambda lv, rng: _signed((lv / LEVEL_DENOM) * 0.3, rng),
    'ShearY': lambda lv, rng: _signed((lv / LEVEL_DENOM) * 0.3, rng),
    'TranslateXRel': lambda lv, rng: _signed((lv / LEVEL_DENOM) * 0.45, rng),
    'TranslateYRel': lambda lv, rng: _signed((lv / LEVEL_DENOM) * 0.45, rng),
    'Desaturate': lambda lv, rng: min(1.0, max(0.5, 0.5 + 0.5 * lv / LEVEL_DENOM)),
    'GaussianBlur': lambda lv, rng: min(2.0, max(0.1, 0.1 + 1.9 * lv / LEVEL_DENOM)),
}


# ---------------------------------------------------------------------------------------------------------
# Ops: (img, arg, ctx) -> img for PIL images or uint8 [..., C, H, W] tensors.

@dataclass
class OpContext:
    fill: Tuple[int, int, int]
    interpolation: InterpolationMode


def _size_hw(img) -> Tuple[int, int]:
    if isinstance(img, Image.Image):
        return img.height, img.width
    return int(img.shape[-2]), int(img.shape[-1])


def _geom_interp(img, interp: InterpolationMode) -> InterpolationMode:
    if not isinstance(img, Image.Image) and interp == InterpolationMode.BICUBIC:
        return InterpolationMode.BILINEAR
    return interp


def _affine(img, ctx: OpContext, *, angle=0.0, translate=(0.0, 0.0), shear=(0.0, 0.0)):
    return F.affine(img, angle=angle, translate=list(translate), scale=1.0, shear=list(shear),
                    interpolation=_geom_interp(img, ctx.interpolation), fill=list(ctx.fill))


def op_translate(img, dx: float, dy: float, ctx: OpContext):
    """Translate by (dx, dy) pixels (content moves by -dx, -dy like timm's PIL matrix), fill the uncovered border.

    PIL images: shifted by whole pixels (rounded) with a crop + paste, ~30x cheaper than PIL's generic
    resampling affine path; the sub-pixel part (<= 0.5 px) of timm's shift is dropped. Tensors: F.affine.
    """
    if not isinstance(img, Image.Image):
        return _affine(img, ctx, translate=(-dx, -dy))
    ix, iy = int(round(dx)), int(round(dy))
    w, h = img.size
    out = Image.new(img.mode, (w, h), ctx.fill if img.mode == 'RGB' else ctx.fill[0])
    if abs(ix) < w and abs(iy) < h:
        src = img.crop((max(0, ix), max(0, iy), min(w, w + ix), min(h, h + iy)))
        out.paste(src, (max(0, -ix), max(0, -iy)))
    return out


def op_shear(img, factor: float, ctx: OpContext, axis: str):
    """timm's Shear: PIL's affine map about the image's top-left corner. ShearX samples output pixel (x, y) from
    input (x + factor * y, y) (ShearY: (x, y + factor * x)), so besides slanting, the content moves sideways by
    up to factor * height, unlike a shear about the centre.

    PIL images: that very PIL call (identical pixels to timm). Tensors: torchvision's affine shears about the
    centre, so the same map is that shear followed by a shift of -factor * H / 2 (ShearY: -factor * W / 2).
    """
    if isinstance(img, Image.Image):
        coeffs = (1, factor, 0, 0, 1, 0) if axis == 'x' else (1, 0, 0, factor, 1, 0)
        fill = ctx.fill if img.mode == 'RGB' else ctx.fill[0]
        return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=_PIL_RESAMPLE[ctx.interpolation],
                             fillcolor=fill)
    h, w = _size_hw(img)
    degrees = math.degrees(math.atan(factor))  # torchvision takes the shear angle, timm its tangent
    if axis == 'x':
        return _affine(img, ctx, shear=(degrees, 0.0), translate=(-factor * h / 2, 0.0))
    return _affine(img, ctx, shear=(0.0, degrees), translate=(0.0, -factor * w / 2))


def op_posterize(img, bits, ctx):
    bits = int(bits)
    if bits >= 8:
        return img
    if bits <= 0:  # keep 0 MSBs: everything black (Pillow >= 12 raises for 0)
        if isinstance(img, Image.Image):
            return Image.new(img.mode, img.size, 0)
        return torch.zeros_like(img)
    return F.posterize(img, bits)


def op_solarize(img, thresh, ctx):
    if thresh >= 256:
        return img
    if thresh <= 0:
        return F.invert(img)
    return F.solarize(img, thresh)


def op_solarize_add(img, add, ctx, thresh=128):
    add = int(add)
    if isinstance(img, Image.Image):
        lut = [min(255, i + add) if i < thresh else i for i in range(256)]
        return img.point(lut * len(img.getbands()))
    added = (img.to(torch.int16) + add).clamp_(0, 255).to(torch.uint8)
    return torch.where(img < thresh, added, img)


def op_gaussian_blur(img, radius, ctx):
    if isinstance(img, Image.Image):
        return img.filter(ImageFilter.GaussianBlur(radius=radius))
    k = 2 * math.ceil(3 * radius) + 1
    h, w = _size_hw(img)
    k = max(1, min(k, (min(h, w) // 2) * 2 - 1 if min(h, w) > 1 else 1))
    return F.gaussian_blur(img, [k, k], [radius, radius]) if k > 1 else img


OPS: Dict[str, Callable] = {
    'AutoContrast': lambda img, a, ctx: F.autocontrast(img),
    'Equalize': lambda img, a, ctx: F.equalize(img),
    'Invert': lambda img, a, ctx: F.invert(img),
    'Rotate': lambda img, a, ctx: F.rotate(img, a, interpolation=_geom_interp(img, ctx.interpolation),
                                           fill=list(ctx.fill)),
    'Posterize': op_posterize, 'PosterizeIncreasing': op_posterize, 'PosterizeOriginal': op_posterize,
    'Solarize': op_solarize, 'SolarizeIncreasing': op_solarize,
    'SolarizeAdd': op_solarize_add,
    'Color': lambda img, a, ctx: F.adjust_saturation(img, a),
    'ColorIncreasing': lambda img, a, ctx: F.adjust_saturation(img, a),
    'Contrast': lambda img, a, ctx: F.adjust_contrast(img, a),
    'ContrastIncreasing': lambda img, a, ctx: F.adjust_contrast(img, a),
    'Brightness': lambda img, a, ctx: F.adjust_brightness(img, a),
    'BrightnessIncreasing': lambda img, a, ctx: F.adjust_brightness(img, a),
    'Sharpness': lambda img, a, ctx: F.adjust_sharpness(img, a),
    'SharpnessIncreasing': lambda img, a, ctx: F.adjust_sharpness(img, a),
    'ShearX': lambda img, a, ctx: op_shear(img, a, ctx, 'x'),
    'ShearY': lambda img, a, ctx: op_shear(img, a, ctx, 'y'),
    'TranslateXRel': lambda img, a, ctx: op_translate(img, a * _size_hw(img)[1], 0.0, ctx),
    'TranslateYRel': lambda img, a, ctx: op_translate(img, 0.0, a * _size_hw(img)[0], ctx),
    'Desaturate': lambda img, a, ctx: F.adjust_saturation(img, min(1.0, max(0.0, 1.0 - a))),
    'GaussianBlur': op_gaussian_blur,
}


# ---------------------------------------------------------------------------------------------------------

@dataclass
class RandAugmentSpec:
    magnitude: float = LEVEL_DENOM
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: Optional[float] = None
    ops: List[str] = field(default_factory=lambda: list(RAND_OPS))
    weights: Optional[List[float]] = None  # weighted choice (without replacement) when set


def rand_augment_help() -> str:
    """One line on the spec strings ``parse_rand_augment`` accepts (for error messages)."""
    return ("supported: RandAugment specs 'rand-<section>-...' with sections m<magnitude> n<ops> p<prob> "
            "mstd<std> mmax<max> inc<0|1> t<weights|3a|3aw>, e.g. 'rand-m8-inc1-mstd1.0' (timm's AutoAugment "
            "'original'/'v0' and AugMix 'augmix-...' policies are not implemented)")


# spec section -> (RandAugmentSpec field, value type); 'inc' picks the op set instead of setting a field
_SECTIONS = {'m': ('magnitude', int), 'n': ('num_layers', int), 'p': ('prob', float),
             'mstd': ('magnitude_std', float), 'mmax': ('magnitude_max', int), 'inc': (None, int)}


def parse_rand_augment(spec: str) -> RandAugmentSpec:
    """Parse timm's ``rand-...`` string. Unknown sections and values that are not numbers raise ValueError."""
    parts = spec.split('-')
    if parts[0] != 'rand':
        raise ValueError("a RandAugment spec starts with 'rand-'")
    out = RandAugmentSpec()
    increasing = False
    op_set = None
    for part in parts[1:]:
        if not part:
            continue
        if part.startswith('t'):
            op_set = part[1:]
            continue
        m = re.match(r'^([a-z]+)(\d.*)$', part)
        if not m:
            raise ValueError(f"bad RandAugment section {part!r} in {spec!r}")
        key, text = m.groups()
        if key not in _SECTIONS:
            raise ValueError(f"unknown RandAugment section {part!r} in {spec!r}")
        field_name, kind = _SECTIONS[key]
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"RandAugment section {part!r} in {spec!r}: {key} takes "
                             f"{'an integer' if kind is int else 'a number'}") from None
        if key == 'inc':
            increasing = bool(value)
        elif key == 'mstd':
            out.magnitude_std = float('inf') if value > 100 else value  # timm: > 100 means uniform in [0, m]
        else:
            setattr(out, field_name, value)
    return _with_op_set(out, op_set, increasing)


def _with_op_set(out: RandAugmentSpec, op_set: Optional[str], increasing: bool) -> RandAugmentSpec:
    if op_set in ('weights', '3aw'):
        table = RAND_WEIGHTED_0 if op_set == 'weights' else RAND_WEIGHTED_3A
        out.ops = list(table)
        total = float(sum(table.values()))
        out.weights = [v / total for v in table.values()]
    elif op_set == '3a':
        out.ops = list(RAND_3A_OPS)
    elif op_set is None or op_set == '':
        out.ops = list(RAND_INCREASING_OPS if increasing else RAND_OPS)
    else:
        raise ValueError(f"unknown RandAugment op set {op_set!r}")
    return out


def level_to_arg(name: str, level: float, rng: random.Random):
    """The argument of op ``name`` at magnitude ``level`` (``rng`` draws the sign where timm negates)."""
    level_fn = LEVEL_TO_ARG[name]
    return level_fn(level, rng) if level_fn is not None else None


def apply_op(name: str, img, level: float, rng: random.Random, ctx: OpContext):
    """Apply one named op at magnitude ``level`` (already sampled and clipped)."""
    return OPS[name](img, level_to_arg(name, level, rng), ctx)


@dataclass(frozen=True)
class OpDraw:
    """One op an image drew: its name, its argument (after magnitude noise, clipping and sign; TranslateX/YRel:
    a fraction of the image's width/height) and the resampling of Rotate/Shear."""
    name: str
    arg: object
    interpolation: InterpolationMode


class RandAugment:
    """``RandAugment('rand-m8-inc1-mstd1.0', fill=(128,)*3, interpolation='random')(img, rng)``."""

    def __init__(self, spec: str, *, fill: Sequence[int] = (128, 128, 128), interpolation: str = 'random'):
        """``interpolation``: resampling of Rotate/Shear: 'random' (bilinear or bicubic per op, timm's default),
        or one mode."""
        self.spec_str = spec
        self.spec = parse_rand_augment(spec)
        self.fill = tuple(int(v) for v in fill)
        if interpolation == 'random':
            self.interps = (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
        else:
            self.interps = (_INTERP.get(interpolation, InterpolationMode.BICUBIC),)

    def sample_level(self, rng: random.Random) -> float:
        s = self.spec
        m = s.magnitude
        if s.magnitude_std == float('inf'):
            m = rng.uniform(0, m)
        elif s.magnitude_std > 0:
            m = rng.gauss(m, s.magnitude_std)
        upper = s.magnitude_max or LEVEL_DENOM
        return max(0.0, min(m, upper))

    def choose_ops(self, rng: random.Random) -> List[str]:
        s = self.spec
        if s.weights is None:
            return [rng.choice(s.ops) for _ in range(s.num_layers)]
        # weighted, without replacement
        names, weights = list(s.ops), list(s.weights)
        chosen = []
        for _ in range(min(s.num_layers, len(names))):
            i = rng.choices(range(len(names)), weights=weights)[0]
            chosen.append(names.pop(i))
            weights.pop(i)
        return chosen

    def draw(self, rng: random.Random) -> List[OpDraw]:
        """The ops one image gets, in order, with every random choice made: the one drawing code of the CPU path
        (``apply``) and the device path (loaders.device_step). The stream is consumed as timm's per-op loop does:
        the op names first, then per op its probability, resampling, magnitude and sign."""
        draws = []
        for name in self.choose_ops(rng):
            if self.spec.prob < 1.0 and rng.random() > self.spec.prob:
                continue
            interpolation = rng.choice(self.interps)
            level = self.sample_level(rng)
            draws.append(OpDraw(name, level_to_arg(name, level, rng), interpolation))
        return draws

    def apply(self, img, draws: Sequence[OpDraw]):
        for d in draws:
            img = OPS[d.name](img, d.arg, OpContext(self.fill, d.interpolation))
        return img

    def __call__(self, img, rng: random.Random):
        return self.apply(img, self.draw(rng))

    def __repr__(self):
        return f"RandAugment({self.spec_str!r})"
