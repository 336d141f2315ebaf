"""Whether one step of a run can fit in the device's memory at all, checked before the run starts.

The model's position embedding is interpolated to any grid, so no sequence length is wrong in itself: what bounds
it is the memory of a step, which grows with its tokens. Evaluation resizes every image to fill
``--naflex-max-seq-len`` (upscaling small ones) and packs ``-vb`` of them into a step; a training step holds about
``-b x max(--naflex-train-seq-lens)`` tokens. Per token a step needs at least (a lower bound, so a run that could fit
is never refused; the real peak is several times higher):

- the normalized input patches, float32: ``4 x 3 x P^2`` bytes;
- evaluation: the residual stream and one block's MLP hidden activations, ``(D + H) x b`` bytes;
- training: the MLP hidden activations every block keeps for the backward pass, ``depth x H x b`` bytes (with
  ``--grad-checkpointing``: each block's input, ``depth x D x b``, plus one block's hidden activations),

for width D, MLP width H, and b = 2 bytes under ``--amp``, else 4. A step whose lower bound exceeds the device's
memory (the GPU's, or the machine's RAM shared by its processes) cannot run: one line says so before anything is
created, instead of a run that fails at its first evaluation, an epoch later.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import torch

from naflex.model import get_config

from .config import Config

_IN_CHANS = 3


def device_memory(device: torch.device) -> Optional[int]:
    """Bytes of memory one process can use on ``device``: the GPU's total, or the machine's RAM divided by the
    processes torchrun started on it; None where the platform does not say."""
    if device.type == 'cuda':
        return torch.cuda.get_device_properties(device).total_memory
    try:
        ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return None
    return ram // _processes_here()


def _processes_here() -> int:
    return max(1, int(os.environ.get('LOCAL_WORLD_SIZE', '1')))


def describe(device: torch.device) -> str:
    """What ``device_memory`` measured, for messages."""
    if device.type == 'cuda':
        return f'{device} ({torch.cuda.get_device_name(device)})'
    n = _processes_here()
    return 'the RAM' + (f' per process ({n} on this machine)' if n > 1 else '')


def _gib(num_bytes: float) -> str:
    return f'{num_bytes / 2 ** 30:,.1f} GiB'


def _ways(*ways: str) -> str:
    ways = [w for w in ways if w]
    return ways[0] if len(ways) == 1 else f'{", ".join(ways[:-1])}, or {ways[-1]}'


def step_memory_problem(cfg: Config, memory: Optional[int], device: str) -> Optional[str]:
    """The line for an evaluation or training step whose lower-bound memory (module docstring) exceeds ``memory``
    bytes of ``device``; None when both can fit, or the memory is unknown. ``cfg.model.kwargs`` must be the ones
    the model is built with (on --resume: the checkpoint's)."""
    if not memory:
        return None
    model = dataclasses.replace(get_config(cfg.model.name), **cfg.model.kwargs)
    width, hidden, b = model.embed_dim, int(model.embed_dim * model.mlp_ratio), 2 if cfg.train.amp else 4
    has = f'{device} has {_gib(memory)}'
    if cfg.data.val_split:
        L, batch, patch = cfg.eval.max_seq_len, cfg.eval.batch_size, model.patch_size
        need = batch * L * (4 * _IN_CHANS * patch ** 2 + (width + hidden) * b)
        if need > memory:
            side, fits = round(math.sqrt(L) * patch), batch * memory // need
            return (f'--naflex-max-seq-len {L}: an evaluation step of -vb {batch} images x {L} tokens = {batch * L:,} '
                    f'tokens (every image is resized to fill the length: about {side} x {side} px at patch {patch}) '
                    f'needs more than {_gib(need)} for {cfg.model.name}, and {has}; ' + _ways(
                        'lower --naflex-max-seq-len (the model card evaluates at 576)',
                        fits and f'-vb (it defaults to -b; above {fits} it cannot fit)'))
    L, batch = max(cfg.loader.seq_lens), cfg.loader.batch_size
    patch = min(cfg.loader.patch_sizes or (model.patch_size,))
    kept = model.depth * hidden  # per token, what the blocks keep for the backward pass
    if cfg.model.grad_checkpointing:
        kept = model.depth * width + hidden  # block inputs, and one block recomputed at a time
    need = batch * L * (4 * _IN_CHANS * patch ** 2 + kept * b)
    if need <= memory:
        return None
    with_checkpointing = batch * L * (4 * _IN_CHANS * patch ** 2 + (model.depth * width + hidden) * b)
    fits = batch * memory // need
    return (f'--naflex-train-seq-lens {" ".join(map(str, cfg.loader.seq_lens))}: a training step of -b {batch} x '
            f'longest sequence {L} = {batch * L:,} tokens needs more than {_gib(need)} for {cfg.model.name} (the '
            f'activations its blocks keep for the backward pass), and {has}; ' + _ways(
                fits and f'lower -b (above {fits} it cannot fit)', f'drop {L} from --naflex-train-seq-lens',
                not cfg.model.grad_checkpointing and with_checkpointing <= memory and 'add --grad-checkpointing'))


def oom_message(cfg: Config, evaluating: bool = False) -> str:
    """The line for a step that ran out of device memory anyway (the lower bound above fitted), naming the flags
    that size that kind of step."""
    if evaluating:
        b, L = cfg.eval.batch_size, cfg.eval.max_seq_len
        return (f'out of GPU memory in evaluation with -vb {b} x --naflex-max-seq-len {L} = {b * L} tokens per step: '
                f'lower -vb (e.g. -vb {max(1, b // 2)}; it defaults to -b) or --naflex-max-seq-len')
    b, longest = cfg.loader.batch_size, max(cfg.loader.seq_lens)
    return (f'out of GPU memory with -b {b} x longest sequence {longest} = {b * longest} tokens per step: lower -b '
            f'(e.g. -b {max(1, b // 2)}), drop {longest} from --naflex-train-seq-lens, or add --grad-checkpointing')
