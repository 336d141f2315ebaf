"""Attention backends (naflex.model.attention): every backend that runs here equals the dense block-diagonal
reference, alone and inside the model (NaViT packing, arXiv:2307.06304)."""
import pytest
import torch
import torch.nn.functional as F

import naflex
from naflex.model import attention
from naflex.model.attention import AttnContext, attend, available_backends, resolve_backend

from test_model import GRIDS, TOL, assert_batches_match, make_batches, maxdiff, pair

LENS = [5, 1, 17, 9, 130]  # includes a length-1 image and one longer than FlexAttention's 128 block


def _packed_qkv(lens, heads=2, dim=8, device='cpu', dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lens)
    q, k, v = (torch.randn(total, heads, dim, generator=g).to(device, dtype) for _ in range(3))
    cu = F.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(device)
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)).to(device)
    return q, k, v, cu, seg


def _per_image_reference(q, k, v, cu):
    outs = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qi, ki, vi = (t[s:e].transpose(0, 1)[None].float() for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qi, ki, vi)[0].transpose(0, 1))
    return torch.cat(outs)


def _run(backend, q, k, v, cu, seg):
    ctx = AttnContext.packed_from(backend, seg, cu, max(LENS), len(LENS), q.device, q.dtype)
    return attend(q, k, v, ctx)


@pytest.mark.parametrize('backend', ['sdpa_dense', 'sdpa_padded', 'flex'])
def test_backend_equals_per_image_attention(backend):
    q, k, v, cu, seg = _packed_qkv(LENS)
    out = _run(backend, q, k, v, cu, seg)
    assert out.shape == q.shape
    torch.testing.assert_close(out, _per_image_reference(q, k, v, cu), atol=1e-5, rtol=1e-5)


def _run_with_backend(backend, q, k, v, cu, seg):
    ctx = AttnContext.packed_from(backend, seg, cu, max(LENS), len(LENS), q.device, q.dtype)
    return attend(q, k, v, ctx), ctx.backend


def test_flex_compiled_cpu(monkeypatch, recwarn):
    """FlexAttention compiled on CPU (the fast path on GPUs) gives the same result, and stays FlexAttention above
    the size where eager flex falls back (compiled, nothing T x T is materialised)."""
    monkeypatch.setattr(attention, 'FLEX_EAGER_MAX_TOKENS', sum(LENS) - 1)
    q, k, v, cu, seg = _packed_qkv(LENS)
    compiled = torch.compile(_run_with_backend, fullgraph=True)
    out, used = compiled('flex', q, k, v, cu, seg)
    assert used == 'flex' and not [w for w in recwarn if 'flex' in str(w.message)]
    torch.testing.assert_close(out, _per_image_reference(q, k, v, cu), atol=1e-5, rtol=1e-5)


def test_eager_flex_falls_back_above_the_limit(monkeypatch):
    """Eager FlexAttention materialises T x T: above FLEX_EAGER_MAX_TOKENS a packed batch runs on the 'auto'
    backend with a warning naming the alternatives; small batches keep the eager reference math."""
    monkeypatch.setattr(attention, 'FLEX_EAGER_MAX_TOKENS', sum(LENS) - 1)
    q, k, v, cu, seg = _packed_qkv(LENS)
    with pytest.warns(UserWarning, match=r"'flex' without torch.compile.*--torchcompile.*'varlen'.*'sdpa_padded'"):
        out, used = _run_with_backend('flex', q, k, v, cu, seg)
    assert used == 'sdpa_padded'
    torch.testing.assert_close(out, _per_image_reference(q, k, v, cu), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(attention, 'FLEX_EAGER_MAX_TOKENS', sum(LENS))
    assert _run_with_backend('flex', q, k, v, cu, seg)[1] == 'flex'
    assert attention.flex_or_fallback(sum(LENS) + 1, torch.device('cuda'), torch.bfloat16) == (
        'varlen' if attention._HAS_VARLEN else 'sdpa_padded')


def test_auto_resolution_and_errors():
    assert resolve_backend('auto', torch.device('cpu'), torch.float32) == 'sdpa_padded'
    assert resolve_backend('auto', torch.device('cpu'), torch.bfloat16) == 'sdpa_padded'
    assert resolve_backend('auto', torch.device('cuda'), torch.float32) == 'sdpa_padded'
    assert resolve_backend('flex', torch.device('cpu'), torch.float32) == 'flex'
    assert set(available_backends(torch.device('cpu'))) >= {'sdpa_dense', 'sdpa_padded', 'flex'}
    with pytest.raises(ValueError, match='sdpa_dense'):
        resolve_backend('xformers', torch.device('cpu'), torch.float32)


@pytest.mark.parametrize('backend', ['sdpa_dense', 'sdpa_padded', 'flex', 'auto'])
@torch.no_grad()
def test_model_backends_agree(backend):
    ours, ref = pair('naflexvit_tiny_test_map')
    ours.set_attn_backend(backend)
    assert_batches_match(ours, ref, GRIDS, check_padded=False)  # the padded path does not use the backend


def test_flex_backward_is_gpu_only_on_cpu():
    """torch 2.14's FlexAttention has no CPU backward: training on CPU uses an SDPA backend ('auto' does)."""
    model = naflex.create_model('naflexvit_tiny_test', attn_backend='flex')
    _, packed = make_batches(GRIDS[:2])
    with pytest.raises(NotImplementedError):
        model(packed).sum().backward()


def test_padded_backward_matches_dense():
    model = naflex.create_model('naflexvit_tiny_test_map')
    _, packed = make_batches(GRIDS[:3])
    grads = {}
    for backend in ('sdpa_dense', 'sdpa_padded'):
        model.zero_grad()
        model.set_attn_backend(backend)
        model(packed).square().mean().backward()
        grads[backend] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads['sdpa_dense'], grads['sdpa_padded']):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.cuda
def test_flex_backward_matches_dense_cuda():
    model = naflex.create_model('naflexvit_tiny_test').cuda()
    _, packed = make_batches(GRIDS[:3])
    packed = {k: v.cuda() if torch.is_tensor(v) else v for k, v in packed.items()}
    grads = {}
    for backend in ('sdpa_dense', 'flex'):
        model.zero_grad()
        model.set_attn_backend(backend)
        model(packed).square().mean().backward()
        grads[backend] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads['sdpa_dense'], grads['flex']):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_varlen_plumbing_on_cpu(monkeypatch):
    """The 'varlen' call receives flash-attention's contract (int32 cu_seqlens incl. prefix tokens, [T, H, Dh]);
    checked on CPU with a reference stand-in for the CUDA kernel."""
    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
        assert cu_q.dtype == torch.int32 and cu_q is cu_k and max_q == max_k
        assert q.ndim == 3 and q.shape == k.shape == v.shape
        assert int(cu_q[-1]) == q.shape[0] and max_q >= int((cu_q[1:] - cu_q[:-1]).max())
        calls.append(cu_q.clone())
        return _per_image_reference(q, k, v, cu_q.long())

    import naflex.model.attention as attention
    monkeypatch.setattr(attention, '_varlen_attn', fake_varlen)
    ours, ref = pair('naflexvit_tiny_test')
    padded, packed = make_batches(GRIDS)
    ours.set_attn_backend('varlen')
    assert maxdiff(ours(packed), ref(padded)) < TOL
    assert len(calls) == len(ours.blocks)
    lens = packed['seq_lens'].long() + ours.num_prefix_tokens
    assert torch.equal(calls[0].long(), F.pad(lens.cumsum(0), (1, 0)))


class Fp32Norm(torch.nn.Module):
    """A norm whose output is fp32 whatever its input, as LayerNorm's under CUDA autocast (CPU autocast keeps
    bf16, so the CPU test stands this in for qk_norm's LayerNorm)."""

    def __init__(self, norm):
        super().__init__()
        self.inner = norm

    def forward(self, x):
        return self.inner(x.float())


@torch.no_grad()
@pytest.mark.parametrize('backend', ['varlen', 'flex'])
def test_qk_norm_under_autocast_gives_kernels_one_dtype(monkeypatch, backend):
    """qk_norm=True under bf16 autocast: q / k leave the norm in fp32, v the qkv linear in bf16; the flash and
    FlexAttention kernels accept only one dtype, so q / k are cast to v's before the call."""
    seen = []

    def one_dtype_kernel(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        if not q.dtype == k.dtype == v.dtype:
            raise RuntimeError('query, key and value must have the same dtype')  # what FA2 raises, in short
        return torch.zeros_like(v)

    monkeypatch.setattr(attention, '_varlen_attn', one_dtype_kernel)
    monkeypatch.setattr(attention, '_flex', lambda: (lambda *a, **kw: None, one_dtype_kernel))
    model = naflex.create_model('naflexvit_tiny_test', qk_norm=True, attn_backend=backend).eval()
    for blk in model.blocks:
        blk.attn.q_norm, blk.attn.k_norm = Fp32Norm(blk.attn.q_norm), Fp32Norm(blk.attn.k_norm)
    _, packed = make_batches(GRIDS[:3])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        model(packed)
    assert seen == [(torch.bfloat16,) * 3] * len(model.blocks)


@pytest.mark.cuda
def test_model_qk_norm_varlen_bf16_cuda():
    """The real kernels with qk_norm=True under CUDA autocast: forward and backward run and agree with SDPA."""
    model = naflex.create_model('naflexvit_tiny_test', qk_norm=True).cuda()
    _, packed = make_batches(GRIDS)
    packed = {k: v.cuda() if torch.is_tensor(v) else v for k, v in packed.items()}
    outs = {}
    for backend in ('varlen', 'sdpa_dense', 'flex'):
        model.set_attn_backend(backend)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out = model(packed)
        out.float().square().mean().backward()
        outs[backend] = out.detach().float()
    assert maxdiff(outs['sdpa_dense'], outs['varlen']) < 5e-2 and maxdiff(outs['flex'], outs['varlen']) < 5e-2


def _traceable_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    """Flash varlen attention's contract in plain torch ops (traceable and differentiable, any device)."""
    assert q.dtype == k.dtype == v.dtype and cu_q.dtype == torch.int32 and cu_q is cu_k
    seg = torch.searchsorted(cu_q[1:].long(), torch.arange(q.shape[0], device=q.device), right=True)
    same_image = (seg[:, None] == seg[None, :])[None, None]
    out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=same_image)
    return out[0].transpose(0, 1)


@pytest.mark.slow
def test_varlen_train_step_compiles_to_one_graph(monkeypatch):
    """The GPU run's compiled step, traced on CPU with a stand-in kernel: 'varlen', bf16 autocast, qk_norm,
    drop-path, dynamic shapes. Forward and backward trace whole (fullgraph), and batches with other token and
    image counts (and max_seqlen) reuse the one graph: no recompiles in a run's timed steps."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(attention, '_varlen_attn', _traceable_varlen)
    model = naflex.create_model('naflexvit_tiny_test_map', qk_norm=True, drop_path_rate=0.1, attn_backend='varlen')
    model.train()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend='aot_eager')
    for grids in ([(3, 5), (4, 4), (2, 7)], [(9, 9), (1, 3), (2, 2), (5, 5)]):
        _, packed = make_batches(grids)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = compiled(packed)
        out.float().square().mean().backward()
        assert all(p.grad is not None for p in model.blocks.parameters())
    assert counters['stats']['unique_graphs'] == 1


@pytest.mark.cuda
def test_varlen_equals_reference_cuda():
    q, k, v, cu, seg = _packed_qkv(LENS, device='cuda', dtype=torch.bfloat16)
    ref = _per_image_reference(q, k, v, cu)
    for backend in ('varlen', 'sdpa_dense', 'sdpa_padded', 'flex', 'auto'):
        out = _run(backend, q, k, v, cu, seg)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
def test_model_varlen_bf16_cuda():
    ours, _ = pair('naflexvit_tiny_test_map')
    ours = ours.cuda()
    _, packed = make_batches(GRIDS)
    packed = {k: v.cuda() if torch.is_tensor(v) else v for k, v in packed.items()}
    outs = {}
    for backend in ('varlen', 'sdpa_dense', 'sdpa_padded', 'flex'):
        ours.set_attn_backend(backend)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            outs[backend] = ours(packed).float()
    assert resolve_backend('auto', torch.device('cuda'), torch.bfloat16) == 'varlen'
    for backend in ('sdpa_dense', 'sdpa_padded', 'flex'):
        assert maxdiff(outs[backend], outs['varlen']) < 5e-2


@pytest.mark.cuda
def test_packed_train_step_has_no_host_sync_cuda():
    """NaViT-style packed forward + backward with varlen in bf16 issues no device->host synchronisation."""
    model = naflex.create_model('naflexvit_tiny_test_map', drop_path_rate=0.1).cuda().train()
    _, packed = make_batches(GRIDS)
    packed = {k: v.cuda() if torch.is_tensor(v) else v for k, v in packed.items()}
    with torch.autocast('cuda', dtype=torch.bfloat16):
        model(packed).float().sum().backward()  # warm-up (lazy inits may sync once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        with torch.autocast('cuda', dtype=torch.bfloat16):
            model(packed).float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode('default')


@pytest.mark.cuda
def test_varlen_strided_views_over_128_tokens_match_reference_cuda():
    """q/k/v as the model hands them over (strided views of one [T, 3, H, Dh] projection), images longer than 128
    tokens, NaFlexViT-B's 12 heads of 64: where torch's varlen_attn dispatches to cuDNN on sm90 (cuDNN >= 9.18)
    rather than flash. Forward and backward equal per-image attention."""
    from torch.nn.attention import varlen as torch_varlen
    lens = [5, 1, 200, 130, 64]
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(sum(lens), 3, 12, 64, generator=g).cuda().to(torch.bfloat16).requires_grad_()
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    cu = F.pad(torch.tensor(lens).cumsum(0), (1, 0)).cuda()
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)).cuda()
    ctx = AttnContext.packed_from('varlen', seg, cu, max(lens), len(lens), q.device, q.dtype)
    out = attend(q, k, v, ctx)
    ref_qkv = qkv.detach().float().requires_grad_()
    ref = _per_image_reference(*ref_qkv.unbind(1), cu)
    cudnn = getattr(torch_varlen, '_should_use_cudnn', lambda i: False)(0)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2, msg=lambda m: f'cuDNN path {cudnn}: {m}')
    grad = torch.randn(out.shape, generator=g).cuda()
    out.float().backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(qkv.grad.float(), ref_qkv.grad, atol=5e-2, rtol=5e-2,
                               msg=lambda m: f'cuDNN path {cudnn}: {m}')
