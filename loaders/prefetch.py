"""Device prefetch + normalisation for NaFlex batches (tokens stay uint8 until the device; SigLIP 2
arXiv:2502.14786 / NaViT arXiv:2307.06304 inputs).

``DevicePrefetcher(loader, device, mean, std)`` iterates ``loader`` one batch ahead: on CUDA it pins the
host tensors (unless the DataLoader already did), copies them with ``non_blocking=True`` on a side stream,
and normalises ``patches`` there to float: ``(p / 255 - mean[c]) / std[c]`` with ``c = last-dim index % 3``
(P-P-C layout), computed as ``p * (1 / (255 std)) - mean / std``. The consumer stream waits for the copy
stream before a batch is handed out, and tensors are ``record_stream``-ed so the allocator does not reuse them
early. On CPU the same code runs synchronously (used by the tests). Non-tensor entries ('max_seqlen',
'patch_size', 'bad_files') pass through. ``len``/``set_epoch``/``set_start_step`` forward to the loader.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch


def normalize_patches(patches: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., P*P*C] -> dtype, channel = last index % C. ``mean``/``std`` are [C] on the same device."""
    C = mean.numel()
    shape = patches.shape
    x = patches.view(*shape[:-1], shape[-1] // C, C).to(torch.float32)
    scale = 1.0 / (255.0 * std)
    shift = mean / std
    return (x * scale - shift).to(dtype).view(shape)


class DevicePrefetcher:
    def __init__(self, loader, device, mean: Sequence[float], std: Sequence[float],
                 dtype: torch.dtype = torch.float32):
        self.loader = loader
        self.device = torch.device(device)
        self.dtype = dtype
        self.mean = torch.tensor([float(m) for m in mean], device=self.device)
        self.std = torch.tensor([float(s) for s in std], device=self.device)
        self.is_cuda = self.device.type == 'cuda'
        self.stream = torch.cuda.Stream(device=self.device) if self.is_cuda else None

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch: int):
        self.loader.set_epoch(epoch)

    def set_start_step(self, step: int):
        self.loader.set_start_step(step)

    def _to_device(self, batch) -> Tuple[Dict, torch.Tensor]:
        inputs, target = batch
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                if self.is_cuda and not v.is_pinned():
                    v = v.pin_memory()
                v = v.to(self.device, non_blocking=True)
                if k == 'patches':
                    v = normalize_patches(v, self.mean, self.std, self.dtype)
            out[k] = v
        if self.is_cuda and not target.is_pinned():
            target = target.pin_memory()
        return out, target.to(self.device, non_blocking=True)

    def __iter__(self):
        if not self.is_cuda:
            for batch in self.loader:
                yield self._to_device(batch)
            return
        pending = None
        for batch in self.loader:
            with torch.cuda.stream(self.stream):
                nxt = self._to_device(batch)
            if pending is not None:
                yield self._handoff(pending)
            pending = nxt
        if pending is not None:
            yield self._handoff(pending)

    def _handoff(self, batch):
        cur = torch.cuda.current_stream(self.device)
        cur.wait_stream(self.stream)
        inputs, target = batch
        for v in list(inputs.values()) + [target]:
            if isinstance(v, torch.Tensor):
                v.record_stream(cur)
        return inputs, target
