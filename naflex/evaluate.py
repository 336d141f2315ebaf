"""Evaluation loop for NaFlex models: top-1/top-5/loss and throughput over an eval loader, torchrun-sharded.

Used by ``validate.py`` (any number of sequence lengths) and by ``train.py`` once per epoch. The loader yields
``(inputs, target)`` batches in the packed layout (default: every image's patch tokens concatenated, no
padding -- the NaViT "patch n' pack" idea, arXiv:2307.06304) or timm's padded layout; both give the same
metrics. Images are resized with the NaFlex eval rule (aspect kept, largest patch grid within the sequence
length; SigLIP 2 arXiv:2502.14786) by the loader, not here.

Metric sums (loss, correct@1, correct@5, images, valid tokens, bad files) are accumulated on the device
without host syncs and all-reduced once at the end, so with torchrun every image is counted exactly once as
long as the loader's sampler gives each image to exactly one rank (loaders.create_eval_loader does).
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["evaluate", "count_valid_tokens"]


def count_valid_tokens(inputs) -> torch.Tensor:
    """Number of real (non-padding) patch tokens in a batch, as a 0-d tensor (no host sync)."""
    if isinstance(inputs, dict):
        if "seq_lens" in inputs:
            return inputs["seq_lens"].sum()
        if "patch_valid" in inputs:
            return inputs["patch_valid"].sum()
        patches = inputs["patches"]
        return torch.full((), patches.shape[0] * patches.shape[1], device=patches.device)
    # Plain image tensor: no token notion; count pixels / 256 would be arbitrary, so report 0.
    return torch.zeros((), dtype=torch.long, device=inputs.device)


def _device_batches(loader: Iterable, device: torch.device, mean, std):
    """Wrap a CPU loader in loaders.DevicePrefetcher unless it already yields device-normalized batches."""
    from loaders import DevicePrefetcher

    if isinstance(loader, DevicePrefetcher) or getattr(loader, "yields_device_batches", False):
        return loader
    return DevicePrefetcher(loader, device, mean, std)


@torch.inference_mode()
def evaluate(
        model: torch.nn.Module,
        loader: Iterable,
        device,
        amp_dtype: Optional[torch.dtype] = None,
        world_size: Optional[int] = None,
        mean=None,
        std=None,
        log_interval: int = 0,
        collect_logits: bool = False,
        logger=None,
) -> dict:
    """Run ``model`` over ``loader`` once and return metrics (identical on every rank).

    Args:
        model: module taking the loader's input dict (packed or padded) and returning logits [B, C].
        loader: CPU loader yielding (inputs, target) with uint8 patches (it is wrapped in
            loaders.DevicePrefetcher here), or a DevicePrefetcher already.
        device: torch device.
        amp_dtype: torch.bfloat16 / torch.float16 for autocast, None for full precision.
        world_size: processes to reduce over; None = torch.distributed's world size when initialized, else 1.
        mean, std: normalization (default: model.pretrained_cfg's, else ImageNet's).
        log_interval: print progress every N batches on rank 0 (0 = quiet).
        collect_logits: also return 'logits' [N, C] and 'targets' [N] (float32/int64 on CPU, in loader
            order, this rank's images only) -- for tests and analysis.

    Returns:
        dict with top1, top5 (percent), loss (mean cross-entropy), images, valid_tokens, bad_files (count),
        bad_file_paths (this rank's), time_s, images_per_s, valid_tokens_per_s.
    """
    device = torch.device(device)
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world_size > 1 else 0
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(mean if mean is not None else cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(std if std is not None else cfg.get("std", (0.229, 0.224, 0.225)))
    was_training = model.training
    model.eval()
    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                else nullcontext())

    # Sums kept on the device as float64 (exact for counts up to 2^53): loss, top1, top5, images, tokens.
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    bad_paths: list[str] = []
    logits_out, targets_out = [], []
    start = time.perf_counter()
    num_batches = 0
    for inputs, target in _device_batches(loader, device, mean, std):
        if isinstance(inputs, dict):
            bad_paths.extend(inputs.get("bad_files", ()) or ())
        if target.shape[0] == 0:  # every file of this batch failed to decode (shape is host-side: no sync)
            continue
        with autocast:
            output = model(inputs)
        output = output.float()
        if target.ndim == 2:  # soft targets: score against the argmax class
            loss = torch.sum(-target * F.log_softmax(output, dim=-1), dim=-1).sum()
            target = target.argmax(dim=-1)
        else:
            loss = F.cross_entropy(output, target, reduction="sum")
        k = min(5, output.shape[-1])
        topk = output.topk(k, dim=-1).indices
        hit = topk == target[:, None]
        sums += torch.stack([
            loss.double(), hit[:, 0].sum().double(), hit.any(dim=-1).sum().double(),
            torch.full((), float(target.shape[0]), dtype=torch.float64, device=device),  # fill kernel, no copy
            count_valid_tokens(inputs).double(),
        ])
        if collect_logits:
            logits_out.append(output.cpu())
            targets_out.append(target.cpu())
        num_batches += 1
        if log_interval and rank == 0 and num_batches % log_interval == 0:
            msg = f"eval: batch {num_batches}" + (f"/{len(loader)}" if hasattr(loader, "__len__") else "")
            (logger.info if logger else print)(msg)

    bad = torch.tensor([float(len(bad_paths))], dtype=torch.float64, device=device)
    totals = torch.cat([sums, bad])
    if world_size > 1:
        # gloo and nccl both reduce float64; one collective for all metrics.
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    if world_size > 1:
        t = torch.tensor([elapsed], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        elapsed = float(t.item())
    loss_sum, c1, c5, n, tokens, nbad = totals.tolist()
    model.train(was_training)
    denom = max(n, 1.0)
    result = {
        "top1": 100.0 * c1 / denom,
        "top5": 100.0 * c5 / denom,
        "loss": loss_sum / denom,
        "images": int(n),
        "valid_tokens": int(tokens),
        "bad_files": int(nbad),
        "bad_file_paths": bad_paths,
        "time_s": elapsed,
        "images_per_s": n / elapsed if elapsed > 0 else 0.0,
        "valid_tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
    }
    if collect_logits:
        C = getattr(model, "num_classes", 0)
        result["logits"] = torch.cat(logits_out) if logits_out else torch.zeros(0, C)
        result["targets"] = torch.cat(targets_out) if targets_out else torch.zeros(0, dtype=torch.long)
    return result
