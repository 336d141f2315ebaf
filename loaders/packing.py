"""Patchify and collate variable-size uint8 images into NaFlex batches (NaViT arXiv:2307.06304 packing).

Packed (default): all images' tokens concatenated with no padding:
  {'patches': uint8 [T, P*P*3], 'patch_coord': int32 [T, 2] (y, x), 'seq_lens': int32 [B],
   'cu_seqlens': int32 [B+1], 'max_seqlen': int, 'grid_sizes': int32 [B, 2] (h, w), 'patch_size': int,
   'seq_len': int (the step's sequence length L images were resized for; when the caller knows it)}
Padded (timm-compatible, ``packing=False``): {'patches': uint8 [B, N, P*P*3], 'patch_coord': int64 [B, N, 2],
  'patch_valid': bool [B, N], 'patch_size': int}, N = the step's sequence length (timm pads to it).

Per-patch layout is P-P-C (channel fastest), exactly timm's ``patchify_image(channels_last=True)``; an HWC
uint8 image is already in that order, so a patch is a strided view copied straight into the batch buffer.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.utils.data


def _grid(img_HWC: torch.Tensor, P: int):
    h, w, c = img_HWC.shape
    if h % P or w % P:
        raise ValueError(f"image {h}x{w} is not a multiple of patch size {P}")
    return h // P, w // P, c


def patchify_hwc(img_HWC: torch.Tensor, P: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 [gh*P, gw*P, C] -> [gh*gw, P*P*C] (row-major over the grid), written into ``out`` if given."""
    gh, gw, c = _grid(img_HWC, P)
    src = img_HWC.reshape(gh, P, gw, P, c).permute(0, 2, 1, 3, 4)
    if out is None:
        return src.reshape(gh * gw, P * P * c)
    out.view(gh, gw, P, P, c).copy_(src)
    return out


def _coords(gh: int, gw: int, dtype) -> torch.Tensor:
    ys = torch.arange(gh, dtype=dtype).repeat_interleave(gw)
    xs = torch.arange(gw, dtype=dtype).repeat(gh)
    return torch.stack([ys, xs], dim=1)


def _empty_uint8(*shape) -> torch.Tensor:
    """In a DataLoader worker, allocate straight in shared memory: the batch then crosses to the main
    process without the extra copy ``share_memory_()`` makes when a worker returns an ordinary tensor."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(*shape, dtype=torch.uint8)
    n = 1
    for s in shape:
        n *= int(s)
    storage = torch.UntypedStorage._new_shared(max(1, n))
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)


def pack(imgs: Sequence[torch.Tensor], patch_size: int, bad_files: Optional[List[str]] = None,
         seq_len: Optional[int] = None) -> Dict:
    P = patch_size
    grids = [_grid(x, P)[:2] for x in imgs]
    lens = [gh * gw for gh, gw in grids]
    total = sum(lens)
    c = imgs[0].shape[2] if imgs else 3
    patches = _empty_uint8(total, P * P * c)
    coords = torch.empty(total, 2, dtype=torch.int32)
    off = 0
    for x, (gh, gw), n in zip(imgs, grids, lens):
        patchify_hwc(x, P, patches[off:off + n])
        coords[off:off + n] = _coords(gh, gw, torch.int32)
        off += n
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    if lens:
        torch.cumsum(seq_lens, 0, out=cu[1:])
    out = {
        'patches': patches,
        'patch_coord': coords,
        'seq_lens': seq_lens,
        'cu_seqlens': cu,
        'max_seqlen': max(lens) if lens else 0,
        'grid_sizes': torch.tensor(grids, dtype=torch.int32).view(-1, 2),
        'patch_size': P,
        'bad_files': list(bad_files or []),
    }
    if seq_len is not None:  # the step's L (max_seqlen is only the longest image, usually below it)
        out['seq_len'] = int(seq_len)
    return out


def pad(imgs: Sequence[torch.Tensor], patch_size: int, seq_len: Optional[int] = None,
        bad_files: Optional[List[str]] = None) -> Dict:
    P = patch_size
    grids = [_grid(x, P)[:2] for x in imgs]
    lens = [gh * gw for gh, gw in grids]
    N = seq_len if seq_len is not None else max(lens, default=0)
    if lens and max(lens) > N:
        raise ValueError(f"an image has {max(lens)} patches > seq_len {N}")
    c = imgs[0].shape[2] if imgs else 3
    B = len(imgs)
    patches = torch.zeros(B, N, P * P * c, dtype=torch.uint8)
    coords = torch.zeros(B, N, 2, dtype=torch.int64)
    valid = torch.zeros(B, N, dtype=torch.bool)
    for i, (x, (gh, gw), n) in enumerate(zip(imgs, grids, lens)):
        patchify_hwc(x, P, patches[i, :n])
        coords[i, :n] = _coords(gh, gw, torch.int64)
        valid[i, :n] = True
    return {'patches': patches, 'patch_coord': coords, 'patch_valid': valid, 'patch_size': P,
            'bad_files': list(bad_files or [])}


def collate(imgs, patch_size: int, packing: bool, seq_len: Optional[int], bad_files=None) -> Dict:
    if packing:
        return pack(imgs, patch_size, bad_files, seq_len)
    return pad(imgs, patch_size, seq_len, bad_files)
