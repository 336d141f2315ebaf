"""Our trainer's optimizer is timm train.py's: for every timm optimizer that runs on a CPU, the parameter groups and
the weights after a few steps equal ``create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)``
for the same flags; nadamw is timm's NAdamW bit for bit over 50 training steps of the trainer; clipping is timm's
(agc without the classifier); fused kernels only where torch has them on CUDA; EMA as timm's ModelEmaV3."""
import random

import pytest
import torch
import torch.nn.functional as F
from timm.models import model_parameters
from timm.optim import NAdamW, create_optimizer_v2, list_optimizers, optimizer_kwargs
from timm.utils import dispatch_clip_grad
from timm.utils.model_ema import ModelEmaV3

import naflex
from naflex.train.cli import build_parser, check_args
from naflex.train.engine import TrainState, Trainer, train_one_epoch
from naflex.train.optim import ModelEma, create_optimizer, cuda_only
from test_ddp import GRIDS, make_packed

# Needs a CUDA device and apex / bitsandbytes (timm asserts both); refused by our flag check (no double backward
# through the attention kernels); the rest runs here.
NOT_ON_CPU = [n for n in list_optimizers() if cuda_only(n)] + ['adahessian']
ON_CPU = [n for n in list_optimizers() if n not in NOT_ON_CPU] + ['lookahead_adamw', 'lookahead_nadamw']
# timm's Kron with its default max_size_triangular (2048) asks for a 9 GiB preconditioner for the 64 x 768 patch
# embedding, and smaller triangular ones take half a minute per step on 2 CPU cores: both sides get diagonal ones
EXTRA = {'kron': ['--opt-kwargs', 'max_size_triangular=0']}
EXTRA.update({n: EXTRA['kron'] for n in ('kronc', 'kronw')})


def _flags(*argv):
    """train.py's parsed flags (their names are timm train.py's attribute names) and our checked Config."""
    parser = build_parser()
    args = parser.parse_args(['--data-dir', 'x', '--device', 'cpu', *argv])
    return args, check_args(args, parser)


def _model():
    torch.manual_seed(0)
    return naflex.create_model('naflexvit_tiny_test', num_classes=4)


def _both(*argv):
    """(our model and optimizer, timm's model and optimizer) for the same train.py flags."""
    args, cfg = _flags(*argv)
    ours_m, timm_m = _model(), _model()
    ours = create_optimizer(ours_m, cfg.optim, cfg.optim.resolved_lr(256))
    ref = create_optimizer_v2(timm_m, **optimizer_kwargs(cfg=args), **args.opt_kwargs)  # timm train.py's call
    return (ours_m, ours), (timm_m, ref)


def _groups(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return [({k: v for k, v in g.items() if k != 'params'}, [names[id(p)] for p in g['params']])
            for g in optimizer.param_groups]


def _steps(model, optimizer, num_steps=3):
    """``num_steps`` optimizer steps on the same synthetic gradients, from the same random state."""
    torch.manual_seed(1)
    random.seed(1)
    g = torch.Generator().manual_seed(2)
    for _ in range(num_steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) if p.requires_grad else None
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize('name', ON_CPU)
def test_every_timm_optimizer_equals_timms(name, monkeypatch):
    if name.startswith('kron'):  # Kron torch.compiles its kernels per shape: minutes on a CPU; both sides eager
        monkeypatch.setattr('timm.optim.kron.has_dynamo', False)
    (ours_m, ours), (timm_m, ref) = _both('--opt', name, '--lr', '1e-2', '--weight-decay', '0.05',
                                          *EXTRA.get(name, ()))
    assert type(ours) is type(ref)
    assert _groups(ours_m, ours) == _groups(timm_m, ref)
    got, want = _steps(ours_m, ours), _steps(timm_m, ref)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize('argv', [
    ['--opt', 'nadamw', '--layer-decay', '0.75', '--opt-eps', '1e-6', '--opt-betas', '0.9', '0.95'],
    ['--opt', 'adamw', '--layer-decay', '0.6', '--layer-decay-min-scale', '0.3', '--opt-kwargs', 'amsgrad=True'],
    ['--opt', 'sgd', '--momentum', '0.8', '--weight-decay', '0', '--layer-decay', '0.5',
     '--layer-decay-no-opt-scale', '0.2'],
    ['--opt', 'adan', '--opt-betas', '0.98', '0.92', '0.99'],
    ['--opt', 'lion', '--opt-betas', '0.95', '0.98', '--opt-kwargs', 'caution=True'],
    ['--opt', 'lamb', '--opt-kwargs', 'trust_clip=True', 'always_adapt=True'],
])
def test_timm_flags_and_opt_kwargs(argv):
    """--layer-decay (groups from the model's group_matcher), --opt-eps/--opt-betas/--momentum, --opt-kwargs."""
    (ours_m, ours), (timm_m, ref) = _both('--lr', '3e-3', *argv)
    assert _groups(ours_m, ours) == _groups(timm_m, ref)
    assert [p.requires_grad for p in ours_m.parameters()] == [p.requires_grad for p in timm_m.parameters()]
    got, want = _steps(ours_m, ours), _steps(timm_m, ref)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_param_groups_exclude_1d_and_no_weight_decay_names():
    (model, opt), _ = _both('--opt', 'adamw', '--lr', '1e-3', '--weight-decay', '0.1')
    wd = {n: g['weight_decay'] for g, names in _groups(model, opt) for n in names}
    named = set(model.no_weight_decay()) & set(wd)
    assert {'embeds.pos_embed', 'embeds.reg_token'} <= named and all(wd[n] == 0.0 for n in named)
    assert wd['blocks.0.norm1.weight'] == wd['head.bias'] == 0.0
    assert wd['blocks.0.attn.qkv.bias'] == 0.0 and wd['blocks.0.attn.qkv.weight'] == 0.1


@pytest.mark.parametrize('clip', [[], ['--clip-grad', '0.02', '--clip-mode', 'agc'],
                                  ['--clip-grad', '0.5', '--clip-mode', 'norm']])
def test_nadamw_is_timms_bit_for_bit_over_50_steps(clip):
    """50 updates of the trainer (--opt nadamw, the card's weight decay, clipping) vs timm's NAdamW from
    create_optimizer_v2 in timm train.py's step (loss, backward, dispatch_clip_grad, step): the same weights, bit
    for bit. torch's NAdam with a constant momentum (what nadamw was before) differs from the first step."""
    args, cfg = _flags('--opt', 'nadamw', '--lr', '1e-2', '--weight-decay', '.1', '--smoothing', '0',
                       '--naflex-loss-scale', 'none', *clip)
    batches = [make_packed(GRIDS, seed) for seed in range(50)]
    ours_m, timm_m = _model(), _model()
    trainer = Trainer(ours_m, create_optimizer(ours_m, cfg.optim, cfg.optim.lr), cfg.train, batch_size_reference=8,
                      clip_grad=cfg.optim.clip_grad, clip_mode=cfg.optim.clip_mode)
    train_one_epoch(trainer, iter(batches), len(batches), TrainState())
    ref = create_optimizer_v2(timm_m, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    assert isinstance(ref, NAdamW) and type(trainer.optimizer) is NAdamW
    for inputs, target in batches:
        F.cross_entropy(timm_m(inputs), target).backward()
        if args.clip_grad is not None:
            dispatch_clip_grad(model_parameters(timm_m, exclude_head='agc' in args.clip_mode), args.clip_grad,
                               mode=args.clip_mode)
        ref.step()
        ref.zero_grad()
    moved = False
    for (k, a), b in zip(ours_m.state_dict().items(), timm_m.state_dict().values()):
        assert torch.equal(a, b), k
        moved = moved or not torch.equal(a, _model().state_dict()[k])
    assert moved


def test_fused_kernels_on_cuda_only_where_torch_has_them():
    """On CUDA, torch's SGD / Adam / AdamW get fused=True; timm's own optimizers (NAdamW, ...) keep timm's choice
    (foreach); --opt-kwargs foreach=... or fused=... wins; a CPU run is exactly timm's call."""
    from fake_cuda import fake_cuda
    cases = [('sgd', True), ('momentum', True), ('nesterov', True), ('adam', True), ('adamw', True),
             ('nadamw', None), ('radamw', None), ('lamb', None)]
    models = [_model() for _ in range(len(cases) + 1)]  # made on the host: fake tensors are moved in
    with fake_cuda():
        for (name, fused), model in zip(cases, models):
            _, cfg = _flags('--opt', name, '--lr', '1e-3')
            assert create_optimizer(model.to('cuda'), cfg.optim).defaults.get('fused') == fused, name
        _, cfg = _flags('--opt', 'adamw', '--lr', '1e-3', '--opt-kwargs', 'foreach=True')
        opt = create_optimizer(models[-1].to('cuda'), cfg.optim)
        assert (opt.defaults['fused'], opt.defaults['foreach']) == (None, True)
    _, cfg = _flags('--opt', 'adamw', '--lr', '1e-3')
    assert create_optimizer(_model(), cfg.optim).defaults['fused'] is None


@pytest.mark.parametrize('name', ['nadamw', 'lamb', 'adan', 'lookahead_adamw', 'adafactorbv', 'sgd'])
def test_resume_continues_the_optimizer_exactly(name, tmp_path):
    """16 steps in one go == 8 steps, a training checkpoint (saved, loaded weights_only), a new optimizer from the
    flags restored from it, 8 more steps: the optimizer's progress (per-parameter state, and the step counters
    timm's Lamb, Adan and Lookahead keep in their param groups; Lookahead's second slow update is at step 12)
    comes back; the settings are the flags'."""
    from naflex.train.checkpoint import TrainState, atomic_save, load_checkpoint, restore_training, training_checkpoint
    _, cfg = _flags('--opt', name, '--lr', '1e-2', '--weight-decay', '0.05')
    grads = [[torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * i + j)) for j, p in
              enumerate(_model().parameters())] for i in range(16)]

    def run(model, optimizer, steps):
        for step_grads in steps:
            for p, g in zip(model.parameters(), step_grads):
                p.grad = g.clone()
            optimizer.step()
            optimizer.zero_grad()

    whole = _model()
    run(whole, create_optimizer(whole, cfg.optim), grads)
    first = _model()
    opt = create_optimizer(first, cfg.optim)
    run(first, opt, grads[:8])
    atomic_save(training_checkpoint(Trainer(first, opt, cfg.train, batch_size_reference=1),
                                    TrainState(epoch=1, num_updates=8)), tmp_path / 'c.pth')
    second = _model()
    opt = create_optimizer(second, cfg.optim)
    restore_training(Trainer(second, opt, cfg.train, batch_size_reference=1), load_checkpoint(tmp_path / 'c.pth'),
                     opt=name)
    run(second, opt, grads[8:])
    for (k, a), b in zip(second.state_dict().items(), whole.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize('warmup', [False, True])
def test_ema_matches_timm(warmup):
    model = _model()
    ours, ref = ModelEma(model, decay=0.9, warmup=warmup), ModelEmaV3(model, decay=0.9, use_warmup=warmup)
    for step in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update(model, step), ref.update(model, step)
    for (k, a), b in zip(ours.module.state_dict().items(), ref.module.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
