"""The CUDA training path proven on a machine without a GPU (tests/fake_cuda.py says how and where it stops).

On fake CUDA tensors: the loader's batches through the device prefetcher (pinned, non-blocking copies, normalised
on the device), then the trainer's per-step path (forward under autocast, loss, the loss scale, backward, gradient
clipping, the optimizer or fp16 GradScaler step, EMA, lr schedule, device-side metrics) for every attention backend
the trainer can pick on CUDA, in bf16 and fp16. Each fails on a device or dtype mismatch (the fake mode raises), on
a CPU tensor made or read inside the step, on a host sync, and on a flash-attention contract the varlen kernel
would reject (cu_seqlens int32, contiguous, [B+1]; q/k/v one half dtype, [T, H, Dh]). The backward graph runs on
fake CPU tensors (the engine needs no driver there) with the same backends and autocast dtypes: no data-dependent
op, and a float32 gradient for every parameter. What only a GPU shows (kernel numerics, cuDNN dispatch, speed):
docs/performance.md.
"""
import pytest
import torch

import naflex
from fake_cuda import StepAudit, fake_cuda, stand_in_backward
from loaders import prefetch
from loaders.packing import pack, pad
from naflex.model import batch as B
from naflex.train.config import OptimConfig, ScheduleConfig, TrainConfig
from naflex.train.engine import TrainState, Trainer
from naflex.train.metrics import TrainMetrics
from naflex.train.optim import ModelEma, create_optimizer
from naflex.train.schedule import create_schedule

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
NUM_CLASSES = 10
# (h, w) patch grids per step: an image over 128 tokens (the length above which torch may pick cuDNN for varlen),
# a one-token image, both aspect ratios
STEPS = [[(9, 16), (3, 5), (1, 1), (4, 4)], [(2, 7), (6, 6), (12, 3)], [(5, 5), (1, 9)]]
AMP = {'bf16': torch.bfloat16, 'fp16': torch.float16}
TRAIN_BACKENDS = ('auto', 'varlen', 'sdpa_padded', 'sdpa_dense')  # flex trains compiled only: a GPU test


def host_batches(packing=True, patch_size=16, soft=True, seed=0):
    """What the train loader hands the prefetcher: uint8 patches packed (or padded to the step's L) + targets."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for grids in STEPS:
        imgs = [torch.randint(0, 256, (h * patch_size, w * patch_size, 3), dtype=torch.uint8, generator=g)
                for h, w in grids]
        L = max(h * w for h, w in grids)
        inputs = pack(imgs, patch_size, seq_len=L) if packing else pad(imgs, patch_size, seq_len=L)
        target = (torch.softmax(torch.randn(len(grids), NUM_CLASSES, generator=g), -1) if soft
                  else torch.randint(0, NUM_CLASSES, (len(grids),), generator=g))
        out.append((inputs, target))
    return out


class StandInCopyStream:
    """loaders.prefetch.CudaCopyStream needs a driver to make its stream; this one keeps the hand-over order."""

    def __init__(self, device):
        self.handed_over = []

    def start(self):
        pass

    def queue(self):
        import contextlib
        return contextlib.nullcontext()

    def mark_ready(self):
        return None

    def hand_over(self, ready, tensors):
        self.handed_over.append(list(tensors))


def to_fake_device(batches, monkeypatch, dtype=torch.float32):
    """The batches through loaders.DevicePrefetcher on 'cuda' (stand-in stream; pin_memory recorded, since pinning
    needs a driver). Returns (device batches, the audit of the copies, number of tensors pinned)."""
    pinned = []
    monkeypatch.setattr(prefetch, 'CudaCopyStream', StandInCopyStream)
    monkeypatch.setattr(torch.Tensor, 'pin_memory', lambda t, *a, **k: pinned.append(t) or t)
    pf = prefetch.DevicePrefetcher(batches, 'cuda', MEAN, STD, dtype=dtype)
    audit = StepAudit()
    with audit:
        out = list(pf)
    monkeypatch.undo()
    return out, audit, len(pinned), pf.copy_stream


def make_trainer(model, amp, opt='nadamw', clip_grad=1.0, ema=None, **train_kw):
    """What train.py builds around a model already on the device (optimizer, schedule, Trainer; ``ema`` made
    before the model moved: a deep copy of fake tensors would belong to another fake mode). Optimizers that leave
    ``foreach`` to the device (timm's NAdamW, torch's without a fused kernel) pick it for plain CUDA tensors; fake
    tensors are a tensor subclass, so the test asks for it as a GPU gets it."""
    optimizer = create_optimizer(model, OptimConfig(opt=opt, lr=3e-4, weight_decay=0.1))
    if optimizer.defaults.get('foreach', False) is None and not optimizer.defaults.get('fused'):
        optimizer = create_optimizer(model, OptimConfig(opt=opt, lr=3e-4, weight_decay=0.1, kwargs={'foreach': True}))
    sched_cfg = ScheduleConfig(epochs=2, warmup_epochs=1, on_updates=True)
    schedule, _ = create_schedule(sched_cfg, optimizer, updates_per_epoch=len(STEPS))
    cfg = TrainConfig(device='cuda', amp=True, amp_dtype={'bf16': 'bfloat16', 'fp16': 'float16'}[amp],
                      loss_scale='linear', **train_kw)
    return Trainer(model, optimizer, cfg, batch_size_reference=4, schedule=schedule, clip_grad=clip_grad,
                   ema=ema)


def run_steps(trainer, batches, audit):
    """train_one_epoch's per-step body (naflex.train.engine) on each batch, with no log step in between; the audit
    is told which step each op belongs to. Returns the logits dtype and the losses."""
    state = TrainState()
    metrics = TrainMetrics(trainer.device, len(batches))
    losses, syncs_per_step = [], []
    for step, (inputs, target) in enumerate(batches):
        before = len(audit.syncs)
        B.pop_bad_files(inputs)
        with audit:
            loss = trainer.backward(inputs, target, micro_steps=1, update=True)
            metrics.add(step, loss, inputs)
            trainer.update(state)
        losses.append(loss)
        syncs_per_step.append(len(audit.syncs) - before)
    assert state.num_updates == len(batches)
    return losses, syncs_per_step


def fake_step(model_name, backend, amp, monkeypatch, packing=True, opt='nadamw', soft=True, train_kw=None,
              **model_kwargs):
    """The whole per-step path of ``model_name`` on fake CUDA; returns the audit and what it saw."""
    model = naflex.create_model(model_name, num_classes=NUM_CLASSES, drop_path_rate=0.1, **model_kwargs)
    model.set_attn_backend(backend)
    ema = ModelEma(model, 0.999)  # copied on the host, moved below (see make_trainer)
    with fake_cuda() as mode:
        batches, copies, num_pinned, stream = to_fake_device(host_batches(packing, soft=soft), monkeypatch)
        ema.module.to('cuda')
        model.to('cuda').train()
        trainer = make_trainer(model, amp, opt, ema=ema, **(train_kw or {}))
        patch, losses_seen = stand_in_backward(model.parameters())
        audit = StepAudit()
        mode.allow_non_fake_inputs = False  # a real (host) tensor reached inside the step raises
        with patch:
            losses, syncs_per_step = run_steps(trainer, batches, audit)
        logits = [c for c in audit.calls if c.op == 'aten.addmm'][-1].args  # the head: the last linear layer
    return dict(audit=audit, copies=copies, num_pinned=num_pinned, batches=batches, losses=losses,
                losses_seen=losses_seen, syncs_per_step=syncs_per_step, trainer=trainer, model=model,
                head_args=logits, stream=stream)


def check_varlen_contract(audit, batches, dtype, num_prefix_tokens):
    """Every varlen call gets what flash attention takes: q/k/v [T, H, Dh] of one half dtype on the device, cu_seqlens
    int32 [B+1] contiguous on the device, max_seqlen a host int: the longest image plus the prefix tokens."""
    calls = audit.ops('torch_attn._varlen_attn')
    assert calls, 'the varlen kernel was not called'
    expected = [(B.num_images(x) + 1, int(x['max_seqlen']) + num_prefix_tokens) for x, _ in batches]
    for call in calls:
        q, k, v, cu_q, cu_k = call.args[:5]
        assert q[1] == k[1] == v[1] == dtype, (q, k, v)
        assert len(q[0]) == 3 and q[0] == k[0] == v[0] and q[2] == 'cuda', q
        assert q[0][-1] % 8 == 0, 'flash attention and cuDNN want the head dim a multiple of 8'
        for cu in (cu_q, cu_k):
            assert cu[1] == torch.int32 and len(cu[0]) == 1 and cu[3] and cu[2] == 'cuda', cu
        max_q, max_k = call.scalars[:2]
        assert isinstance(max_q, int) and max_q == max_k
        assert (cu_q[0][0], max_q) in expected, ((cu_q[0][0], max_q), expected)


# ------------------------------------------------------------------------------------------------ the prefetcher
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_prefetcher_on_fake_cuda(monkeypatch, dtype):
    """Each host tensor is pinned and copied with non_blocking=True; patches become `dtype` on the device; every
    other tensor keeps its dtype; host metadata stays host ints; every tensor of a batch is handed over."""
    host = host_batches()
    with fake_cuda():
        batches, audit, num_pinned, stream = to_fake_device(host, monkeypatch, dtype)
        num_tensors = sum(1 + sum(torch.is_tensor(v) for v in x.values()) for x, _ in host)
        assert num_pinned == num_tensors and len(audit.h2d_copies) == num_tensors
        assert all(non_blocking for _, non_blocking in audit.h2d_copies), audit.h2d_copies
        assert not audit.syncs
        for (x, t), (hx, ht) in zip(batches, host):
            assert x['patches'].dtype == dtype and x['patches'].shape == hx['patches'].shape
            for k, v in hx.items():
                if torch.is_tensor(v):
                    assert x[k].device.type == 'cuda' and (k == 'patches' or x[k].dtype == v.dtype), k
                else:
                    assert x[k] == v and not torch.is_tensor(x[k]), k
            assert t.device.type == 'cuda' and t.dtype == ht.dtype
        assert [len(ts) for ts in stream.handed_over] == [1 + sum(torch.is_tensor(v) for v in x.values())
                                                          for x, _ in host]


# ------------------------------------------------------------------------------------ the step, every backend
@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
@pytest.mark.parametrize('backend', TRAIN_BACKENDS)
def test_train_step_on_fake_cuda(backend, amp, monkeypatch):
    """Forward, loss, (stand-in) backward, clip, timm's NAdamW, EMA, schedule, metrics: no mismatch, nothing on
    the host.
    bf16 never syncs; fp16 syncs once per update (GradScaler reads its inf flag), the one documented exception."""
    r = fake_step('naflexvit_tiny_test', backend, amp, monkeypatch, qk_norm=True)  # fp32 q/k under autocast
    audit = r['audit']
    audit.assert_clean(allowed_syncs=len(STEPS) if amp == 'fp16' else 0)
    assert r['syncs_per_step'] == [1 if amp == 'fp16' else 0] * len(STEPS)
    assert all('aten._local_scalar_dense' in s for s in audit.syncs)
    assert audit.ops('_foreach_addcdiv_')  # timm's NAdamW took its foreach path, as on a GPU
    assert r['head_args'][0][1] == AMP[amp]  # the classifier ran in the autocast dtype
    assert len(r['losses_seen']) == len(STEPS)
    for loss in r['losses']:
        assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.device.type == 'cuda'
    for p in r['model'].parameters():
        assert p.device.type == 'cuda' and p.dtype == torch.float32 and p.grad is None  # zero_grad(set_to_none)
    for state in r['trainer'].optimizer.state.values():
        for k, v in state.items():
            assert v.device.type == 'cuda' or v.dim() == 0, k  # moments on the device, step counters host scalars
    resolved = {'auto': 'varlen'}.get(backend, backend)
    if resolved == 'varlen':
        check_varlen_contract(audit, r['batches'], AMP[amp], r['model'].num_prefix_tokens)
    else:  # SDPA; fake tensors take its math path (choosing a fused kernel asks the device)
        assert not audit.ops('varlen') and audit.ops('aten._safe_softmax')


def test_padded_batches_step_on_fake_cuda(monkeypatch):
    """timm's padded layout (--no-naflex-packing): SDPA with a key mask, same guarantees."""
    r = fake_step('naflexvit_tiny_test', 'auto', 'bf16', monkeypatch, packing=False)
    r['audit'].assert_clean()
    assert not r['audit'].ops('varlen') and r['audit'].ops('aten._safe_softmax')


@pytest.mark.parametrize('packing', [True, False])
def test_patch_drop_step_on_fake_cuda(packing, monkeypatch):
    """Patch dropout in training steps: no host sync, on packed and padded batches. Packed, flash attention gets
    the kept tokens only: cu_seqlens of B+1 entries over B + floor((T - B)(1 - p)) patches plus the prefix tokens,
    and max_seqlen the host bound of the longest image's kept tokens."""
    from naflex.model.patch_drop import packed_max_kept, packed_num_kept
    r = fake_step('naflexvit_tiny_test', 'varlen', 'bf16', monkeypatch, packing=packing, patch_drop_rate=0.5)
    r['audit'].assert_clean()
    assert r['syncs_per_step'] == [0] * len(STEPS)
    if not packing:
        return
    npre = r['model'].num_prefix_tokens
    expected = set()
    for x, _ in r['batches']:
        n, t = B.num_images(x), x['patches'].shape[0]
        expected.add((packed_num_kept(t, n, 0.5) + n * npre, n + 1, packed_max_kept(int(x['max_seqlen']), 0.5) + npre))
    calls = r['audit'].ops('torch_attn._varlen_attn')
    seen = {(call.args[0][0][0], call.args[3][0][0], call.scalars[0]) for call in calls}
    assert calls and seen == expected, (seen, expected)


def test_hard_targets_and_fused_adamw_on_fake_cuda(monkeypatch):
    """Without MixUp the targets are class indices (label-smoothing CE). AdamW is the fused kernel on CUDA, which
    takes the GradScaler's scale and inf flag on the device: fp16 with adamw never syncs, gradient clipping
    included."""
    r = fake_step('naflexvit_tiny_test', 'varlen', 'fp16', monkeypatch, opt='adamw', soft=False)
    assert r['trainer'].clip_grad == 1.0
    r['audit'].assert_clean()
    assert r['audit'].ops('_fused_adamw')


# timm optimizers whose step reads a device value on the host per parameter (AdamP / SGDP's projection test,
# NovoGrad's per-layer norm): timm's code, documented in docs/training.md. The other ones a run picks most (and all
# that ran on fake tensors when measured, see docs/training.md) step without a host sync.
SYNCING_OPTIMIZERS = ('adamp', 'novograd')


@pytest.mark.parametrize('opt', ['adamw', 'lamb', 'lion', 'adopt', 'radamw', 'adafactorbv', *SYNCING_OPTIMIZERS])
def test_timm_optimizers_host_syncs_in_bf16(opt, monkeypatch):
    """bf16 steps with other timm optimizers (their foreach path where they have one, as on a GPU): no host sync,
    except the documented ones, which read once per parameter tensor."""
    r = fake_step('naflexvit_tiny_test', 'sdpa_dense', 'bf16', monkeypatch, opt=opt)
    num_params = len(list(r['model'].parameters()))
    if opt in SYNCING_OPTIMIZERS:
        assert all(num_params / 2 <= n <= 2 * num_params for n in r['syncs_per_step']), r['syncs_per_step']
    else:
        r['audit'].assert_clean()


@pytest.mark.parametrize('soft', [True, False])
def test_bce_loss_on_fake_cuda(soft, monkeypatch):
    """--bce-loss (timm's BinaryCrossEntropy, its pos_weight buffer on the device) on MixUp targets and on smoothed
    class indices: no host sync in bf16, nothing on the host."""
    r = fake_step('naflexvit_tiny_test', 'auto', 'bf16', monkeypatch, soft=soft,
                  train_kw=dict(bce_loss=True, bce_pos_weight=2.0, bce_target_thresh=0.2, smoothing=0.1))
    r['audit'].assert_clean()
    assert r['audit'].ops('binary_cross_entropy_with_logits')


@pytest.mark.slow
@pytest.mark.parametrize('packing', [True, False])
def test_rope_step_on_fake_cuda(packing, monkeypatch):
    """RoPE with per-block learned frequencies ('mixed'), train-time coordinate augmentation, the EVA block's
    separate q / k / v and SwiGLU, and patch dropout: positions per token on the device (augmentation drawn there
    too), no host sync; flash attention gets q / k rotated and back in the autocast dtype."""
    r = fake_step('naflexvit_tiny_test', 'varlen', 'bf16', monkeypatch, packing=packing, patch_drop_rate=0.25,
                  rope_type='mixed', rope_temperature=10.0, rope_shift_coords=1.0, rope_jitter_coords=1.2,
                  rope_rescale_coords=1.5, qkv_fused=False, swiglu_mlp=True)
    r['audit'].assert_clean()
    assert r['syncs_per_step'] == [0] * len(STEPS)
    assert r['audit'].ops('aten.sin') and r['audit'].ops('aten.uniform') + r['audit'].ops('aten.rand')
    if packing:
        assert all(a[1] == torch.bfloat16 for call in r['audit'].ops('torch_attn._varlen_attn')
                   for a in call.args[:3])


def test_base_model_step_on_fake_cuda(monkeypatch):
    """The model card's model (NaFlexViT-B/16) on the card's path: varlen, bf16, no host sync, nothing on the host."""
    r = fake_step('naflexvit_base_patch16_gap', 'auto', 'bf16', monkeypatch)
    r['audit'].assert_clean()
    check_varlen_contract(r['audit'], r['batches'], torch.bfloat16, r['model'].num_prefix_tokens)


def test_flex_forward_on_fake_cuda(monkeypatch):
    """FlexAttention (evaluation, no grad: its eager autograd needs a GPU): the BlockMask is built on the device
    without a sync; the model's forward reaches the kernel with device tensors of the autocast dtype. (Eager flex
    compiles itself, which refuses a dispatch mode: the kernel call is checked by a wrapper instead.)"""
    from naflex.model import attention
    model = naflex.create_model('naflexvit_tiny_test', num_classes=NUM_CLASSES, attn_backend='flex').eval()
    real_flex, kernel_inputs = attention._flex, []

    def recording_flex():
        create_block_mask, flex_attention = real_flex()

        def kernel(q, k, v, **kwargs):
            kernel_inputs.append([(t.device.type, t.dtype, t.is_contiguous()) for t in (q, k, v)])
            return flex_attention(q, k, v, **kwargs)
        return create_block_mask, kernel
    monkeypatch.setattr(attention, '_flex', recording_flex)
    with fake_cuda() as mode:
        batches, *_ = to_fake_device(host_batches(), monkeypatch)
        monkeypatch.setattr(attention, '_flex', recording_flex)
        model.to('cuda')
        mode.allow_non_fake_inputs = False
        x = batches[0][0]
        audit = StepAudit()
        with audit:
            seg = torch.repeat_interleave(torch.arange(B.num_images(x), device='cuda'), x['seq_lens'].long(),
                                          output_size=x['patches'].shape[0])
            attention.AttnContext.packed_from('flex', seg, x['cu_seqlens'], x['max_seqlen'], B.num_images(x),
                                              'cuda', torch.bfloat16)
        audit.assert_clean()
        with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
            outs = [model(x) for x, _ in batches]
    assert len(kernel_inputs) == len(batches) * len(model.blocks)
    assert all(k == [('cuda', torch.bfloat16, True)] * 3 for k in kernel_inputs), kernel_inputs[0]
    assert all(o.device.type == 'cuda' and o.shape[-1] == NUM_CLASSES for o in outs)


# ------------------------------------------------------------------------------------- backward, on fake CPU
@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
@pytest.mark.parametrize('backend', ['varlen', 'sdpa_padded', 'sdpa_dense'])
def test_backward_graph_on_fake_cpu(backend, amp):
    """The backward pass the engine would run on the GPU, run on fake CPU tensors with the same backend and
    autocast dtype: no data-dependent op (each would be a host sync on a GPU), a float32 gradient for every
    parameter, and varlen's backward kernel given its contract."""
    model = naflex.create_model('naflexvit_tiny_test_map', num_classes=NUM_CLASSES, drop_path_rate=0.1,
                                qk_norm=True)
    model.set_attn_backend(backend)
    batches = host_batches()
    with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
        audit = StepAudit()
        for inputs, target in batches:
            inputs = dict(inputs, patches=prefetch.normalize_patches(
                inputs['patches'], torch.tensor(MEAN), torch.tensor(STD)))
            B.pop_bad_files(inputs)
            with torch.autocast('cpu', dtype=AMP[amp]):
                logits = model(inputs)
            loss = torch.sum(-target * torch.log_softmax(logits.float(), -1), -1).mean()
            with audit:
                loss.backward()
        assert not audit.syncs and not audit.ops('_local_scalar_dense')
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.shape == p.shape, name
    if backend == 'varlen':
        calls = audit.ops('torch_attn._varlen_attn_backward')
        assert len(calls) == len(batches) * len(model.blocks)
        for call in calls:
            assert all(a[1] == AMP[amp] for a in call.args[:4]), call.args[:4]  # grad_out, q, k, v
            assert [a[1] for a in call.args if len(a[0]) == 1 and a[1] == torch.int32]


# --------------------------------------------------------------------------- the checks themselves can fail
def test_audit_catches_a_host_sync_a_cpu_tensor_and_a_bad_cu_seqlens(monkeypatch):
    model = naflex.create_model('naflexvit_tiny_test', num_classes=NUM_CLASSES, attn_backend='varlen')
    from naflex.model import attention
    real_attend = attention.attend

    def item_in_forward(q, k, v, ctx, dropout_p=0.0):
        ctx.cu_seqlens.max().item()  # a planted host sync
        return real_attend(q, k, v, ctx, dropout_p)

    def int64_cu_seqlens(q, k, v, ctx, dropout_p=0.0):
        ctx.cu_seqlens = ctx.cu_seqlens.long()  # planted: flash attention wants int32
        return real_attend(q, k, v, ctx, dropout_p)

    def host_arange(q, k, v, ctx, dropout_p=0.0):
        torch.arange(q.shape[0])  # planted: a CPU tensor made in the step
        return real_attend(q, k, v, ctx, dropout_p)

    host = host_batches()
    host_coord = host[0][0]['patch_coord'].clone()  # a real host tensor, made outside the fake mode
    with fake_cuda() as mode:
        batches, *_ = to_fake_device(host, monkeypatch)
        model.to('cuda')
        mode.allow_non_fake_inputs = False
        for planted, check in ((item_in_forward, lambda a: a.assert_clean()),
                               (host_arange, lambda a: a.assert_clean()),
                               (int64_cu_seqlens, lambda a: check_varlen_contract(a, batches, torch.bfloat16, 4))):
            monkeypatch.setattr('naflex.model.blocks.attend', planted)  # the standard block's attention
            audit = StepAudit()
            with audit, torch.autocast('cuda', dtype=torch.bfloat16):
                model(batches[0][0])
            with pytest.raises(AssertionError):
                check(audit)
            monkeypatch.undo()
        with pytest.raises(Exception, match='FakeTensor|fake'):  # reaching a host tensor inside the step raises
            model(dict(batches[0][0], patch_coord=host_coord))


def test_autocast_is_really_on_under_fake_cuda():
    """Without fake_cuda's switch, torch.autocast('cuda') turns itself off on a machine with no GPU: a 'bf16'
    fake step would have run in fp32 and proven nothing about bf16."""
    w = torch.randn(8, 8)
    with FakeMode() as mode:
        x = mode.from_tensor(w).to('cuda')
        with pytest.warns(UserWarning, match='Disabling autocast'), torch.autocast('cuda', dtype=torch.bfloat16):
            assert (x @ x).dtype == torch.float32
    with fake_cuda():
        x = w.to('cuda')
        with torch.autocast('cuda', dtype=torch.bfloat16):
            assert (x @ x).dtype == torch.bfloat16


def FakeMode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode(allow_non_fake_inputs=True)
