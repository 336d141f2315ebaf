"""Process-group setup for ``torchrun`` (single- and multi-node) and the few collectives training needs.

One process per device; ``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous for
multi-node runs: ``--nnodes --node-rank --rdzv-endpoint``). NCCL on CUDA, gloo on CPU. Only rank 0
writes files (``is_primary``). The helpers reduce device tensors without moving them to the host.
"""
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class DeviceError(RuntimeError):
    """The requested device is not usable (e.g. --device cuda without a GPU)."""


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device('cpu')

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = 'cuda', timeout_min: int = 30) -> DistInfo:
    """Pick the device and join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    kind = device.split(':')[0]
    if kind == 'cuda':
        if not torch.cuda.is_available():
            raise DeviceError('--device cuda was asked for but no CUDA device is available; '
                              'pass --device cpu to run on the CPU')
        if world_size > 1:
            index = local_rank
        else:
            index = int(device.split(':')[1]) if ':' in device else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f'LOCAL_RANK {index} has no GPU (this node has {torch.cuda.device_count()}); '
                              'lower --nproc_per_node')
        torch.cuda.set_device(index)
        dev = torch.device('cuda', index)
    else:
        dev = torch.device('cpu')
    if world_size > 1 and not dist.is_initialized():
        backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        kwargs = {'device_id': dev} if dev.type == 'cuda' else {}
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_min), **kwargs)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op when not distributed); returns ``t``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def first_failure(error):
    """Every rank gets the error of the lowest rank that has one (``error``: this rank's or None; some rank has one),
    its message led by 'rank R of W: ' so that every rank's log says where it happened. Pickles the errors: for the
    fault path, not for every step."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    rank, first = next((r, e) for r, e in enumerate(errors) if e is not None)
    first.args = (f'rank {rank} of {len(errors)}: {first}',)
    return first


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s python object on every rank (e.g. the resolved output dir or resume path)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


@contextmanager
def primary_first():
    """Rank 0 runs the block before the other ranks do (it builds what they then read, e.g. a cached dataset
    index). Rank 0 lets the others go even when its block fails, so they fail on their own instead of hanging."""
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if multi and dist.get_rank() != 0:
        dist.barrier()
    try:
        yield
    finally:
        if multi and dist.get_rank() == 0:
            dist.barrier()
