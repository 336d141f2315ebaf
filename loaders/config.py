"""Configuration of the data side: which dataset, how train steps are scheduled and batched, how eval batches
are made. The one home of these defaults (timm train.py / validate.py values for the NaFlex loader), each field
with the train.py flag that sets it (augment.config.flag).

NaViT (arXiv:2307.06304) token budgets and packing, FlexiViT (arXiv:2212.08013) per-step patch sizes, SigLIP 2
(arXiv:2502.14786) NaFlex sequence lengths. ``validate()`` reports every bad value in one ValueError; its
``name`` argument lets a CLI print its own flag names instead of the field names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from augment.config import INTERPOLATIONS, Problems, flag, same_flag

def resolve_pin_memory(pin_memory: Optional[bool]) -> bool:
    """None means: pin host batches when CUDA is available (the prefetcher then copies them asynchronously)."""
    if pin_memory is not None:
        return bool(pin_memory)
    import torch
    return torch.cuda.is_available()


def pinned_or_auto(pin_mem: bool) -> Optional[bool]:
    """``--pin-mem``: pinned; without it None, which pins whenever CUDA is available (``resolve_pin_memory``)."""
    return True if pin_mem else None


DATASET_KINDS = ('', 'wds', 'hfds', 'hfids')  # timm's --dataset TYPE/NAME types read here: image folders,
                                              # WebDataset tar shards, Hugging Face datasets (map-style, streamed)


@dataclass
class DatasetConfig:
    """Where the images are: ``root/<split>/<class>/<image>``, a text-list split (see loaders.dataset) or tar
    shards (``dataset='wds/NAME'``, or found in ``root`` without a split folder; see loaders.shards)."""
    root: str = flag('--data-dir', default='', metavar='DIR',
                     help='root with one folder per split, class subfolders (hfds/: the datasets cache folder)')
    dataset: str = flag('--dataset', default='', metavar='TYPE/NAME',
                        help="'wds/NAME': WebDataset tar shards + _info.json in --data-dir (found without it too); "
                             "'hfds/NAME' ('hfids/NAME': streamed): a Hugging Face dataset (Hub id, or a local "
                             "folder of data/<split>-*.parquet); '' = image folder")
    train_split: str = flag('--train-split', default='train', help='training split folder')
    val_split: str = flag('--val-split', default='validation', help="eval split folder ('val' is found too); '' = none")
    class_map: str = flag('--class-map', default='', metavar='FILE',
                          help='class names in index order (.txt: one a line; .pkl: name -> index; as given or under '
                               "--data-dir); default: timm's folder order (natural sort), or the order a resumed "
                               'checkpoint records')
    cache_dir: Optional[str] = None     # cache the folder index here (never inside the data folder)
    input_img_mode: Optional[str] = flag('--input-img-mode', default=None, metavar='MODE',
                                         help='image mode: RGB (the only one here: the model takes 3 channels)')
    input_key: Optional[str] = flag('--input-key', default=None, metavar='EXTS',
                                    help="tar shards: the image member, e.g. 'jpg;png;webp' (the first a sample has; "
                                         'default: any image)')
    target_key: Optional[str] = flag('--target-key', default=None, metavar='FIELD',
                                     help="tar shards: the label, a field of the sample's .json (a.b for a nested "
                                          "one; default: its .cls, or _info.json's alt_label)")

    def validate(self, name: Optional[Callable[[str], str]] = None) -> None:
        p = Problems(name)
        kind, sep, name = self.dataset.partition('/')
        p.need(bool(self.root) or kind.lower() in ('hfds', 'hfids'), 'root', 'is required')
        p.need(not sep or kind.lower() in DATASET_KINDS + ('folder', 'imagefolder'), 'dataset',
               f"type {kind!r} is not read here: use wds/NAME (tar shards), hfds/NAME or hfids/NAME (Hugging Face "
               "datasets) or "
               "leave it empty (image folder)")
        p.need(kind.lower() not in ('hfds', 'hfids') or bool(name), 'dataset',
               f'{kind}/ needs a name: a Hub dataset id or a local folder')
        p.need(self.input_img_mode in (None, 'RGB'), 'input_img_mode',
               f'{self.input_img_mode}: images are decoded to RGB here (the model takes 3 channels)')
        p.raise_any()


@dataclass
class TrainLoaderConfig:
    """One training step = one sequence length L and patch size P; ``batch_size`` images at the longest L,
    so every step holds about ``batch_size x max(seq_lens)`` tokens (timm's token budget)."""
    seq_lens: Tuple[int, ...] = flag('--naflex-train-seq-lens', default=(128, 256, 576, 784, 1024),
                                     help='training sequence lengths, one drawn per step')
    batch_size: int = flag('-b', '--batch-size', default=128,
                           help='per-process images per step at the longest sequence length (token budget b x max L)')
    patch_size: int = 16                                  # the model's (set by the trainer)
    patch_sizes: Optional[Tuple[int, ...]] = flag('--naflex-patch-sizes', default=None,
                                                  help='variable patch sizes (FlexiViT)')
    patch_size_probs: Optional[Tuple[float, ...]] = flag('--naflex-patch-size-probs', default=None,
                                                         help='patch size weights')
    num_workers: int = flag('-j', '--workers', default=4, group='run', help='loader worker processes per rank')
    seed: int = same_flag('--seed', default=42)
    packing: bool = flag('--no-naflex-packing', default=True, invert=True,
                         help='timm-style padded batches instead of packed sequences')
    pin_memory: Optional[bool] = flag('--pin-mem', default=None, group='run', convert=pinned_or_auto,
                                      help='pin host memory (always on for CUDA)')
    persistent_workers: bool = True
    prefetch_factor: int = 2
    num_samples: Optional[int] = flag('--train-num-samples', default=None, group='dataset', metavar='N',
                                      help="samples per training epoch (default: the split's; fewer: another random "
                                           'subset each epoch, more: the shuffled order wraps around)')
    shuffle_buffer: int = flag('--wds-shuffle-buffer', default=2048, group='dataset', metavar='N',
                               help='streamed shards (--data-dir URL): samples of each window of N consecutive '
                                    'ones per loader worker come out in a random order (0 or 1: shard order only)')
    aug_repeats: int = flag('--aug-repeats', default=0, group='aug',
                            help='repeated augmentation: copies of each image per epoch, on different ranks (0 = off)')

    def validate(self, name: Optional[Callable[[str], str]] = None) -> None:
        p = Problems(name)
        p.need(bool(self.seq_lens) and all(L > 0 for L in self.seq_lens), 'seq_lens', 'must be > 0')
        p.need(self.batch_size >= 1, 'batch_size', 'must be >= 1')
        p.need(self.num_workers >= 0, 'num_workers', 'must be >= 0')
        p.need(self.num_samples is None or self.num_samples >= 1, 'num_samples', 'must be >= 1')
        p.need(self.aug_repeats >= 0, 'aug_repeats', 'must be >= 0')
        p.need(self.shuffle_buffer >= 0, 'shuffle_buffer', 'must be >= 0')
        p.need(self.patch_size >= 1 and all(s >= 1 for s in self.patch_sizes or ()), 'patch_sizes', 'must be >= 1')
        p.need(self.patch_size_probs is None or (
            bool(self.patch_sizes) and len(self.patch_size_probs) == len(self.patch_sizes)
            and all(w >= 0 for w in self.patch_size_probs) and sum(self.patch_size_probs) > 0),
            'patch_size_probs',
            f'needs {p.name("patch_sizes")} with the same number of values (weights >= 0, not all 0)')
        p.raise_any()


@dataclass
class EvalLoaderConfig:
    """Eval batches: every image once, aspect kept, resized to the largest patch grid within ``max_seq_len``."""
    max_seq_len: int = flag('--naflex-max-seq-len', default=576, help='eval sequence length')
    batch_size: int = flag('-vb', '--validation-batch-size', default=256, cli_default=None,
                           help='eval batch size (default -b)')
    patch_size: int = 16                # the model's (set by the trainer)
    num_workers: int = same_flag('--workers', default=4)
    packing: bool = same_flag('--no-naflex-packing', default=True, invert=True)
    interpolation: str = 'bicubic'      # the model's eval interpolation (timm: bicubic for NaFlexViT)
    draft: bool = False                 # JPEG reduced-DCT decoding (off: same pixels as timm)
    exif_orientation: bool = same_flag('--exif-orientation', default=False)
    pin_memory: Optional[bool] = same_flag('--pin-mem', default=None, convert=pinned_or_auto)
    num_samples: Optional[int] = flag('--val-num-samples', default=None, group='dataset', metavar='N',
                                      help='evaluate the first N images of the eval split (default: all)')

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
