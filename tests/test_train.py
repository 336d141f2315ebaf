"""End to end: the model card command on the tiny model and generated data, exact resume, SIGKILL recovery,
non-finite loss stop, padded (--no-naflex-packing) batches.

The card's flags are kept as written; the tiny run adds --device cpu, a tiny model, short epochs and small
sequence lengths (token budget -b 4 x 64 -> 4..8 images per step, ~4 steps per epoch).
"""
import csv
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train

REPO = Path(__file__).resolve().parents[1]
CARD = ('--amp --amp-dtype bfloat16 --model naflexvit_base_patch16_gap --naflex-loader -b 64 --opt nadamw --lr 3e-4 '
        '--warmup-lr 0 --sched-on-updates --aa rand-m8-inc1-mstd1.0 --weight-decay .1 --grayscale-prob .1 '
        '--drop-path 0.2 --reprob 0 --mixup 0.8 --cutmix 1.0 --remode pixel -j 8').split()
TINY = ('--model naflexvit_tiny_test -b 4 -j 0 --device cpu --epochs 2 --warmup-epochs 1 '
        '--naflex-train-seq-lens 32 64 --naflex-max-seq-len 64 --log-interval 1').split()


def card_argv(data, out, experiment, *extra):
    # later flags win: the tiny overrides follow the card command
    return ['--data-dir', str(data), *CARD, *TINY, '--output', str(out), '--experiment', experiment, *extra]


class Hooks:
    """Test hooks the engine calls: record logged losses, stop after an epoch, poison weights, SIGKILL."""

    def __init__(self, stop_after_epoch=None, poison_at=None, kill_at=None):
        self.stop_after_epoch, self.poison_at, self.kill_at = stop_after_epoch, poison_at, kill_at
        self.engine = None

    def after_update(self, engine, state):
        self.engine = engine
        if self.poison_at == (state.epoch, state.step):
            with torch.no_grad():
                engine.module.head.weight.fill_(float('nan'))
        if self.kill_at == (state.epoch, state.step):
            os.kill(os.getpid(), signal.SIGKILL)

    def after_epoch(self, state):
        return self.stop_after_epoch is not None and state.epoch > self.stop_after_epoch

    @property
    def losses(self):
        return [(h['epoch'], h['step'], h['loss']) for h in self.engine.history]


def _weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


def _summary(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def reference(demo_dataset, tmp_path_factory):
    """The uninterrupted 2-epoch card run (also the end-to-end test's subject)."""
    out = tmp_path_factory.mktemp('ref')
    hooks = Hooks()
    results = train.main(card_argv(demo_dataset, out, 'ref', '--recovery-interval', '2'), hooks=hooks)
    return out / 'ref', hooks, results


def test_card_command_end_to_end(reference):
    run, hooks, results = reference
    assert [r['epoch'] for r in results] == [0, 1]
    for name in ('args.yaml', 'summary.csv', 'train.log', 'last.pth', 'model_best.pth', 'checkpoint-0.pth'):
        assert (run / name).is_file(), name
    assert not list(run.glob('recovery-*.pth'))  # removed once the epoch's last.pth exists
    assert list((run / 'tensorboard').glob('events.out.tfevents.*'))
    rows = _summary(run / 'summary.csv')
    assert [int(r['epoch']) for r in rows] == [0, 1]
    for key in ('train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr', 'images_per_s', 'tokens_per_s'):
        assert all(torch.isfinite(torch.tensor(float(r[key]))) for r in rows), key
    assert [r['bad_files'] for r in rows] == ['0', '0'] and all(int(r['train_images']) >= 24 for r in rows)
    import yaml
    saved = yaml.safe_load((run / 'args.yaml').read_text())
    assert saved['opt'] == 'nadamw' and saved['epochs'] == 2 and saved['smoothing'] == 0.1
    assert saved['checkpoint_hist'] == 10 and saved['num_classes'] == 4 and saved['mixup'] == 0.8
    ckpt = torch.load(run / 'last.pth', map_location='cpu', weights_only=True)
    assert ckpt['epoch'] == 1 and ckpt['train_state']['epoch'] == 2 and ckpt['arch'] == 'naflexvit_tiny_test'
    assert ckpt['class_names'] == ['00_disk', '01_square', '02_triangle', '03_cross']  # validate.py maps by these
    assert {'optimizer', 'scheduler', 'rng', 'metric'} <= set(ckpt)
    log = (run / 'train.log').read_text()
    assert 'img/s' in log and 'tok/s' in log and 'data wait' in log and 'ETA' in log
    assert 'epoch 1 done in' in log and '; 0 undecodable files replaced; run ETA' in log
    assert len(hooks.losses) >= 4 and all(torch.isfinite(torch.tensor(l)) for *_, l in hooks.losses)
    # per-update warmup from 0 over epoch 0 (4 updates), then cosine down to --min-lr 0 at the end (timm logs
    # the lr set for the next update)
    assert float(rows[0]['lr']) == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert float(rows[1]['lr']) == 0.0


def test_stop_and_resume_matches_uninterrupted(reference, demo_dataset, tmp_path):
    ref_run, ref_hooks, _ = reference
    first = Hooks(stop_after_epoch=0)
    train.main(card_argv(demo_dataset, tmp_path, 'r'), hooks=first)
    assert (tmp_path / 'r' / 'last.pth').is_file() and len(_summary(tmp_path / 'r' / 'summary.csv')) == 1
    second = Hooks()
    train.main(card_argv(demo_dataset, tmp_path, 'r', '--resume', 'auto'), hooks=second)
    for k, v in _weights(ref_run / 'last.pth').items():
        assert torch.equal(v, _weights(tmp_path / 'r' / 'last.pth')[k]), k
    assert first.losses + second.losses == ref_hooks.losses
    rows, ref_rows = _summary(tmp_path / 'r' / 'summary.csv'), _summary(ref_run / 'summary.csv')
    assert [r['train_loss'] for r in rows] == [r['train_loss'] for r in ref_rows]


def test_resume_into_a_new_folder_ranks_its_best_epochs_afresh(reference, demo_dataset, tmp_path, caplog):
    """The new folder's model_best.pth and '*** best' line are epochs trained there, even when the resumed run's
    best (here forged to top1 100, which no new epoch beats) is better; one line says where that one stays."""
    old = tmp_path / 'old'
    old.mkdir()
    ckpt = torch.load(reference[0] / 'last.pth', map_location='cpu', weights_only=True)
    ckpt['best_history'] = [[100.0, 1]]
    torch.save(ckpt, old / 'last.pth')
    os.link(old / 'last.pth', old / 'model_best.pth')
    with caplog.at_level('INFO'):
        train.main(card_argv(demo_dataset, tmp_path, 'new', '--resume', str(old / 'last.pth'), '--epochs', '3'))
    new = tmp_path / 'new'
    assert torch.load(new / 'model_best.pth', map_location='cpu', weights_only=True)['epoch'] == 2
    assert re.search(rf'\*\*\* best top1: [\d.]+ \(epoch 2, {re.escape(str(new / "model_best.pth"))}\)', caplog.text)
    assert (f"--resume from another run folder: the best epochs are ranked afresh in {new} (model_best.pth and the "
            f"best reported are epochs trained here); the resumed run's best, top1 100.0000 at epoch 1, stays in "
            f"{old / 'model_best.pth'}") in caplog.text


def test_sigkill_mid_epoch_then_resume_auto(reference, demo_dataset, tmp_path):
    ref_run, ref_hooks, _ = reference
    script = (f'import sys; sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})\n'
              'import train, test_train\n'
              f'train.main({card_argv(demo_dataset, tmp_path, "k", "--recovery-interval", "2")!r}, '
              'hooks=test_train.Hooks(kill_at=(1, 2)))\n')
    proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = tmp_path / 'k'
    assert (run / 'recovery-1-2.pth').is_file()
    assert not list(run.glob('.*tmp*'))
    hooks = Hooks()
    train.main(card_argv(demo_dataset, tmp_path, 'k', '--recovery-interval', '2', '--resume', 'auto'), hooks=hooks)
    # the resumed run restarted at epoch 1 step 2 and replays the uninterrupted run exactly
    assert hooks.losses[0][:2] == (1, 2)
    assert hooks.losses == [h for h in ref_hooks.losses if (h[0], h[1]) >= (1, 2)]
    for k, v in _weights(ref_run / 'last.pth').items():
        assert torch.equal(v, _weights(run / 'last.pth')[k]), k


def test_non_finite_loss_stops_and_keeps_last_checkpoint(demo_dataset, tmp_path, capsys):
    hooks = Hooks(poison_at=(1, 1))
    with pytest.raises(SystemExit) as exc:
        train.main(card_argv(demo_dataset, tmp_path, 'nan'), hooks=hooks)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert 'non-finite loss at epoch 1 step 1/' in err and 'sequence length' in err and 'batch size' in err
    assert re.search(r'sequence length (32|64), batch size', err), err  # the step's L (--naflex-train-seq-lens)
    last = torch.load(tmp_path / 'nan' / 'last.pth', map_location='cpu', weights_only=True)
    assert last['epoch'] == 0  # epoch 0's checkpoint, untouched
    assert all(torch.isfinite(v).all() for v in last['state_dict'].values())
    assert not list((tmp_path / 'nan').glob('recovery-*.pth'))


def test_torchcompile_one_graph_for_every_sequence_length(demo_dataset, tmp_path):
    """--torchcompile: every training step (other sequence length, token and image counts each time) reuses the
    first step's graph, evaluation compiles one more frame, the second epoch compiles nothing. Compiled with torch's
    default (automatic dynamic) the second step recompiles, which makes it 2 recompiles here."""
    rows = train.main(card_argv(demo_dataset, tmp_path, 'compiled', '--torchcompile', 'aot_eager', '-b', '8',
                                '--naflex-train-seq-lens', '24', '32', '48', '64'))
    assert len(rows) == 2
    log = (tmp_path / 'compiled' / 'train.log').read_text()
    assert len(re.findall(r'Train: \d', log)) >= 4
    assert 'torch.compile after epoch 0 (training and evaluation): 2 frames compiled (1 recompiles)' in log, log
    assert 'compiled again' not in log


def test_padded_batches(demo_dataset, tmp_path):
    """--no-naflex-packing: timm-style padded batches train and evaluate too (1 short epoch)."""
    rows = train.main(card_argv(demo_dataset, tmp_path, 'pad', '--no-naflex-packing', '--epochs', '1',
                                '--warmup-epochs', '0'))
    assert len(rows) == 1 and rows[0]['eval_top1'] >= 0
    assert torch.isfinite(torch.tensor(rows[0]['train_loss']))


def test_ema_and_initial_checkpoint_with_other_num_classes(reference, demo_dataset, tmp_path):
    """--initial-checkpoint from a 4-class run into a 5-class model (head re-initialized), EMA evaluated and saved."""
    ref_run, _, _ = reference
    rows = train.main(card_argv(demo_dataset, tmp_path, 'ema', '--epochs', '1', '--warmup-epochs', '0',
                                '--initial-checkpoint', str(ref_run / 'last.pth'), '--num-classes', '5',
                                '--model-ema', '--model-ema-decay', '0.9'))
    assert 'ema_top1' in rows[0] and 'eval_top1' in rows[0]
    ckpt = torch.load(tmp_path / 'ema' / 'last.pth', map_location='cpu', weights_only=True)
    assert ckpt['state_dict_ema']['head.weight'].shape == (5, 64)
    assert not torch.equal(ckpt['state_dict_ema']['head.weight'], ckpt['state_dict']['head.weight'])
    start = _weights(ref_run / 'last.pth')
    assert not torch.equal(ckpt['state_dict']['embeds.proj.weight'], start['embeds.proj.weight'])  # it trained
    # the EMA (decay 0.9 over ~4 updates) stays close to the starting weights it was seeded from
    ema_gap = (ckpt['state_dict_ema']['embeds.proj.weight'] - start['embeds.proj.weight']).abs().max()
    assert ema_gap < (ckpt['state_dict']['embeds.proj.weight'] - start['embeds.proj.weight']).abs().max()


def test_stop_and_resume_with_a_loader_worker(demo_dataset, tmp_path):
    """-j 1 (a DataLoader worker process): stopping after epoch 0 and resuming still replays the run exactly."""
    ref = Hooks()
    train.main(card_argv(demo_dataset, tmp_path, 'ref', '-j', '1'), hooks=ref)
    first, second = Hooks(stop_after_epoch=0), Hooks()
    train.main(card_argv(demo_dataset, tmp_path, 'r', '-j', '1'), hooks=first)
    train.main(card_argv(demo_dataset, tmp_path, 'r', '-j', '1', '--resume', 'auto'), hooks=second)
    assert first.losses + second.losses == ref.losses
    for k, v in _weights(tmp_path / 'ref' / 'last.pth').items():
        assert torch.equal(v, _weights(tmp_path / 'r' / 'last.pth')[k]), k


def test_val_interval_rows(demo_dataset, tmp_path):
    """--val-interval 3 over 2 epochs: epoch 0 has no eval (empty cells), the last epoch always has one."""
    train.main(card_argv(demo_dataset, tmp_path, 'vi', '--val-interval', '3', '--epochs', '2', '--mixup', '0',
                         '--cutmix', '0'))
    rows = _summary(tmp_path / 'vi' / 'summary.csv')
    assert [r['eval_top1'] for r in rows][0] == '' and float(rows[1]['eval_top1']) >= 0  # last epoch always evaluates


def test_sigterm_saves_and_resumes_exactly(reference, demo_dataset, tmp_path):
    """SIGTERM (preemption) mid-epoch: recovery checkpoint at the next update, exit 143, exact resume; the
    resumed epoch's summary row covers the whole epoch (the steps before the stop too)."""
    ref_run, ref_hooks, _ = reference

    class Term(Hooks):
        def after_update(self, engine, state):
            super().after_update(engine, state)
            if (state.epoch, state.step) == (1, 1):
                os.kill(os.getpid(), signal.SIGTERM)  # handled by train.py: sets a flag, no exit here

    with pytest.raises(SystemExit) as exc:
        train.main(card_argv(demo_dataset, tmp_path, 't'), hooks=Term())
    assert exc.value.code == 143
    assert [p.name for p in (tmp_path / 't').glob('recovery-*')] == ['recovery-1-2.pth']
    hooks = Hooks()
    train.main(card_argv(demo_dataset, tmp_path, 't', '--resume', 'auto'), hooks=hooks)
    assert hooks.losses == [h for h in ref_hooks.losses if (h[0], h[1]) >= (1, 2)]
    for k, v in _weights(ref_run / 'last.pth').items():
        assert torch.equal(v, _weights(tmp_path / 't' / 'last.pth')[k]), k
    same = ('epoch', 'train_loss', 'train_images', 'train_tokens', 'bad_files', 'eval_loss', 'eval_top1', 'lr')
    rows, ref_rows = _summary(tmp_path / 't' / 'summary.csv'), _summary(ref_run / 'summary.csv')
    assert [[r[k] for k in same] for r in rows] == [[r[k] for k in same] for r in ref_rows]
