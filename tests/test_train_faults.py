"""What train.py does when things go wrong while a run is going: foreign checkpoints, an unwritable output or a
full disk, Ctrl-C, undecodable training files, flags changed on resume. Each case ends in one line on stderr
(no traceback) with the documented exit status, and never damages the checkpoints already written.

Tiny model, generated images, CPU; the runs are one or two epochs of ~4 steps (tests/test_train.py's setup).
"""
import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import naflex
import train
from test_train import REPO, Hooks, _summary, card_argv

ONE_EPOCH = ('--epochs', '1', '--warmup-epochs', '0')


def _fail(argv, capsys, hooks=None):
    """Run train.main expecting an error exit; returns (exit status, the last stderr line, all of stderr)."""
    with pytest.raises(SystemExit) as exc:
        train.main(argv, hooks=hooks)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    return exc.value.code, (lines[-1] if lines else ''), err


# --- foreign weights and config files: the whole mismatch message, one line ------------------------------------

def test_yaml_error_keeps_line_and_column(tmp_path, capsys):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('lr: [1, 2\nopt: sgd\n')
    code, line, err = _fail(['-c', str(bad)], capsys)
    assert code == 2 and 'Traceback' not in err
    assert line.startswith(f'train.py: error: config file {bad} is not valid YAML: line 2, column 4: ')
    assert 'flow sequence started at line 1, column 5' in line


def test_foreign_checkpoint_lists_the_mismatched_keys(demo_dataset, tmp_path, capsys):
    """--resume / --initial-checkpoint with another model's or class count's weights: the full one-line message."""
    path = tmp_path / 'other.pth'
    torch.save({'state_dict': naflex.create_model('naflexvit_tiny_test', num_classes=7).state_dict()}, path)
    code, line, err = _fail(card_argv(demo_dataset, tmp_path, 'r', *ONE_EPOCH, '--resume', str(path)), capsys)
    assert code == 2 and 'Traceback' not in err
    assert line.startswith(f'train.py: error: --resume {path}: the checkpoint does not fit the model '
                           'naflexvit_tiny_test')
    assert ("shape mismatch: ['head.bias: file (7,) vs model (4,)', 'head.weight: file (7, 64) vs model (4, 64)']"
            in line)

    wide = {k: v for k, v in naflex.create_model('naflexvit_tiny_test').state_dict().items() if 'blocks.1.' not in k}
    wide['extra.weight'] = torch.zeros(1)
    torch.save({'state_dict': wide}, path)
    code, line, err = _fail(card_argv(demo_dataset, tmp_path, 'i', *ONE_EPOCH, '--initial-checkpoint', str(path)),
                            capsys)
    assert code == 2 and 'Traceback' not in err
    assert f'checkpoint {path} does not fit the model naflexvit_tiny_test: missing: [' in line
    assert '(+' in line and "more); unexpected: ['extra.weight']" in line


# --- Ctrl-C: like SIGTERM (recovery checkpoint at the next update, resumable), exit 130; twice: stop at once -----

class CtrlC(Hooks):
    """Presses Ctrl-C ``times`` times after the update that ends ``at`` = (epoch, step): SIGINT to the whole
    process group, loader workers included, as a terminal does."""

    def __init__(self, at, times=1, group=True):
        super().__init__()
        self.at, self.times, self.group = at, times, group

    def after_update(self, engine, state):
        super().after_update(engine, state)
        if (state.epoch, state.step) == self.at:
            for _ in range(self.times):
                os.killpg(0, signal.SIGINT) if self.group else os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_a_recovery_checkpoint_and_resumes(demo_dataset, tmp_path):
    """In a terminal (own process group, a DataLoader worker): exit 130, no traceback, then --resume auto."""
    argv = card_argv(demo_dataset, tmp_path, 'c', *ONE_EPOCH, '-j', '1')
    script = (f'import sys; sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]\n'
              'import train, test_train_faults as t\n'
              f'train.main({argv!r}, hooks=t.CtrlC(at=(0, 1)))\n')
    proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          start_new_session=True)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert 'SIGINT received: saving a recovery checkpoint at the next update' in proc.stdout
    assert 'stopped on SIGINT at epoch 0 step 2/' in proc.stdout
    run = tmp_path / 'c'
    assert [p.name for p in run.glob('recovery-*')] == ['recovery-0-2.pth']
    hooks = Hooks()
    train.main(argv + ['--resume', 'auto'], hooks=hooks)
    assert hooks.losses[0][:2] == (0, 2) and len(_summary(run / 'summary.csv')) == 1


class AwaitSignal(Hooks):
    """After the update that ends ``at`` = (epoch, step): touches ``marker`` and waits (at most a minute) for the
    stop that a signal from outside the run asks for, so the signal arrives mid-epoch with every worker alive."""

    def __init__(self, at, marker):
        super().__init__()
        self.at, self.marker = at, Path(marker)

    def after_update(self, engine, state):
        super().after_update(engine, state)
        if (state.epoch, state.step) == self.at:
            self.marker.touch()
            deadline = time.monotonic() + 60
            while not engine.callbacks.wants_stop() and time.monotonic() < deadline:
                time.sleep(0.05)


def test_sigterm_to_the_process_group_saves_and_resumes(demo_dataset, tmp_path):
    """Preemption as Slurm and Kubernetes do it: SIGTERM to every process of the job, the two DataLoader workers
    included. The workers outlive it, the main process saves at the next update and exits 143; --resume auto
    continues from that checkpoint."""
    argv = card_argv(demo_dataset, tmp_path, 'pg', *ONE_EPOCH, '-j', '2')
    marker = tmp_path / 'training'
    script = (f'import sys; sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]\n'
              'import train, test_train_faults as t\n'
              f'train.main({argv!r}, hooks=t.AwaitSignal(at=(0, 1), marker={str(marker)!r}))\n')
    proc = subprocess.Popen([sys.executable, '-c', script], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=60)[1][-3000:]
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-3000:]
    assert 'Traceback' not in out + err and 'DataLoader worker' not in err, err[-3000:]
    assert 'stopped on SIGTERM at epoch 0 step 2/' in out
    run = tmp_path / 'pg'
    assert [p.name for p in run.glob('recovery-*')] == ['recovery-0-2.pth']
    hooks = Hooks()
    train.main(argv + ['--resume', 'auto'], hooks=hooks)
    assert hooks.losses[0][:2] == (0, 2) and len(_summary(run / 'summary.csv')) == 1


def test_second_ctrl_c_stops_at_once(demo_dataset, tmp_path, capsys):
    code, line, err = _fail(card_argv(demo_dataset, tmp_path, 'cc', *ONE_EPOCH), capsys,
                            hooks=CtrlC(at=(0, 1), times=2, group=False))
    assert code == 130 and 'Traceback' not in err
    assert line.startswith('train.py: interrupted: stopped at once without saving')
    assert not list((tmp_path / 'cc').glob('*.pth')) and not list((tmp_path / 'cc').glob('.*tmp*'))


# --- an output folder that cannot be written, a disk that fills up while saving ----------------------------------

def test_unwritable_output_is_one_line(demo_dataset, tmp_path, capsys):
    blocker = tmp_path / 'a-file'
    blocker.write_text('not a folder')
    code, line, err = _fail(card_argv(demo_dataset, blocker / 'runs', 'x', *ONE_EPOCH), capsys)
    assert code == 2 and 'Traceback' not in err
    assert line == (f'train.py: error: --output {blocker}/runs: cannot write the run folder {blocker}/runs/x: '
                    'Not a directory')


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``full`` is set, after a few bytes (a disk filling up mid-save)."""
    full = False

    def __init__(self, f):
        self.f, self.written = f, 0

    def write(self, data):
        self.written += len(data)
        if _FullDisk.full and self.written > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_while_saving_keeps_the_previous_checkpoint(demo_dataset, tmp_path, capsys, monkeypatch):
    from naflex.train import checkpoint
    monkeypatch.setattr(_FullDisk, 'full', False)
    monkeypatch.setattr(checkpoint, 'open', lambda path, mode: _FullDisk(open(path, mode)), raising=False)

    class FillDisk(Hooks):
        def after_update(self, engine, state):
            _FullDisk.full = _FullDisk.full or state.epoch == 1  # epoch 0's last.pth is written normally

    code, line, err = _fail(card_argv(demo_dataset, tmp_path, 'f'), capsys, hooks=FillDisk())
    run = tmp_path / 'f'
    assert code == 1 and 'Traceback' not in err and 'unexpected pos' not in err
    assert line == (f'train.py: error: could not write checkpoint {run}/last.pth: No space left on device '
                    '(the previous last.pth is unchanged)')
    assert torch.load(run / 'last.pth', map_location='cpu', weights_only=True)['epoch'] == 0
    assert not [p.name for p in run.iterdir() if '.tmp' in p.name]
    # summary.csv got epoch 1's row before the save failed: a resumed run trains epoch 1 again and replaces it
    assert [r['epoch'] for r in _summary(run / 'summary.csv')] == ['0', '1']
    from naflex.train.logger import RunWriter
    writer = RunWriter(run, tensorboard=False)
    writer.resume_at(1)
    writer.summary({'epoch': 1, 'train_loss': 0.5})
    assert [r['epoch'] for r in _summary(run / 'summary.csv')] == ['0', '1']
    assert _summary(run / 'summary.csv')[1]['train_loss'] == '0.5'


# --- undecodable training files ----------------------------------------------------------------------------------

def _garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'this is not an image')
    return path


def test_every_training_file_undecodable(demo_dataset, tmp_path, capsys):
    """One line with the count and a few paths (not a DataLoader-worker traceback); bad_files.txt is written."""
    data = tmp_path / 'data'
    for split in ('train', 'val'):
        for c in ('a', 'b'):
            for i in range(3):
                _garbage(data / split / c / f'{i}.jpg')
    code, line, err = _fail(card_argv(data, tmp_path, 'g', *ONE_EPOCH, '-j', '1'), capsys)
    assert code == 1 and 'Traceback' not in err and 'DataLoader worker' not in err
    assert line.startswith('train.py: error: 20 files in a row failed to decode for one sample of step 0 (epoch 0), '
                           f'e.g. {data}/train/'), line
    listed = (tmp_path / 'g' / 'bad_files.txt').read_text().split()
    assert listed and set(listed) <= {str(p) for p in (data / 'train').rglob('*.jpg')}
    assert line.endswith(f'{len(listed)} distinct files listed in {tmp_path}/g/bad_files.txt: check the files '
                         'under --data-dir')


def test_every_validation_file_undecodable(demo_dataset, tmp_path, capsys):
    """No fake 'top1 0.000' from zero images saved as the best checkpoint: one line, exit 1."""
    data = tmp_path / 'data'
    shutil.copytree(demo_dataset / 'train', data / 'train')
    for c in os.listdir(data / 'train'):
        _garbage(data / 'val' / c / '0.jpg')
    code, line, err = _fail(card_argv(data, tmp_path, 'v', *ONE_EPOCH), capsys)
    assert code == 1 and 'Traceback' not in err
    assert line.startswith('train.py: error: evaluated no image: all 4 files failed to decode (e.g. ')
    assert not (tmp_path / 'v' / 'model_best.pth').exists() and not (tmp_path / 'v' / 'summary.csv').exists()
    assert len((tmp_path / 'v' / 'bad_files.txt').read_text().split()) == 4


def _seven_bad_of_31(demo_dataset, data):
    shutil.copytree(demo_dataset, data)
    for i in range(7):
        _garbage(data / 'train' / sorted(os.listdir(data / 'train'))[i % 4] / f'bad{i}.jpg')
    return data


def test_small_dataset_with_many_bad_files_stops(demo_dataset, tmp_path, capsys):
    """7 undecodable files among 31 (23%): judged after one epoch's worth of samples, not after 1000."""
    data = _seven_bad_of_31(demo_dataset, tmp_path / 'data')
    code, line, err = _fail(card_argv(data, tmp_path, 's'), capsys)
    assert code == 1 and 'Traceback' not in err
    assert 'decode attempts' in line and 'after 31 training samples' in line
    assert 'above the 1.00% threshold (--bad-file-limit 0.01)' in line
    assert not (tmp_path / 's' / 'last.pth').exists()  # it stopped within epoch 0


def test_bad_file_limit_sets_the_share_that_stops(demo_dataset, tmp_path, capsys):
    """The same 23% of bad files: --bad-file-limit 0.5 trains through them (each replaced and counted), 0.1
    stops at its own threshold."""
    data = _seven_bad_of_31(demo_dataset, tmp_path / 'data')
    train.main(card_argv(data, tmp_path, 'half', *ONE_EPOCH, '--bad-file-limit', '0.5'))
    assert int(_summary(tmp_path / 'half' / 'summary.csv')[0]['bad_files']) >= 1
    assert len((tmp_path / 'half' / 'bad_files.txt').read_text().split()) >= 1
    code, line, err = _fail(card_argv(data, tmp_path, 'tenth', *ONE_EPOCH, '--bad-file-limit', '0.1'), capsys)
    assert code == 1 and 'Traceback' not in err
    assert 'above the 10.00% threshold (--bad-file-limit 0.1)' in line


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_bad_file_reported_once_per_run_and_counted_per_epoch(demo_dataset, tmp_path, capfd):
    """Loader workers stay silent; the trainer's tracker logs each path once per run (a resume included) and the
    engine counts every replacement per epoch (summary.csv's bad_files)."""
    import loaders
    from naflex.train.bad_files import BadFileTracker
    from naflex.train.config import TrainConfig
    from naflex.train.engine import TrainState, Trainer, train_one_epoch
    data = tmp_path / 'data'
    shutil.copytree(demo_dataset / 'train', data / 'train')
    broken = _garbage(data / 'train' / sorted(os.listdir(data / 'train'))[0] / 'broken.jpg')
    loader = loaders.create_train_loader(data, 'train', seq_lens=(16,), batch_size=8, patch_size=16, num_workers=2)
    model = naflex.create_model('naflexvit_tiny_test', num_classes=4)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), TrainConfig(device='cpu'),
                      batch_size_reference=8)
    log, records = logging.getLogger('test_train_faults.bad_files'), _Records()
    log.addHandler(records)
    log.propagate = False
    tracker, counts = BadFileTracker(tmp_path / 'run', max_fraction=0.5, dataset_size=25, logger=log), []
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = loaders.DevicePrefetcher(tracker.track(loader), 'cpu', (0.5,) * 3, (0.5,) * 3)
        counts.append(train_one_epoch(trainer, batches, len(loader), TrainState(epoch=epoch))['bad_files'])
    BadFileTracker(tmp_path / 'run', logger=log).record([str(broken)])  # a resumed run knows the file already
    assert counts[0] >= 1 and counts[1] >= 1 and sum(counts) == tracker.num_failures
    assert records.lines == [f'undecodable image replaced by another sample: {broken}']
    assert str(broken) not in capfd.readouterr().err  # nothing from the two workers
    assert (tmp_path / 'run' / 'bad_files.txt').read_text() == f'{broken}\n'


# --- flags changed on --resume apply, and say so ---------------------------------------------------------------

def test_changed_lr_on_resume_applies_and_is_logged(demo_dataset, tmp_path):
    """--lr / --weight-decay changed on --resume: the new values drive the optimizer and the schedule from the
    resumed update on, the log names each changed flag, args.yaml and the checkpoints record what was used."""
    import math
    argv = card_argv(demo_dataset, tmp_path, 'lr', '--epochs', '3')
    train.main(argv, hooks=Hooks(stop_after_epoch=0))
    train.main(argv + ['--resume', 'auto', '--lr', '1e-3', '--weight-decay', '0.05'], hooks=Hooks(stop_after_epoch=1))
    run = tmp_path / 'lr'
    log = (run / 'train.log').read_text()
    assert ("--resume: these flags differ from the checkpoint's run and apply from update 4 on: "
            '--lr 0.0003 -> 0.001, --weight-decay 0.1 -> 0.05') in log
    # per-update cosine over 3 x 4 updates (1 warmup epoch), peak 1e-3 now: the lr set after update 8
    assert float(_summary(run / 'summary.csv')[1]['lr']) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 8 / 12)))
    ckpt = torch.load(run / 'last.pth', map_location='cpu', weights_only=True)
    groups = ckpt['optimizer']['param_groups']
    assert {g['initial_lr'] for g in groups} == {1e-3} and {g['weight_decay'] for g in groups} == {0.0, 0.05}
    assert ckpt['args']['lr'] == 1e-3 and ckpt['train_state']['num_updates'] == 8
    used = yaml.safe_load((run / 'args.yaml').read_text())
    assert used['lr'] == 1e-3 and used['weight_decay'] == 0.05


def test_resume_under_another_step_plan_restarts_the_epoch():
    """A mid-epoch checkpoint resumed with another -b (2 steps per epoch instead of 4): step 3 of 4 would not
    exist, so the epoch restarts and the schedule goes to its start under the new plan."""
    from naflex.train.checkpoint import _resume_state
    ckpt = {'train_state': {'epoch': 1, 'step': 3, 'num_updates': 7, 'world_size': 1, 'steps_per_epoch': 4,
                            'grad_accum_steps': 1}}
    same = _resume_state(ckpt, world_size=1, accum=1, updates_per_epoch=4, steps_per_epoch=4)
    assert (same.epoch, same.step, same.num_updates) == (1, 3, 7)
    other = _resume_state(ckpt, world_size=1, accum=1, updates_per_epoch=2, steps_per_epoch=2)
    assert (other.epoch, other.step, other.num_updates) == (1, 0, 2)
