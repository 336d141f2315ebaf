"""Configuration of the per-image training augmentation: the one home of its defaults (timm's train.py values).

``AugConfig`` fields declare their train.py flags (``flag``: timm's names, help); ``validate()`` checks every value
before a run starts (a RandAugment spec, an interpolation name, a probability), so a typo is one clear error instead of
a failure inside a loader worker. NaFlex (SigLIP 2, arXiv:2502.14786) trains on crops resized to each step's sequence
length; the crop/resize parameters live here too."""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

# Resampling filters for the crop resize (``--train-interpolation``); 'random' picks bilinear or bicubic per
# image like timm. The loaders map the names onto Pillow's filters.
INTERPOLATIONS = ('random', 'bilinear', 'bicubic', 'nearest', 'lanczos', 'box', 'hamming')
RA_INTERPOLATIONS = ('random', 'bilinear', 'bicubic', 'nearest')  # what Rotate/Shear can resample with
ERASE_MODES = ('pixel', 'rand', 'const')
NORM_MEAN = (0.5, 0.5, 0.5)  # SigLIP / NaFlexViT normalization, until the trainer passes the model's
NORM_STD = (0.5, 0.5, 0.5)


def flag(*names: str, help: str, default: Any = MISSING, factory: Optional[Callable[[], Any]] = None,
         group: Optional[str] = None, invert: bool = False, convert: Optional[Callable[[Any], Any]] = None,
         cli_default: Any = MISSING, **argparse_kwargs) -> Any:
    """A config field declared with its command-line flag: the one place of the flag's names (timm's), type (the
    field's annotation), default (the field's) and help. naflex.train.cli builds train.py's parser from these fields;
    to library users they are plain dataclass fields.

    ``group``: the --help section when it is not the config's own; ``invert``: a ``--no-x`` switch that sets the field
    False; ``convert``: maps the flag's value onto the field; ``cli_default``: the flag's default where it differs
    from the field's; ``argparse_kwargs``: what the type does not imply (choices, metavar, const, nargs='?')."""
    spec = dict(names=names, help=help, group=group, invert=invert, convert=convert, cli_default=cli_default,
                kwargs=argparse_kwargs)
    if factory is not None:
        return field(default_factory=factory, metadata={'flag': spec})
    return field(default=default, metadata={'flag': spec})


def same_flag(name: str, *, default: Any, invert: bool = False, convert: Optional[Callable[[Any], Any]] = None) -> Any:
    """A config field that another field's flag sets too (``--seed`` seeds the trainer and the loader)."""
    return field(default=default, metadata={'same_flag': dict(name=name, invert=invert, convert=convert)})


def zero_if_none(value):
    """timm writes an unset probability as None: off."""
    return value or 0.0


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
    scale: Tuple[float, float] = flag('--scale', default=(0.08, 1.0), help='random-resized-crop area range')
    ratio: Tuple[float, float] = flag('--ratio', default=(3 / 4, 4 / 3), help='random-resized-crop aspect')
    interpolation: str = flag('--train-interpolation', default='random', metavar='|'.join(INTERPOLATIONS),
                              help='training resize interpolation')
    hflip: float = flag('--hflip', default=0.5, help='horizontal flip probability')
    vflip: float = flag('--vflip', default=0.0, help='vertical flip probability')
    aa: Optional[str] = flag('--aa', default=None, help="RandAugment spec, e.g. 'rand-m8-inc1-mstd1.0'")
    color_jitter: Union[None, float, Sequence[float]] = flag('--color-jitter', default=0.4, type=float,
                                                             help='color jitter strength (without --aa)')
    color_jitter_prob: Optional[float] = flag('--color-jitter-prob', default=None,
                                              help='apply color jitter to this share of images (default: all)')
    grayscale_prob: float = flag('--grayscale-prob', default=0.0, convert=zero_if_none,
                                 help='random grayscale probability')
    gaussian_blur_prob: float = flag('--gaussian-blur-prob', default=0.0, convert=zero_if_none,
                                     help='random Gaussian blur probability (kernel 23, sigma 0.1-2.0)')
    no_aug: bool = flag('--no-aug', default=False,
                        help='no augmentation: each training image resized whole like eval (aspect kept), no erasing')
    reprob: float = flag('--reprob', default=0.0, help='random erasing probability')
    remode: str = flag('--remode', default='pixel', help='random erasing mode')
    recount: int = flag('--recount', default=1, help='random erasing count')
    mean: Tuple[float, float, float] = NORM_MEAN      # model mean (RA fill colour, erasing values)
    std: Tuple[float, float, float] = NORM_STD
    draft: bool = flag('--no-jpeg-draft', default=True, invert=True,
                       help='decode training JPEGs in full like timm (default: reduced-DCT decoding when a crop is '
                            'downscaled >= 2x, which is faster)')
    exif_orientation: bool = flag('--exif-orientation', default=False,
                                  help='turn images upright by their EXIF orientation tag, in training and eval '
                                       '(default: no, like timm)')
    device_aug: bool = flag('--device-aug', default=False,
                            help='loader workers only read the files and draw the augmentation; the training device '
                                 'decodes the JPEGs and crops, resizes and augments the whole step (docs/training.md)')
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
        for name in ('hflip', 'vflip', 'grayscale_prob', 'gaussian_blur_prob', 'reprob'):
            p.need(is_prob(getattr(self, name)), name, f'must be a probability in [0, 1], got {getattr(self, name)}')
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
