"""NaFlex data loading: image folders or tar shards -> packed (or padded) uint8 token batches -> device.
Imports only augment/.

Implements the data side of NaViT (arXiv:2307.06304: native aspect ratio, packed variable-length sequences),
FlexiViT (arXiv:2212.08013: per-step patch size) and SigLIP 2's NaFlex (arXiv:2502.14786).

Public API
----------
``DatasetConfig``, ``TrainLoaderConfig``, ``EvalLoaderConfig`` (loaders.config): the defaults, ``validate()``.
``create_train_loader(root_or_dataset, split='train', cfg=None, *, aug=AugConfig, mixup=MixupConfig|None,
    num_classes=None, rank=0, world_size=1, epoch=0, **cfg_fields) -> TrainLoader``: ``len(loader)`` steps per
    epoch (same on every rank), ``loader.set_epoch(e)``, ``loader.set_start_step(k)`` (the next pass yields steps
    k..len-1: exact mid-epoch resume). Token budget = batch_size x max(seq_lens); a step at length L holds
    floor(budget / L / 8) * 8 images.
``create_eval_loader(root_or_dataset, split='validation', cfg=None, *, rank=0, world_size=1, **cfg_fields)``
    (``make_eval_loader(dataset, ...)`` for a dataset object): every image of this rank's shard once; a split that
    cannot be scored whole (a tar shard cut short) is ``IncompleteSplit`` (``require_whole(dataset)`` checks).
``DevicePrefetcher(loader, device, mean, std, dtype=torch.float32)``: batches on the device, patches normalised
    to float there; a ``--device-aug`` step (``AugConfig.device_aug``: bytes and drawn parameters from the workers,
    loaders.device_worker) is decoded and augmented into the packed batch there first (loaders.device_step).
``ImageFolderDataset(root, split)``, ``ShardDataset(root, split)`` (WebDataset tar shards, timm's ``wds/NAME``),
``HfDataset(name, split)`` (Hugging Face datasets, timm's ``hfds/NAME``; loaders.hfds), ``ListDataset(samples)``,
``StreamSource`` (streamed shards: a URL, bucket or ``file://`` root, or ``hfids/NAME``; loaders.stream, whose layout
the two factories above follow when given one),
``open_dataset(root, split, classes=, dataset=)``, ``SeqLenSchedule``, ``pack``/``pad``.
Class indices are timm's (natural order of the class names), or a class map's (``read_class_map(path, root)``:
timm's ``--class-map`` file; ``classes=`` of the datasets).

Batches are ``(inputs, target)`` in the layouts ``naflex.model.batch`` specifies (packed by default, timm's padded
layout with ``packing=False``), with ``'bad_files'`` listing the files a step replaced (train) or dropped (eval).
target: int64 [B], or float32 [B, num_classes] soft targets when MixUp/CutMix is configured.
"""
from .config import DatasetConfig, EvalLoaderConfig, TrainLoaderConfig
from .dataset import ImageFolderDataset, ListDataset, read_class_map
from .eval_loader import IncompleteSplit, make_eval_loader, require_whole
from .factory import create_eval_loader, create_train_loader, open_dataset
from .packing import pack, pad, patchify_hwc
from .prefetch import DevicePrefetcher, normalize_patches
from .schedule import SeqLenSchedule, batch_size_for
from .shards import ShardDataset, dataset_kind
from .stream import StreamSource
from .train_loader import TrainLoader, UndecodableFiles

__all__ = [
    'DatasetConfig', 'DevicePrefetcher', 'EvalLoaderConfig', 'ImageFolderDataset', 'IncompleteSplit', 'ListDataset',
    'SeqLenSchedule', 'ShardDataset', 'StreamSource', 'TrainLoader', 'TrainLoaderConfig', 'UndecodableFiles',
    'batch_size_for', 'create_eval_loader', 'create_train_loader', 'dataset_kind', 'make_eval_loader',
    'normalize_patches', 'open_dataset', 'pack', 'pad', 'patchify_hwc', 'read_class_map', 'require_whole',
]
