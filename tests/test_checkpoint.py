"""Checkpoint files: atomic writes survive failures, best-N retention, resume discovery, weights-only starts
(timm checkpoints with argparse args, resized classifier), RNG round trip."""
import argparse
import random
import time

import numpy as np
import pytest
import torch

import naflex
from naflex.train.checkpoint import (CheckpointManager, atomic_save, find_resume, load_weights, rng_state,
                               set_rng_state, unwrap_model)


def test_atomic_save_failure_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / 'last.pth'
    atomic_save({'v': torch.tensor([1.0])}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b'partial garbage')
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError, match='disk full'):
        atomic_save({'v': torch.tensor([2.0])}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)['v'].item() == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.pth']  # no temp file left behind


def _state(epoch):
    return {'state_dict': {'w': torch.full((2,), float(epoch))}, 'epoch': epoch}


def test_best_history_and_links(tmp_path):
    mgr = CheckpointManager(tmp_path, max_history=2)
    for epoch, metric in enumerate([10.0, 30.0, 20.0, 5.0, 40.0]):
        mgr.save_epoch(_state(epoch), epoch, metric)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ['checkpoint-1.pth', 'checkpoint-4.pth', 'last.pth', 'model_best.pth']
    assert mgr.best == (40.0, 4)
    load = lambda n: torch.load(tmp_path / n, weights_only=True)  # noqa: E731
    assert load('checkpoint-1.pth')['epoch'] == 1 and load('model_best.pth')['epoch'] == 4
    assert load('last.pth')['best_history'] == [[40.0, 4], [30.0, 1]]
    # a resumed manager continues the same ranking
    mgr2 = CheckpointManager(tmp_path, max_history=2)
    mgr2.restore(load('last.pth'))
    mgr2.save_epoch(_state(5), 5, 35.0)
    assert sorted(p.name for p in tmp_path.glob('checkpoint-*')) == ['checkpoint-4.pth', 'checkpoint-5.pth']


def test_best_ranking_continues_in_its_own_folder_only(tmp_path, caplog):
    """Resumed in the folder that wrote it, the ranking goes on (its files are there); in another folder it starts
    afresh, so model_best.pth there is an epoch trained there, and a line says where the earlier best is."""
    old, new = tmp_path / 'old', tmp_path / 'new'
    old.mkdir(), new.mkdir()
    first = CheckpointManager(old)
    first.save_epoch(_state(0), 0, 90.0)
    ckpt = torch.load(old / 'last.pth', weights_only=True)
    same = CheckpointManager(old)
    same.restore(ckpt, old, 'top1')
    same.save_epoch(_state(1), 1, 50.0)
    assert same.best == (90.0, 0) and torch.load(old / 'model_best.pth', weights_only=True)['epoch'] == 0
    other = CheckpointManager(new)
    with caplog.at_level('INFO'):
        other.restore(ckpt, old, 'top1')
    other.save_epoch(_state(1), 1, 50.0)
    assert other.best == (50.0, 1) and torch.load(new / 'model_best.pth', weights_only=True)['epoch'] == 1
    assert f"the resumed run's best, top1 90.0000 at epoch 0, stays in {old / 'model_best.pth'}" in caplog.text


def test_decreasing_metric(tmp_path):
    mgr = CheckpointManager(tmp_path, max_history=1, decreasing=True)
    for epoch, loss in enumerate([2.0, 1.0, 3.0]):
        mgr.save_epoch(_state(epoch), epoch, loss)
    assert mgr.best == (1.0, 1) and (tmp_path / 'checkpoint-1.pth').exists()


def test_recovery_files_and_find_resume(tmp_path):
    (tmp_path / '.last.pth.tmp-123').write_bytes(b'half a checkpoint')  # a save killed midway
    mgr = CheckpointManager(tmp_path)
    assert not list(tmp_path.iterdir())
    assert find_resume(tmp_path) is None
    mgr.save_epoch(_state(0), 0, 1.0)
    time.sleep(0.01)
    mgr.save_recovery(_state(1), 1, 4)
    time.sleep(0.01)
    p = mgr.save_recovery(_state(1), 1, 8)
    assert sorted(x.name for x in tmp_path.glob('recovery-*')) == ['recovery-1-8.pth']
    assert find_resume(tmp_path) == p
    mgr.save_epoch(_state(1), 1, 2.0)
    assert not list(tmp_path.glob('recovery-*')) and find_resume(tmp_path).name == 'last.pth'


def test_rng_round_trip():
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_weights_from_timm_checkpoint_with_resized_head(tmp_path):
    """A timm train.py checkpoint (args as argparse.Namespace, 'module.' prefix, 1000 classes) starts a 4-class run."""
    src = naflex.create_model('naflexvit_tiny_test')
    sd = {f'module.{k}': v for k, v in src.state_dict().items()}
    path = tmp_path / 'timm.pth.tar'
    torch.save({'epoch': 3, 'state_dict': sd, 'args': argparse.Namespace(model='x'), 'version': 2}, path)
    dst = naflex.create_model('naflexvit_tiny_test', num_classes=4)
    head_before = dst.head.weight.clone()
    assert load_weights(dst, path) == ('plain', ['head.weight', 'head.bias'])
    for k, v in src.state_dict().items():
        if not k.startswith('head.'):
            assert torch.equal(dst.state_dict()[k], v), k
    assert torch.equal(dst.head.weight, head_before) and dst.head.weight.shape == (4, 64)


def test_weights_prefer_ema_as_timm(tmp_path):
    """As timm's load_checkpoint (use_ema=True): the EMA copy when the file has one, else the plain weights."""
    model = naflex.create_model('naflexvit_tiny_test', num_classes=4)
    ema = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    path = tmp_path / 'ours.pth'
    torch.save({'state_dict': model.state_dict(), 'state_dict_ema': ema}, path)
    other = naflex.create_model('naflexvit_tiny_test', num_classes=4)
    assert load_weights(other, path)[0] == 'ema'
    assert all(v.abs().sum() == 0 for v in other.state_dict().values())
    assert load_weights(other, path, use_ema=False)[0] == 'plain'
    assert torch.equal(other.head.weight, model.head.weight)
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'plain.pth')
    assert load_weights(other, tmp_path / 'plain.pth') == ('plain', [])


def test_weights_mismatch_is_an_error(tmp_path):
    path = tmp_path / 'x.pth'
    torch.save({'state_dict': {'embeds.pos_embed': torch.zeros(1, 2, 2, 64)}}, path)
    with pytest.raises(ValueError, match='does not fit the model'):
        load_weights(naflex.create_model('naflexvit_tiny_test'), path)
    with pytest.raises(FileNotFoundError):
        load_weights(naflex.create_model('naflexvit_tiny_test'), tmp_path / 'missing.pth')


def test_unwrap_compiled_and_ddp_like():
    model = naflex.create_model('naflexvit_tiny_test')
    compiled = torch.compile(model)
    assert unwrap_model(compiled) is model
    assert list(unwrap_model(compiled).state_dict()) == list(model.state_dict())
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in unwrap_model(compiled).state_dict())


def test_resume_timm_checkpoint_state():
    """A timm train.py checkpoint (no train_state, args a Namespace, timm NAdamW state) resumes at epoch+1 with its
    optimizer state; a checkpoint of another --opt is one clear error unless --no-resume-opt."""
    import argparse

    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from naflex.train.checkpoint import restore_training
    from naflex.train.config import OptimConfig, ScheduleConfig, TrainConfig
    from naflex.train.engine import Trainer
    from naflex.train.optim import create_optimizer
    from naflex.train.schedule import create_schedule
    model = naflex.create_model('naflexvit_tiny_test', num_classes=4)
    timm_opt = create_optimizer_v2(model, opt='nadamw', lr=1e-3, weight_decay=0.05)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    timm_opt.step()
    ckpt = {'state_dict': model.state_dict(), 'epoch': 2, 'optimizer': timm_opt.state_dict(), 'version': 2,
            'args': argparse.Namespace(opt='nadamw', model='naflexvit_base_patch16_gap')}
    other = naflex.create_model('naflexvit_tiny_test', num_classes=4)
    opt = create_optimizer(other, OptimConfig(opt='nadamw', lr=1e-3, weight_decay=0.05))
    sched_cfg = ScheduleConfig(epochs=10, warmup_epochs=1, on_updates=True)
    sched, _ = create_schedule(sched_cfg, opt, updates_per_epoch=5)
    eng = Trainer(other, opt, TrainConfig(device='cpu'), batch_size_reference=1, schedule=sched)
    with pytest.raises(ValueError, match="is --opt nadamw's, this run uses --opt sgd; pass --no-resume-opt"):
        restore_training(eng, ckpt, updates_per_epoch=5, opt='sgd')
    state = restore_training(eng, ckpt, updates_per_epoch=5, opt='NAdamW')
    assert (state.epoch, state.step, state.num_updates) == (3, 0, 15)
    for p_ours, p_timm in zip(other.parameters(), model.parameters()):
        for key in ('exp_avg', 'exp_avg_sq', 'step'):
            assert torch.equal(opt.state[p_ours][key], timm_opt.state[p_timm][key]), key
    ref_opt = create_optimizer_v2(naflex.create_model('naflexvit_tiny_test', num_classes=4), opt='nadamw', lr=1e-3,
                                  weight_decay=0.05)
    ref, _ = create_scheduler_v2(ref_opt, sched='cosine', num_epochs=10, warmup_epochs=1, step_on_epochs=False,
                                 updates_per_epoch=5)
    ref.step_update(15)
    assert [g['lr'] for g in opt.param_groups] == [g['lr'] for g in ref_opt.param_groups]
    assert torch.equal(other.head.weight, model.head.weight)
    state = restore_training(eng, ckpt, load_optimizer=False, updates_per_epoch=5, opt='sgd')
    assert state.epoch == 3
    with pytest.raises(ValueError, match='does not fit the model'):
        restore_training(Trainer(naflex.create_model('naflexvit_tiny_test', num_classes=3), opt,
                                 TrainConfig(device='cpu'), batch_size_reference=1), ckpt, load_optimizer=False)


def test_our_checkpoint_loads_in_timm(tmp_path):
    """last.pth written by the trainer loads strictly into timm's NaFlexVit of the same shape."""
    import timm
    from timm.models import load_checkpoint

    from naflex.train.checkpoint import TrainState, training_checkpoint
    from naflex.train.config import TrainConfig
    from naflex.train.engine import Trainer
    model = naflex.create_model('naflexvit_tiny_test', num_classes=4)
    eng = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), TrainConfig(device='cpu'),
                  batch_size_reference=1)
    CheckpointManager(tmp_path).save_epoch(training_checkpoint(eng, TrainState(epoch=1)), 0, 1.0)
    ref = timm.create_model('naflexvit_base_patch16_gap', embed_dim=64, depth=2, num_heads=4, num_classes=4)
    load_checkpoint(ref, str(tmp_path / 'last.pth'), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(ref.state_dict()[k], v), k


def _start(tmp_path, *flags):
    """build.build_model for train.py's flags (a 4-class tiny model)."""
    from naflex.train import build
    from naflex.train.cli import parse_config
    _, cfg = parse_config(['--data-dir', str(tmp_path), '--model', 'naflexvit_tiny_test', *flags])
    return build.build_model(cfg, 4)


def test_start_weights_mean_what_they_mean_in_timm(tmp_path, caplog):
    """--initial-checkpoint: the EMA copy, loaded last (it replaces --pretrained's weights, which are then not even
    fetched: this tiny model has none); --pretrained --pretrained-path: the file, classifier fresh (timm's overlay
    sets num_classes=-1); --pretrained-path alone: one error line (timm ignores it without a word)."""
    from naflex.train.cli import ConfigError
    torch.manual_seed(0)
    plain = naflex.create_model('naflexvit_tiny_test', num_classes=4).state_dict()
    ema = {k: v + 1 for k, v in plain.items()}
    torch.save({'state_dict': plain, 'state_dict_ema': ema}, tmp_path / 'run.pth')
    with caplog.at_level('INFO', logger='train'):
        model = _start(tmp_path, '--initial-checkpoint', str(tmp_path / 'run.pth'), '--pretrained')
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    assert f'--initial-checkpoint: loaded the EMA weights of {tmp_path / "run.pth"}' in caplog.text
    assert '--initial-checkpoint replaces the --pretrained weights' in caplog.text
    torch.manual_seed(1)
    fresh = _start(tmp_path).state_dict()
    torch.manual_seed(1)  # the same fresh classifier
    overlay = _start(tmp_path, '--pretrained', '--pretrained-path', str(tmp_path / 'run.pth')).state_dict()
    for k, v in overlay.items():
        assert torch.equal(v, fresh[k] if k.startswith('head.') else ema[k]), k
    with pytest.raises(ConfigError, match='--pretrained-path .* is read with --pretrained'):
        _start(tmp_path, '--pretrained-path', str(tmp_path / 'run.pth'))
