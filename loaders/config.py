"""Configuration of the data side: which dataset, how train steps are scheduled and batched, how eval batches
are made. The one home of these defaults (timm train.py / validate.py values for the NaFlex loader).

NaViT (arXiv:2307.06304) token budgets and packing, FlexiViT (arXiv:2212.08013) per-step patch sizes, SigLIP 2
(arXiv:2502.14786) NaFlex sequence lengths. ``validate()`` reports every bad value in one ValueError; its
``name`` argument lets a CLI print its own flag names instead of the field names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from augment.config import INTERPOLATIONS, Problems

def resolve_pin_memory(pin_memory: Optional[bool]) -> bool:
    """None means: pin host batches when CUDA is available (the prefetcher then copies them asynchronously)."""
    if pin_memory is not None:
        return bool(pin_memory)
    import torch
    return torch.cuda.is_available()


DATASET_KINDS = ('', 'wds')  # timm's --dataset TYPE/NAME types read here: image folders, WebDataset tar shards


@dataclass
class DatasetConfig:
    """Where the images are: ``root/<split>/<class>/<image>``, a text-list split (see loaders.dataset) or tar
    shards (``dataset='wds/NAME'``, or found in ``root`` without a split folder; see loaders.shards)."""
    root: str = ''                      # --data-dir
    dataset: str = ''                   # --dataset: '' = image folder or shards found in root, 'wds/NAME' = shards
    train_split: str = 'train'          # --train-split
    val_split: str = 'validation'       # --val-split ('val' and other aliases are found too; '' = none)
    class_map: str = ''                 # --class-map: class names in index order (timm's .txt / .pkl), else timm's
                                        # folder order (natural sort)
    cache_dir: Optional[str] = None     # cache the folder index here (never inside the data folder)
    input_img_mode: Optional[str] = None  # --input-img-mode: images are decoded to RGB ('RGB' or None)
    input_key: Optional[str] = None     # --input-key: tar shards' image member, e.g. 'jpg;png;webp' (first present)
    target_key: Optional[str] = None    # --target-key: tar shards' label, a field of KEY.json (None: KEY.cls)

    def validate(self, name: Optional[Callable[[str], str]] = None) -> None:
        p = Problems(name)
        p.need(bool(self.root), 'root', 'is required')
        kind, sep, _ = self.dataset.partition('/')
        p.need(not sep or kind.lower() in DATASET_KINDS + ('folder', 'imagefolder'), 'dataset',
               f"type {kind!r} is not read here: use wds/NAME (tar shards) or leave it empty (image folder)")
        p.need(self.input_img_mode in (None, 'RGB'), 'input_img_mode',
               f'{self.input_img_mode}: images are decoded to RGB here (the model takes 3 channels)')
        p.raise_any()


@dataclass
class TrainLoaderConfig:
    """One training step = one sequence length L and patch size P; ``batch_size`` images at the longest L,
    so every step holds about ``batch_size x max(seq_lens)`` tokens (timm's token budget)."""
    seq_lens: Tuple[int, ...] = (128, 256, 576, 784, 1024)  # --naflex-train-seq-lens
    batch_size: int = 128                                 # -b
    patch_size: int = 16                                  # the model's (set by the trainer)
    patch_sizes: Optional[Tuple[int, ...]] = None         # --naflex-patch-sizes (FlexiViT)
    patch_size_probs: Optional[Tuple[float, ...]] = None  # --naflex-patch-size-probs
    num_workers: int = 4                                  # -j
    seed: int = 42                                        # --seed: schedule, shuffles and every sample's draws
    packing: bool = True                                  # --no-naflex-packing turns it off (timm's padding)
    pin_memory: Optional[bool] = None                     # None: when CUDA is available
    persistent_workers: bool = True
    prefetch_factor: int = 2
    num_samples: Optional[int] = None                     # --train-num-samples: samples per epoch (None: all)
    aug_repeats: int = 0                                  # --aug-repeats: copies of each image per epoch (timm's
                                                          # RepeatAugSampler; 0 or 1: off)

    def validate(self, name: Optional[Callable[[str], str]] = None) -> None:
        p = Problems(name)
        p.need(bool(self.seq_lens) and all(L > 0 for L in self.seq_lens), 'seq_lens', 'must be > 0')
        p.need(self.batch_size >= 1, 'batch_size', 'must be >= 1')
        p.need(self.num_workers >= 0, 'num_workers', 'must be >= 0')
        p.need(self.num_samples is None or self.num_samples >= 1, 'num_samples', 'must be >= 1')
        p.need(self.aug_repeats >= 0, 'aug_repeats', 'must be >= 0')
        p.need(self.patch_size >= 1 and all(s >= 1 for s in self.patch_sizes or ()), 'patch_sizes', 'must be >= 1')
        p.need(self.patch_size_probs is None or (
            bool(self.patch_sizes) and len(self.patch_size_probs) == len(self.patch_sizes)
            and all(w >= 0 for w in self.patch_size_probs) and sum(self.patch_size_probs) > 0),
            'patch_size_probs', f'needs {p.name("patch_sizes")} with the same number of values (weights >= 0, not all 0)')
        p.raise_any()


@dataclass
class EvalLoaderConfig:
    """Eval batches: every image once, aspect kept, resized to the largest patch grid within ``max_seq_len``."""
    max_seq_len: int = 576              # --naflex-max-seq-len
    batch_size: int = 256               # validate.py -b (train.py: -vb, else -b)
    patch_size: int = 16                # the model's (set by the trainer)
    num_workers: int = 4                # -j
    packing: bool = True
    interpolation: str = 'bicubic'      # the model's eval interpolation (timm: bicubic for NaFlexViT)
    draft: bool = False                 # JPEG reduced-DCT decoding (off: same pixels as timm)
    exif_orientation: bool = False      # --exif-orientation: turn images upright by their EXIF tag (timm: no)
    pin_memory: Optional[bool] = None
    num_samples: Optional[int] = None   # --val-num-samples: score the first N images of the split (None: all)

    def validate(self, name: Optional[Callable[[str], str]] = None) -> None:
        p = Problems(name)
        p.need(self.max_seq_len > 0, 'max_seq_len', 'must be > 0')
        p.need(self.batch_size >= 1, 'batch_size', 'must be >= 1')
        p.need(self.num_workers >= 0, 'num_workers', 'must be >= 0')
        p.need(self.num_samples is None or self.num_samples >= 1, 'num_samples', 'must be >= 1')
        p.need(self.patch_size >= 1, 'patch_size', 'must be >= 1')
        # 'random' is a training-only choice: evaluation resizes every image the same way
        p.need(self.interpolation in INTERPOLATIONS and self.interpolation != 'random', 'interpolation',
               f'{self.interpolation!r} is not one of {", ".join(i for i in INTERPOLATIONS if i != "random")}')
        p.raise_any()
