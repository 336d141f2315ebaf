"""Per-image augmentations and batch MixUp/CutMix for NaFlex training (NaViT arXiv:2307.06304,
FlexiViT arXiv:2212.08013, SigLIP 2 arXiv:2502.14786). Imports nothing else of the project.

- ``config``: ``AugConfig`` (timm flag names, the one home of their defaults, ``validate()``).
- ``geometry``: ``fit_grid_to_seq`` (timm's NaFlex size-for-sequence rule), ``sample_rrc`` (random-resized-crop
  to the sequence grid).
- ``randaugment``: ``RandAugment(spec)`` with timm's spec strings, op set and magnitudes (torchvision v2 ops).
- ``photometric``: colour jitter, random grayscale. ``erasing``: random erasing on uint8 images.
- ``mixup``: ``MixupConfig``, ``mix_variable_size`` (area-exact soft targets).
- ``policy``: ``ImageAugment``: flip -> RA -> jitter -> grayscale, and erasing after the batch is mixed.
- ``device_ops``: the photometric ops and flips batched over a packed uint8 batch on the device (CPU or CUDA),
  equal to the PIL path per image, with no host sync; ``device_geometry``: RandAugment's geometric ops the same way;
  ``device_mix``: MixUp/CutMix (pixels and targets equal to ``mixup``'s) and random erasing on the packed batch.
"""
from .config import AugConfig
from .erasing import RandomErasing
from .geometry import CropParams, fit_grid_to_seq, sample_rrc
from .mixup import MixupConfig, mix_variable_size, smooth_one_hot
from .policy import ImageAugment
from .randaugment import RandAugment, parse_rand_augment

__all__ = [
    'AugConfig', 'CropParams', 'ImageAugment', 'MixupConfig', 'RandAugment', 'RandomErasing',
    'fit_grid_to_seq', 'mix_variable_size', 'parse_rand_augment', 'sample_rrc', 'smooth_one_hot',
]
