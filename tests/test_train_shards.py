"""train.py and validate.py on WebDataset tar shards (scripts/make_shards.py of the demo folder): the same run as on
the folder, exact resume mid-epoch with loader workers, timm's --dataset wds/NAME and brace-pattern splits, a bad
member named by shard and member, two torchrun ranks."""
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import naflex
import train
import validate
from test_train import Hooks, _weights, card_argv

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def runs(demo_dataset, demo_shards, tmp_path_factory):
    """The same 2-epoch card run on the folder and on its shards (found without --dataset)."""
    out = tmp_path_factory.mktemp('runs')
    hooks = {}
    for name, data in (('folder', demo_dataset), ('shards', demo_shards)):
        hooks[name] = Hooks()
        train.main(card_argv(data, out, name), hooks=hooks[name])
    return out, hooks


def test_training_on_shards_is_training_on_the_folder(runs):
    out, hooks = runs
    assert len(hooks['shards'].losses) >= 4 and hooks['shards'].losses == hooks['folder'].losses
    for k, v in _weights(out / 'folder' / 'last.pth').items():
        assert torch.equal(v, _weights(out / 'shards' / 'last.pth')[k]), k
    assert (out / 'shards' / 'summary.csv').read_text().count('\n') == 3


def test_sigterm_mid_epoch_on_shards_resumes_exactly_with_workers(runs, demo_shards, tmp_path):
    """timm's --dataset wds/NAME, 2 loader workers reading the shards; SIGTERM at epoch 1 step 1, then
    --resume auto replays the uninterrupted run (which had no workers) exactly."""
    out, hooks = runs

    class Term(Hooks):
        def after_update(self, engine, state):
            super().after_update(engine, state)
            if (state.epoch, state.step) == (1, 1):
                os.kill(os.getpid(), signal.SIGTERM)

    argv = card_argv(demo_shards, tmp_path, 't', '--dataset', 'wds/demo', '-j', '2')
    with pytest.raises(SystemExit) as exc:
        train.main(argv, hooks=Term())
    assert exc.value.code == 143 and [p.name for p in (tmp_path / 't').glob('recovery-*')] == ['recovery-1-2.pth']
    resumed = Hooks()
    train.main(argv + ['--resume', 'auto'], hooks=resumed)
    assert resumed.losses == [h for h in hooks['shards'].losses if (h[0], h[1]) >= (1, 2)]
    for k, v in _weights(out / 'shards' / 'last.pth').items():
        assert torch.equal(v, _weights(tmp_path / 't' / 'last.pth')[k]), k


def test_validate_reads_shards_and_brace_patterns(runs, demo_dataset, demo_shards, capsys):
    out, _ = runs
    base = ['--model', 'naflexvit_tiny_test', '--checkpoint', str(out / 'shards' / 'last.pth'), '-j', '0',
            '-b', '5', '--naflex-max-seq-len', '64', '--device', 'cpu']
    folder = validate.main(['--data-dir', str(demo_dataset)] + base)[0]
    # the default --split val finds the shards' 'validation'
    ours = validate.main(['--data-dir', str(demo_shards), '--dataset', 'wds/demo'] + base)[0]
    assert (ours['top1'], ours['loss'], ours['images']) == (folder['top1'], folder['loss'], folder['images']) == \
        (ours['top1'], ours['loss'], 16)
    part = validate.main(['--data-dir', str(demo_shards), '--split', 'demo-validation-{0000..0001}.tar'] + base)[0]
    assert part['images'] == 10
    with pytest.raises(SystemExit) as exc:
        validate.main(['--data-dir', str(demo_shards), '--split', 'test'] + base)
    assert exc.value.code == 2 and "split 'test' is not in" in capsys.readouterr().err


def test_validate_reports_a_bad_member_by_shard_and_member(runs, demo_shards, tmp_path, capsys):
    out, _ = runs
    shutil.copytree(demo_shards, tmp_path / 'wds')
    shard = tmp_path / 'wds' / 'demo-validation-0002.tar'
    with tarfile.open(shard) as tf:
        m = next(m for m in tf if m.name.endswith('.jpg'))
    with open(shard, 'r+b') as f:
        f.seek(m.offset_data)
        f.write(b'\0' * m.size)
    row = validate.main(['--data-dir', str(tmp_path / 'wds'), '--model', 'naflexvit_tiny_test', '--checkpoint',
                         str(out / 'shards' / 'last.pth'), '-j', '1', '--naflex-max-seq-len', '64'])[0]
    assert row['images'] == 15 and row['bad_files'] == 1
    assert f'bad image file (skipped): {shard}:{m.name}' in capsys.readouterr().err


def _cut_validation_shard(demo_shards, dst: Path) -> Path:
    """A copy of the shards whose first validation shard ends inside the image member of its 3rd sample (a copy
    or download that stopped there)."""
    shutil.copytree(demo_shards, dst)
    shard = dst / 'demo-validation-0000.tar'
    with tarfile.open(shard) as tf:
        m = [m for m in tf if m.name.endswith('.jpg')][2]
    with open(shard, 'r+b') as f:
        f.truncate(m.offset_data + m.size // 2)
    return shard


def test_a_validation_shard_cut_short_is_one_error(demo_shards, tmp_path, capsys):
    """The samples from the cut on can be neither scored nor counted, so the rest would read as the whole split's
    result: validate.py and train.py refuse the split in one line, before anything is evaluated or written."""
    shard = _cut_validation_shard(demo_shards, tmp_path / 'wds')
    ckpt = tmp_path / 'tiny.pth'
    torch.save({'state_dict': naflex.create_model('naflexvit_tiny_test', num_classes=4).state_dict()}, ckpt)
    with pytest.raises(SystemExit) as exc:
        validate.main(['--data-dir', str(tmp_path / 'wds'), '--model', 'naflexvit_tiny_test', '--checkpoint',
                       str(ckpt), '-j', '0', '--naflex-max-seq-len', '64', '--device', 'cpu'])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"validate.py: error: split 'validation' of {tmp_path / 'wds'} cannot be scored whole: "
                             f"{shard.name}: cut short after 2 samples (member "), err[0]
    assert 'runs past the end of the file' in err[0] and 'copy the shard again' in err[0]
    with pytest.raises(SystemExit) as exc:
        train.main(card_argv(tmp_path / 'wds', tmp_path / 'out', 'e'))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert f'cannot be scored whole: {shard.name}: cut short after 2 samples' in err[0]
    assert err[0].endswith('(pass --val-split "" to train without evaluation)') and not (tmp_path / 'out').exists()


def test_train_errors_on_shards_are_one_line(demo_shards, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(card_argv(demo_shards, tmp_path, 'e', '--train-split', 'nope'))
    assert exc.value.code == 2
    assert "no training images: split 'nope' is not in" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        train.main(card_argv(demo_shards, tmp_path, 'e', '--dataset', 'tfds/imagenet'))
    assert exc.value.code == 2 and "--dataset type 'tfds' is not read here" in capsys.readouterr().err


def test_torchrun_two_ranks_on_shards(demo_shards, tmp_path):
    """Two gloo ranks with a loader worker each on shards: rank 0 opens (indexes, caches) them first."""
    cache = tmp_path / 'cache'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'train.py',
           '--data-dir', str(demo_shards), '--dataset', 'wds/demo', '--model', 'naflexvit_tiny_test', '--device', 'cpu',
           '-b', '4', '-j', '1', '--epochs', '1', '--warmup-epochs', '0', '--naflex-train-seq-lens', '32', '64',
           '--naflex-max-seq-len', '64', '--output', str(tmp_path), '--experiment', 'ddp']
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, NAFLEX_CACHE_DIR=str(cache)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(list(cache.glob('naflex_shards_*.npz'))) == 2  # train + validation
    log = (tmp_path / 'ddp' / 'train.log').read_text()
    assert 'rank 0 of 2' in log and '24 train images' in log and 'Eval: 0' in log
