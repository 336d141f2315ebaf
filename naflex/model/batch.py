"""The batch contract: what a NaFlex batch holds, packed or padded, and the questions every consumer asks of it.

The loaders produce these dicts (``loaders/packing.py``), the model consumes them, and the trainer's step,
evaluation and bad-file bookkeeping read them; this module is the one place that knows the layouts.

Packed (NaViT's "patch n' pack", arXiv:2307.06304; every image's tokens back to back, no padding):
    ``patches``      uint8 / float [T, P*P*C]  (P-P-C order, channel fastest)
    ``patch_coord``  int [T, 2]   (y, x) of each patch in its image's grid
    ``seq_lens``     int32 [B]    patches per image;  ``cu_seqlens`` int32 [B+1] their running sum
    ``grid_sizes``   int32 [B, 2] (h, w) patch grid of each image
    ``max_seqlen``   int          the longest image (host metadata: attention kernels need it without a sync)
    ``patch_size``   int          P of this batch (FlexiViT, arXiv:2212.08013: may change per step)
    ``seq_len``      int          the step's sequence length L (eval: the max length), when the loader knows it
Padded (timm's NaFlex layout, SigLIP 2 arXiv:2502.14786):
    ``patches`` [B, N, P*P*C] (or [B, N, Ph, Pw, C]), ``patch_coord`` int [B, N, 2], ``patch_valid`` bool [B, N],
    ``patch_size`` int; N is the step's L.
Both may carry ``bad_files`` (list of paths the loader replaced or dropped); the trainer's step pops it (and
counts it) before the model sees the batch. A plain image tensor [B, C, H, W] is accepted wherever a batch is.

Every function here reads shapes and host metadata only: none of them synchronises with the device.
"""
from typing import List, Optional, Union

import torch

Batch = Union[dict, torch.Tensor]

PACKED_KEYS = ('patches', 'patch_coord', 'seq_lens', 'cu_seqlens', 'grid_sizes', 'max_seqlen', 'patch_size')
PADDED_KEYS = ('patches', 'patch_coord', 'patch_valid', 'patch_size')


def is_packed(inputs: Batch) -> bool:
    """True for the packed layout (``seq_lens`` / ``cu_seqlens`` present, or 2-D patches)."""
    return isinstance(inputs, dict) and (
        'seq_lens' in inputs or 'cu_seqlens' in inputs or inputs['patches'].ndim == 2)


def num_images(inputs: Batch) -> int:
    """Images in the batch (from shapes: no sync)."""
    if not isinstance(inputs, dict):
        return int(inputs.shape[0])
    if 'seq_lens' in inputs:
        return int(inputs['seq_lens'].shape[0])
    if 'cu_seqlens' in inputs:
        return int(inputs['cu_seqlens'].shape[0]) - 1
    return int(inputs['patches'].shape[0])


def valid_tokens(inputs: Batch) -> torch.Tensor:
    """Real (non-padding) patch tokens as a 0-d device tensor (no sync); 0 for image tensors."""
    if not isinstance(inputs, dict):
        return torch.zeros((), dtype=torch.long, device=inputs.device)
    if 'seq_lens' in inputs:
        return inputs['seq_lens'].sum()
    if 'patch_valid' in inputs:
        return inputs['patch_valid'].sum()
    if 'cu_seqlens' in inputs:
        return inputs['cu_seqlens'][-1]
    patches = inputs['patches']
    return torch.full((), patches.shape[0] * patches.shape[1], device=patches.device)


def seq_len(inputs: Batch) -> Optional[int]:
    """The step's sequence length L: the loader's ``seq_len`` entry, the padded length, else None."""
    if not isinstance(inputs, dict):
        return None
    if 'seq_len' in inputs:
        return int(inputs['seq_len'])
    if not is_packed(inputs):
        return int(inputs['patches'].shape[1])
    return None


def describe_seq_len(inputs: Batch) -> str:
    """L for messages; a packed batch built without the loader only knows its longest image."""
    L = seq_len(inputs)
    if L is not None:
        return str(L)
    if is_packed(inputs):
        return f"unknown (longest image {int(inputs.get('max_seqlen', 0))} tokens)"
    return 'n/a (image tensor)'


def bad_files(inputs: Batch) -> List[str]:
    """The loader's list of replaced / dropped files, left in the batch (empty when there is none)."""
    if not isinstance(inputs, dict):
        return []
    return list(inputs.get('bad_files', None) or [])


def pop_bad_files(inputs: Batch) -> List[str]:
    """Remove and return the loader's list of replaced / dropped files (empty when there is none)."""
    if not isinstance(inputs, dict):
        return []
    return list(inputs.pop('bad_files', None) or [])


def grid_coords(h: int, w: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """[h*w, 2] row-major (y, x) coordinates of a full h x w patch grid (the order ``patch_coord`` uses)."""
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    return torch.stack([ys, xs], dim=1)
