"""Engine step semantics on synthetic packed batches: losses (timm's, --bce-loss too), timm's NaFlex loss scale,
gradient accumulation, fp16 GradScaler, EMA, clipping, and the no-host-sync rule between log steps."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import naflex
from naflex.train.config import TrainConfig
from naflex.train.engine import (TrainState, Trainer, classification_loss, loss_weight, make_loss,
                                 train_one_epoch)
from naflex.train.optim import ModelEma
from test_ddp import GRIDS, make_packed, take


def test_losses_match_timm():
    torch.manual_seed(0)
    logits, hard = torch.randn(6, 5), torch.randint(0, 5, (6,))
    soft = F.softmax(torch.randn(6, 5), -1)
    torch.testing.assert_close(classification_loss(logits, hard, 0.1), LabelSmoothingCrossEntropy(0.1)(logits, hard))
    torch.testing.assert_close(classification_loss(logits, soft, 0.1), SoftTargetCrossEntropy()(logits, soft))
    torch.testing.assert_close(classification_loss(logits, hard, 0.0), F.cross_entropy(logits, hard))


def _timm_train_loss(args, mixup_active):
    """timm train.py's choice of the training loss for these flags."""
    bce = dict(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    if mixup_active:
        return BinaryCrossEntropy(**bce) if args.bce_loss else SoftTargetCrossEntropy()
    if args.smoothing:
        return BinaryCrossEntropy(smoothing=args.smoothing, **bce) if args.bce_loss else \
            LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


@pytest.mark.parametrize('argv', [
    ['--bce-loss'],
    ['--bce-loss', '--smoothing', '0'],
    ['--bce-loss', '--bce-sum', '--bce-target-thresh', '0.2', '--bce-pos-weight', '2.5'],
    ['--bce-loss', '--bce-target-thresh', '0.5', '--smoothing', '0.3'],
    [], ['--smoothing', '0'],
])
@pytest.mark.parametrize('mixup', [False, True])
def test_bce_and_ce_losses_are_timms(argv, mixup):
    """--bce-loss and its flags, and the cross-entropy fast path: the loss timm's train.py picks for the same
    flags, on MixUp/CutMix targets (soft) and on class indices."""
    from naflex.train.cli import build_parser, check_args
    parser = build_parser()
    args = parser.parse_args(['--data-dir', 'x', '--device', 'cpu', *argv] + (['--mixup', '0.8'] * mixup))
    cfg = check_args(args, parser)
    torch.manual_seed(0)
    logits = torch.randn(6, 5) * 3
    target = F.softmax(torch.randn(6, 5) * 2, -1) if mixup else torch.randint(0, 5, (6,))
    got, want = make_loss(cfg.train)(logits, target), _timm_train_loss(args, mixup)(logits, target)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_bce_training_step_is_timms():
    """Two updates of the trainer with --bce-loss on soft targets equal timm's step with its BinaryCrossEntropy."""
    from naflex.train.cli import build_parser, check_args
    parser = build_parser()
    args = parser.parse_args(['--data-dir', 'x', '--device', 'cpu', '--bce-loss', '--bce-pos-weight', '2', '--mixup',
                              '0.8', '--naflex-loss-scale', 'none'])
    cfg = check_args(args, parser)
    g = torch.Generator().manual_seed(3)
    batches = [(x, F.softmax(torch.randn(len(t), 4, generator=g), -1)) for x, t in
               (make_packed(GRIDS, s) for s in range(2))]
    a, b = _model(), _model()
    eng = Trainer(a, torch.optim.SGD(a.parameters(), lr=0.5), cfg.train, batch_size_reference=8)
    train_one_epoch(eng, iter(batches), 2, TrainState())
    opt, loss_fn = torch.optim.SGD(b.parameters(), lr=0.5), _timm_train_loss(args, mixup_active=True)
    for inputs, target in batches:
        loss_fn(b(inputs), target).backward()
        opt.step()
        opt.zero_grad()
    for k, v in _params(b).items():
        torch.testing.assert_close(_params(a)[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert not torch.equal(_params(a)['head.weight'], _params(_model())['head.weight'])


def test_loss_weight_is_timms_naflex_scale():
    # timm train.py: local_scale = batch_size / batch_size_reference (-b), sqrt'ed for 'sqrt', 1 for 'none'
    assert loss_weight(512, 64, 'linear') == 8.0
    assert loss_weight(512, 64, 'sqrt') == pytest.approx(math.sqrt(8))
    assert loss_weight(512, 64, 'none') == 1.0


def _model(drop_path=0.0):
    torch.manual_seed(0)
    return naflex.create_model('naflexvit_tiny_test', num_classes=4, drop_path_rate=drop_path)


def _engine(model, ema=None, clip_grad=None, clip_mode='norm', callbacks=(), **cfg):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    cfg = TrainConfig(**dict(dict(device='cpu', loss_scale='none', log_interval=100, smoothing=0.0), **cfg))
    return Trainer(model, opt, cfg, batch_size_reference=8, ema=ema, clip_grad=clip_grad, clip_mode=clip_mode,
                   callbacks=callbacks)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_grad_accumulation_equals_big_batch():
    """2 micro-batches of 4 with --grad-accum-steps 2 == one batch of 8 (equal sizes, loss scale none)."""
    batch = make_packed(GRIDS, 1)
    a = _model()
    eng = _engine(a, grad_accum_steps=2)
    state = TrainState()
    train_one_epoch(eng, iter([take(batch, [0, 1, 2, 3]), take(batch, [4, 5, 6, 7])]), 2, state)
    assert state.num_updates == 1 and state.step == 2
    b = _model()
    train_one_epoch(_engine(b), iter([batch]), 1, TrainState())
    for k, v in _params(b).items():
        torch.testing.assert_close(_params(a)[k], v, atol=1e-6, rtol=1e-5, msg=k)


def test_linear_loss_scale_weights_small_batches_less():
    """With 'linear' a step of 4 images at -b 8 moves the weights half as far (SGD) as with 'none'."""
    batch = take(make_packed(GRIDS, 2), [0, 1, 2, 3])
    moves = {}
    for mode in ('none', 'linear'):
        m = _model()
        before = _params(m)
        train_one_epoch(_engine(m, loss_scale=mode), iter([batch]), 1, TrainState())
        moves[mode] = torch.cat([(m.state_dict()[k] - v).flatten() for k, v in before.items()])
    torch.testing.assert_close(moves['linear'], 0.5 * moves['none'], atol=1e-7, rtol=1e-4)


def test_fp16_grad_scaler_and_clipping_on_cpu():
    m = _model()
    eng = _engine(m, amp=True, amp_dtype='float16', clip_grad=1e-3, clip_mode='norm', log_interval=1)
    scaler = eng.scaler
    before = _params(m)
    metrics = train_one_epoch(eng, iter([make_packed(GRIDS, s) for s in range(2)]), 2, TrainState())
    assert math.isfinite(metrics['loss']) and scaler.get_scale() > 0
    # SGD lr 0.5 with a clipped gradient norm of 1e-3 moves the weights by at most 2 * 0.5 * 1e-3
    move = torch.cat([(m.state_dict()[k] - v).flatten() for k, v in before.items()]).norm()
    assert 0 < move <= 2 * 0.5 * 1e-3 * 1.01


def test_ema_follows_updates():
    m = _model()
    ema = ModelEma(m, decay=0.5)
    init = _params(m)
    eng = _engine(m, ema=ema)
    train_one_epoch(eng, iter([make_packed(GRIDS, s) for s in range(2)]), 2, TrainState())
    # first update copies, second averages: ema = 0.5 * w1 + 0.5 * w2 != w2, and differs from the init
    w = m.state_dict()
    k = 'head.weight'
    assert not torch.equal(ema.module.state_dict()[k], w[k]) and not torch.equal(ema.module.state_dict()[k], init[k])


def test_no_host_sync_between_log_steps(monkeypatch):
    """Between log points the step loop (model included) never reads a device value (item/tolist/bool/cpu...)."""
    m = _model()
    eng = _engine(m, log_interval=100)
    batches = [make_packed(GRIDS, s) for s in range(3)]
    calls = []

    def spy(name):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, **k):
            calls.append(name)
            return orig(self, *a, **k)
        return wrapped

    for name in ('item', 'tolist', '__bool__', '__float__', '__int__', 'cpu', 'numpy'):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    state = TrainState()

    class Stop:
        def after_update(self, engine, st):
            if st.step == 2:
                raise KeyboardInterrupt  # stop before the final (logged) step

    eng.callbacks.items.append(Stop())
    with pytest.raises(KeyboardInterrupt):
        train_one_epoch(eng, iter(batches), 3, state)
    # only the first update (update_idx 0) is a log step: its reads happen once, none after it
    n_first = len(calls)
    state2 = TrainState(step=1)
    m2 = _model()
    eng2 = _engine(m2, log_interval=100, callbacks=[Stop()])
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        train_one_epoch(eng2, iter(batches[1:]), 3, state2)
    assert calls == [] and n_first > 0


@pytest.mark.slow
def test_torchcompile_step_matches_eager():
    """--torchcompile: a compiled training step gives the eager loss and update (CPU inductor, ~30 s)."""
    batch = make_packed(GRIDS, 3)
    results = []
    for compile_model in (False, True):
        m = _model()
        run = torch.compile(m) if compile_model else m
        eng = _engine(run, log_interval=1)
        eng.optimizer = torch.optim.SGD(m.parameters(), lr=0.5)
        metrics = train_one_epoch(eng, iter([batch]), 1, TrainState())
        results.append((metrics['loss'], _params(m)))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-4)
    for k, v in results[0][1].items():
        torch.testing.assert_close(results[1][1][k], v, atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize('amp_dtype, opt, said', [('float16', 'nadamw', True), ('float16', 'adamw', False),
                                                  ('bfloat16', 'nadamw', False)])
def test_fp16_host_sync_is_said_at_start_up(amp_dtype, opt, said, caplog):
    """On CUDA, fp16 with an optimizer that has no fused kernel reads the loss scaler's inf flag on the host at every
    update (tests/test_fake_cuda.py counts it): one start-up line says so; bf16 and fused kernels say nothing."""
    import warnings

    import train
    from naflex.train.cli import parse_config
    from naflex.train.distributed import DistInfo
    _, cfg = parse_config(['--data-dir', 'x', '--model', 'naflexvit_tiny_test', '--amp', '--amp-dtype', amp_dtype,
                           '--opt', opt, '--lr', '1e-3'])
    from fake_cuda import fake_cuda
    model = _model()
    with fake_cuda(), caplog.at_level('INFO', logger='train'), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        train._trainer(cfg, model.to('cuda'), DistInfo(device=torch.device('cuda')), 2, 1e-3, None)
    assert ('one device sync per update' in caplog.text) == said, caplog.text


@pytest.mark.parametrize('flags, line, advised', [
    ([], 'precision: float32 (no --amp)', False),
    (['--amp'], 'precision: float16 autocast (--amp --amp-dtype float16), with a loss scaler', True),
    (['--amp', '--amp-dtype', 'bfloat16'], 'precision: bfloat16 autocast (--amp --amp-dtype bfloat16), no loss scaler',
     False),
])
def test_precision_is_said_at_start_up_and_float16_on_the_cpu_gets_a_warning(flags, line, advised, caplog):
    """--amp alone means float16 (timm's default), which the CPU emulates several times slower than float32."""
    import train
    from naflex.train.cli import parse_config
    from naflex.train.distributed import DistInfo
    _, cfg = parse_config(['--data-dir', 'x', '--model', 'naflexvit_tiny_test', '--device', 'cpu', *flags])
    with caplog.at_level('INFO', logger='train'):
        train._trainer(cfg, _model(), DistInfo(), 2, 1e-3, None)
    assert line in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert [w for w in warnings if 'float16' in w] == (
        ["--amp-dtype float16 (--amp's default, as in timm) on the CPU: few CPUs compute in float16, so autocast runs "
         'several times slower than float32 there; use --amp-dtype bfloat16, or drop --amp'] if advised else [])
