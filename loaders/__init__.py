"""NaFlex data loading: image folders -> packed (or padded) uint8 token batches -> device.

Implements the data side of NaViT (arXiv:2307.06304: native aspect ratio, packed variable-length sequences),
FlexiViT (arXiv:2212.08013: per-step patch size) and SigLIP 2's NaFlex (arXiv:2502.14786).

Public API
----------
``create_train_loader(root, split='train', *, seq_lens=(128, 256, 576, 784, 1024), batch_size=64, patch_size=16,
    patch_sizes=None, patch_size_probs=None, num_workers=4, seed=42, rank=0, world_size=1, packing=True,
    aug=AugConfig(), mixup=None|MixupConfig, num_classes=None, epoch=0, pin_memory=None (= CUDA available),
    persistent_workers=True, prefetch_factor=2, class_order='sorted', cache_dir=None) -> TrainLoader``
    ``len(loader)`` steps per epoch (same on every rank), ``loader.set_epoch(e)``, ``loader.set_start_step(k)``
    (next pass yields steps k..len-1: exact mid-epoch resume), ``loader.set_mixup(enabled)``. Token budget = batch_size x max(seq_lens);
    a step at length L holds floor(budget / L / 8) * 8 images.
``create_eval_loader(root, split='validation', *, max_seq_len=576, batch_size=64, patch_size=16, num_workers=4,
    rank=0, world_size=1, packing=True, interpolation='bicubic', draft=False, pin_memory=None, class_order='sorted',
    cache_dir=None) -> DataLoader``
``create_loaders_from_args(args, *, rank=0, world_size=1, num_classes=None, mean=..., std=...)
    -> (train_loader, eval_loader)`` builds both from timm-named argparse flags (see loaders/args.py).
``DevicePrefetcher(loader, device, mean=(0.5,)*3, std=(0.5,)*3, dtype=torch.float32)``: batches on the
    device, patches normalised to float there.
``BadFileTracker(output_dir, max_fraction=0.01)``: ``update(inputs)`` pops 'bad_files', logs new paths once,
    appends them to output_dir/bad_files.txt, raises TooManyBadFiles past the threshold.
``ImageFolderDataset(root, split)``, ``ListDataset(samples)``, ``SeqLenSchedule``, ``pack``/``pad``.

Batches: ``(inputs, target)``. Packed inputs: {'patches': uint8 [T, P*P*3], 'patch_coord': int32 [T, 2],
'seq_lens': int32 [B], 'cu_seqlens': int32 [B+1], 'max_seqlen': int, 'grid_sizes': int32 [B, 2],
'patch_size': int, 'seq_len': int (the step's sequence length L; eval: max_seq_len), 'bad_files': list[str]}. Padded (packing=False): {'patches': uint8 [B, L, P*P*3],
'patch_coord': int64 [B, L, 2], 'patch_valid': bool [B, L], 'patch_size': int, 'bad_files': [...]}.
target: int64 [B], or float32 [B, num_classes] soft targets when MixUp/CutMix is configured.
"""
from .args import add_loader_args, create_loaders_from_args
from .bad_files import BadFileTracker, TooManyBadFiles
from .dataset import ImageFolderDataset, ListDataset
from .eval_loader import make_eval_loader
from .factory import create_eval_loader, create_train_loader
from .packing import pack, pad, patchify_hwc
from .prefetch import DevicePrefetcher, normalize_patches
from .schedule import SeqLenSchedule, batch_size_for
from .train_loader import TrainLoader

__all__ = [
    'BadFileTracker', 'DevicePrefetcher', 'add_loader_args', 'ImageFolderDataset', 'ListDataset', 'SeqLenSchedule',
    'TooManyBadFiles', 'TrainLoader', 'batch_size_for', 'create_eval_loader', 'create_loaders_from_args',
    'create_train_loader', 'make_eval_loader', 'normalize_patches', 'pack', 'pad', 'patchify_hwc',
]
