"""Evaluation loop for NaFlex models: top-1/top-5/loss and throughput over an eval loader, torchrun-sharded.

Used by ``validate.py`` (any number of sequence lengths) and by ``train.py`` once per epoch. The loader yields
``(inputs, target)`` batches in the packed layout (default: every image's patch tokens concatenated, no
padding -- the NaViT "patch n' pack" idea, arXiv:2307.06304) or timm's padded layout; both give the same
metrics. Images are resized with the NaFlex eval rule (aspect kept, largest patch grid within the sequence
length; SigLIP 2 arXiv:2502.14786) by the loader, not here.

Metric sums (loss, correct@1, correct@5, images, valid tokens, bad files) are accumulated on the device
without host syncs and all-reduced once at the end, so with torchrun every image is counted exactly once as
long as the loader's sampler gives each image to exactly one rank (loaders.create_eval_loader does). A streamed
source lost on some rank (``stream_io.DataSourceError``) is part of that reduction, so every rank raises it.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from loaders import DevicePrefetcher
from loaders.stream_io import DataSourceError
from naflex.model import batch as B
from naflex.model import data_config

from .distributed import first_failure

__all__ = ["NoImagesEvaluated", "evaluate"]


def _device_batches(loader: Iterable, device: torch.device, mean, std):
    """Wrap a CPU loader in loaders.DevicePrefetcher unless it already yields device-normalized batches."""
    if isinstance(loader, DevicePrefetcher) or getattr(loader, "yields_device_batches", False):
        return loader
    return DevicePrefetcher(loader, device, mean, std)


def _batch_sums(output: torch.Tensor, target: torch.Tensor, inputs) -> torch.Tensor:
    """[loss sum, correct@1, correct@5, images, valid tokens] of one batch, float64 on the device (no sync)."""
    output = output.float()
    if target.ndim == 2:  # soft targets: score against the argmax class
        loss = torch.sum(-target * F.log_softmax(output, dim=-1), dim=-1).sum()
        target = target.argmax(dim=-1)
    else:
        loss = F.cross_entropy(output, target, reduction="sum")
    hit = output.topk(min(5, output.shape[-1]), dim=-1).indices == target[:, None]
    return torch.stack([
        loss.double(), hit[:, 0].sum().double(), hit.any(dim=-1).sum().double(),
        torch.full((), float(target.shape[0]), dtype=torch.float64, device=output.device),  # fill kernel, no copy
        B.valid_tokens(inputs).double(),
    ])


def _reduce(sums: torch.Tensor, num_bad: int, lost: bool, elapsed: float, world_size: int, device) -> tuple:
    """Sum the metrics, bad files and ranks that lost their data source over ranks (one collective) and take the
    slowest rank's time."""
    totals = torch.cat([sums, torch.tensor([float(num_bad), float(lost)], dtype=torch.float64, device=device)])
    if world_size > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)  # gloo and nccl both reduce float64
        t = torch.tensor([elapsed], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        elapsed = float(t.item())
    return totals.tolist(), elapsed


class NoImagesEvaluated(RuntimeError):
    """Not a single image could be scored (an empty split, or every file undecodable): there are no metrics.
    ``bad_file_paths``: this rank's undecodable files, for the caller's bad-file list."""

    def __init__(self, message: str, bad_file_paths=()):
        super().__init__(message)
        self.bad_file_paths = list(bad_file_paths)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: Iterable, device, amp_dtype: Optional[torch.dtype] = None,
             world_size: Optional[int] = None, mean=None, std=None, log_interval: int = 0,
             collect_logits: bool = False, logger=None) -> dict:
    """Run ``model`` over ``loader`` once and return metrics (identical on every rank).

    ``loader`` yields CPU (inputs, target) batches with uint8 patches (wrapped in loaders.DevicePrefetcher here)
    or is a DevicePrefetcher already. ``mean``/``std``: normalization (default: naflex.data_config(model)).
    ``world_size``: ranks to reduce over (default: torch.distributed's, else 1). ``log_interval``: progress every
    N batches on rank 0. ``collect_logits``: also return this rank's 'logits' [N, C] and 'targets' [N] (CPU).
    Returns top1, top5 (percent), loss (mean cross-entropy), images, valid_tokens, bad_files (count),
    bad_file_paths (this rank's), time_s, images_per_s, valid_tokens_per_s.
    """
    device = torch.device(device)
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world_size > 1 else 0
    norm = data_config(model)
    mean, std = (norm["mean"] if mean is None else mean), (norm["std"] if std is None else std)
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    bad_paths: List[str] = []
    logits_out, targets_out = [], []
    start, num_batches, lost = time.perf_counter(), 0, None
    try:
        for inputs, target in _device_batches(loader, device, mean, std):
            bad_paths.extend(B.pop_bad_files(inputs))
            if target.shape[0] == 0:  # every file of this batch failed to decode (shape is host-side: no sync)
                continue
            with autocast:
                output = model(inputs)
            sums += _batch_sums(output, target, inputs)
            if collect_logits:
                logits_out.append(output.float().cpu())
                targets_out.append((target.argmax(-1) if target.ndim == 2 else target).cpu())
            num_batches += 1
            if log_interval and rank == 0 and num_batches % log_interval == 0:
                msg = f"eval: batch {num_batches}" + (f"/{len(loader)}" if hasattr(loader, "__len__") else "")
                (logger.info if logger else print)(msg)
    except DataSourceError as e:  # streamed shards whose source is gone: the other ranks still meet this rank below
        lost = e
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    (loss_sum, c1, c5, n, tokens, nbad, nlost), elapsed = _reduce(sums, len(bad_paths), lost is not None,
                                                                 time.perf_counter() - start, world_size, device)
    model.train(was_training)
    if nlost:  # every rank raises the lowest failing rank's error, none waits for the others
        raise lost if world_size == 1 else first_failure(lost)
    if n == 0:  # metrics over no image would read as a real 0 % (and could be saved as the best checkpoint)
        raise NoImagesEvaluated(
            f'evaluated no image: all {int(nbad)} files failed to decode (e.g. {", ".join(bad_paths[:3])})' if nbad
            else 'evaluated no image: the evaluation split is empty', bad_paths)
    denom = n
    result = {
        "top1": 100.0 * c1 / denom, "top5": 100.0 * c5 / denom, "loss": loss_sum / denom, "images": int(n),
        "valid_tokens": int(tokens), "bad_files": int(nbad), "bad_file_paths": bad_paths, "time_s": elapsed,
        "images_per_s": n / elapsed if elapsed > 0 else 0.0,
        "valid_tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
    }
    if collect_logits:
        C = getattr(model, "num_classes", 0)
        result["logits"] = torch.cat(logits_out) if logits_out else torch.zeros(0, C)
        result["targets"] = torch.cat(targets_out) if targets_out else torch.zeros(0, dtype=torch.long)
    return result
