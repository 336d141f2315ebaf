"""Running the CUDA training path on a machine without a GPU: fake tensors on device 'cuda', and an audit of the
ops they go through.

``FakeTensorMode`` (torch._subclasses.fake_tensor) gives tensors a device and dtype but no data: every op runs its
meta kernel, so shapes, dtypes and device placement are checked as on the GPU, and an op whose result depends on
the data raises. ``fake_cuda()`` enters it, and makes ``torch.autocast('cuda')`` and ``GradScaler('cuda')`` believe
CUDA is present: they switch themselves off otherwise, and a bf16 step would silently run in fp32.

``StepAudit`` is a dispatch mode entered inside the fake mode. It sees every aten op of the code under test and
records what would cost a GPU step its asynchrony or its device placement:

- ``syncs``: reading a device value on the host (``aten._local_scalar_dense``: ``.item()``, ``bool(t)``,
  ``.tolist()``; it returns a placeholder 0 so the step goes on) and device-to-host copies;
- ``host_tensors``: a CPU tensor of one or more dimensions made or read inside the step (0-d CPU tensors are host
  numbers, such as torch's optimizer step counters, and are allowed);
- ``h2d_copies``: host-to-device copies, with their ``non_blocking`` flag;
- ``calls``: every op with its tensor arguments' (shape, dtype, device, contiguous), for kernel contract checks.

Where it stops: the autograd engine needs a CUDA context to run a backward pass over CUDA tensors (its stream
bookkeeping asks the driver, ``hasPrimaryContext``), so a fake-CUDA ``loss.backward()`` cannot run here.
``stand_in_backward`` replaces it by gradients shaped as autograd would leave them; the backward graph itself is
checked on fake CPU tensors, where the engine runs (tests/test_fake_cuda.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple
from unittest import mock

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ARG_ATTRS = ('shape', 'dtype', 'device', 'contiguous')


@contextlib.contextmanager
def fake_cuda():
    """Fake-tensor mode in which CUDA tensors can be made and CUDA autocast / GradScaler are on. Yields the mode
    (``allow_non_fake_inputs`` starts True so real CPU tensors can be moved in; set it False around a step).
    timm's foreach optimizers size their chunks from the device's L2 cache, a driver query: it answers an H100's
    50 MiB."""
    from timm.optim import _helpers as timm_optim_helpers
    l2_cache = {torch.device('cuda', 0): 50 << 20, torch.device('cuda'): 50 << 20}
    with mock.patch('torch.cuda.amp.common.amp_definitely_not_available', lambda: False), \
            mock.patch('torch.cuda.is_bf16_supported', lambda *a, **k: True), \
            mock.patch.dict(timm_optim_helpers._L2_CACHE_SIZE, l2_cache), \
            FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


@dataclass
class Call:
    op: str
    args: List[Tuple]  # (shape, dtype, device, contiguous) of each tensor argument, in order
    kwargs: Dict[str, Any]
    scalars: List[Any]  # the non-tensor positional arguments


class StepAudit(TorchDispatchMode):
    supports_higher_order_operators = True  # FlexAttention is one: it is recorded and passed on like any op

    def __init__(self):
        super().__init__()
        self.syncs: List[str] = []
        self.host_tensors: List[str] = []
        self.h2d_copies: List[Tuple[str, bool]] = []
        self.calls: List[Call] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if hasattr(func, 'overloadpacket'):
            name = f'{func.namespace}.{func.overloadpacket.__name__}'
        else:
            name = getattr(func, 'name', lambda: str(func))()  # a higher-order operator
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.calls.append(Call(name, [_meta(t) for t in inputs], dict(kwargs),
                               [a for a in args if not isinstance(a, torch.Tensor)]))
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            if t.device.type != 'cpu':
                self.syncs.append(f'{name} on a {t.device.type} tensor (.item() / bool() / .tolist())')
                return False if t.dtype == torch.bool else 0 if not t.is_floating_point() else 0.0
            try:
                return func(*args, **kwargs)
            except DataDependentOutputException:  # a host number with no recorded value: not a device sync
                return False if t.dtype == torch.bool else 0
        out = func(*args, **kwargs)
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        in_devices = {t.device.type for t in inputs}
        out_devices = {t.device.type for t in outputs}
        if 'cuda' in in_devices and out_devices == {'cpu'}:
            self.syncs.append(f'{name}: device-to-host copy')
        if 'cpu' in in_devices and 'cuda' in out_devices and name in ('aten._to_copy', 'aten.copy_'):
            self.h2d_copies.append((name, bool(kwargs.get('non_blocking', False))))
        for t in inputs + outputs:
            if t.device.type == 'cpu' and t.dim() > 0:
                self.host_tensors.append(f'{name}: CPU tensor {tuple(t.shape)} {t.dtype}')
                break
        return out

    def ops(self, fragment: str) -> List[Call]:
        """The recorded calls whose op name contains ``fragment``."""
        return [c for c in self.calls if fragment in c.op]

    def assert_clean(self, allowed_syncs: int = 0) -> None:
        """No CPU tensor in the step, and no more than ``allowed_syncs`` host syncs."""
        assert not self.host_tensors, f'CPU tensors inside the step: {self.host_tensors[:5]}'
        assert len(self.syncs) <= allowed_syncs, f'host syncs: {self.syncs}'


def _meta(t: torch.Tensor) -> Tuple:
    return tuple(t.shape), t.dtype, t.device.type, t.is_contiguous()


def stand_in_backward(parameters):
    """A replacement for ``torch.Tensor.backward`` on fake CUDA tensors (see the module docstring): checks that the
    loss is a 0-d float32 device tensor with a graph, and leaves a zero gradient of each parameter's shape, dtype and
    device, accumulated as autograd would. Returns (patch, the list of losses it was called on)."""
    params = [p for p in parameters if p.requires_grad]
    seen = []

    def backward(loss, *args, **kwargs):
        assert loss.dim() == 0 and loss.dtype == torch.float32, (loss.shape, loss.dtype)
        assert loss.device.type == 'cuda' and loss.grad_fn is not None, (loss.device, loss.grad_fn)
        seen.append(loss)
        for p in params:
            g = torch.zeros_like(p)
            p.grad = g if p.grad is None else p.grad + g
    return mock.patch.object(torch.Tensor, 'backward', backward), seen
