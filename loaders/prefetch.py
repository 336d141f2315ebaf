"""Device prefetch + normalisation for NaFlex batches (tokens stay uint8 until the device; SigLIP 2
arXiv:2502.14786 / NaViT arXiv:2307.06304 inputs).

``DevicePrefetcher(loader, device, mean, std)`` iterates ``loader`` one batch ahead: on CUDA it pins the
host tensors (unless the DataLoader already did), copies them with ``non_blocking=True`` on a side stream,
and normalises ``patches`` there to float with augment.device_ops.normalize_patches: ``(p / 255 - mean[c]) /
std[c]`` with ``c = last-dim index % 3`` (P-P-C layout). An event is recorded on the side stream right after
each batch's copy; when a batch is handed out the consumer stream waits on that batch's own event only, so step
k never waits for the copy of batch k+1 that is already queued behind it. Handed-out tensors are
``record_stream``-ed so the allocator does not reuse them early. On CPU the same code runs synchronously (used
by the tests). A ``--device-aug`` step (encoded bytes and drawn parameters: loaders.device_worker) is decoded and
augmented into the packed batch first, in the same place (loaders.device_step), so on CUDA it overlaps the previous
step's compute like the copy does. Non-tensor entries ('max_seqlen', 'patch_size', 'bad_files') pass through.
``len``/``set_epoch``/``set_start_step`` forward to the loader.
"""
from __future__ import annotations

from typing import Dict, Iterable, Sequence, Tuple

import torch

from augment.device_ops import normalize_patches

__all__ = ['CudaCopyStream', 'DevicePrefetcher', 'normalize_patches']


class CudaCopyStream:
    """The side stream the prefetcher copies on, and the hand-over of one batch to the consumer stream.

    Kept apart from the prefetcher's loop so that the ordering (which event each hand-over waits on) can be
    checked with a stand-in object where no GPU is present.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def start(self) -> None:
        """Order the side stream after the consumer's work so far (mean / std were made on the consumer)."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def queue(self):
        """Context in which the copy of one batch is queued on the side stream."""
        return torch.cuda.stream(self.stream)

    def mark_ready(self) -> torch.cuda.Event:
        """An event that completes when everything queued so far (this batch's copy) has run."""
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def hand_over(self, ready: torch.cuda.Event, tensors: Iterable[torch.Tensor]) -> None:
        """The consumer waits for this batch's copy only; its tensors are now in use on the consumer stream."""
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(ready)
        for t in tensors:
            t.record_stream(consumer)


class DevicePrefetcher:
    def __init__(self, loader, device, mean: Sequence[float], std: Sequence[float],
                 dtype: torch.dtype = torch.float32):
        self.loader = loader
        self.device = torch.device(device)
        self.dtype = dtype
        self.mean = torch.tensor([float(m) for m in mean], device=self.device)
        self.std = torch.tensor([float(s) for s in std], device=self.device)
        self.is_cuda = self.device.type == 'cuda'
        self.copy_stream = CudaCopyStream(self.device) if self.is_cuda else None
        self.augmenter = None  # loaders.device_step.DeviceAugmenter, made for the first --device-aug step

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch: int):
        self.loader.set_epoch(epoch)

    def set_start_step(self, step: int):
        self.loader.set_start_step(step)

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        """Host -> device, asynchronous from pinned memory on CUDA (pinned here unless the DataLoader did); a tensor
        already on a device (made there by a --device-aug step) stays as it is."""
        if t.device.type != 'cpu':
            return t
        if self.is_cuda and not t.is_pinned():
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _to_device(self, batch) -> Tuple[Dict, torch.Tensor]:
        inputs, target = batch
        if 'device_aug_plan' in inputs:  # a --device-aug step: bytes + parameters -> the packed batch
            if self.augmenter is None:
                from .device_step import DeviceAugmenter
                self.augmenter = DeviceAugmenter(self.device)
            inputs = self.augmenter(inputs, copy=self._copy)
        out = {k: self._copy(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        out['patches'] = normalize_patches(out['patches'], self.mean, self.std, self.dtype)
        return out, self._copy(target)

    def __iter__(self):
        if self.copy_stream is None:
            for batch in self.loader:
                yield self._to_device(batch)
            return
        side = self.copy_stream
        side.start()
        pending = None  # (batch on the device, the event that marks the end of its copy)
        for batch in self.loader:
            with side.queue():
                on_device = self._to_device(batch)
            ready = side.mark_ready()  # recorded before the next batch's copy is queued
            if pending is not None:
                yield self._hand_over(*pending)
            pending = on_device, ready
        if pending is not None:
            yield self._hand_over(*pending)

    def _hand_over(self, batch, ready):
        inputs, target = batch
        tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)] + [target]
        self.copy_stream.hand_over(ready, tensors)
        return inputs, target
