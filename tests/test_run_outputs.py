"""What a run leaves besides checkpoints: curves.png (loss, top-1, lr per epoch from summary.csv) at the end of
train.py, never failing the run over a picture; and ``--log-wandb`` logging the same per-epoch rows to Weights &
Biases (offline here; skipped when the optional wandb package is not installed)."""
import csv
import logging
import sys

import pytest
from PIL import Image

import train
from naflex.train import logger as run_logger
from naflex.train.logger import RunWriter

TINY = ['--model', 'naflexvit_tiny_test', '--device', 'cpu', '-b', '8', '-j', '0', '--warmup-epochs', '0',
        '--naflex-train-seq-lens', '32', '--naflex-max-seq-len', '32', '--opt', 'adamw', '--lr', '1e-3']


def _summary_rows(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_train_writes_curves_png(demo_dataset, tmp_path):
    train.main(['--data-dir', str(demo_dataset), *TINY, '--epochs', '2', '--output', str(tmp_path),
                '--experiment', 'run'])
    with Image.open(tmp_path / 'run' / 'curves.png') as png:
        assert png.format == 'PNG' and png.size == (1320, 385)  # three panels, 12 x 3.5 in at 110 dpi


def test_curves_keep_the_latest_row_of_a_repeated_epoch(tmp_path):
    """A run resumed from an older checkpoint appends epochs it already logged: the curve shows the new rows."""
    rows = [dict(epoch=0, train_loss=2.0, eval_top1=10.0, lr=1e-3), dict(epoch=1, train_loss=1.5, eval_top1=20.0,
                                                                         lr=9e-4),
            dict(epoch=1, train_loss=1.4, eval_top1=25.0, lr=9e-4), dict(epoch=2, train_loss=1.2, eval_top1='',
                                                                         lr=5e-4)]
    with open(tmp_path / 'summary.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    kept = run_logger._epoch_rows(tmp_path / 'summary.csv')
    assert [(r['epoch'], r['train_loss']) for r in kept] == [(0, 2.0), (1, 1.4), (2, 1.2)]
    assert 'eval_top1' not in kept[2]  # an epoch without evaluation has no top-1 point
    assert run_logger.plot_curves(tmp_path / 'summary.csv', tmp_path / 'c.png') == tmp_path / 'c.png'
    (tmp_path / 'empty.csv').write_text('epoch,train_loss\n')
    assert run_logger.plot_curves(tmp_path / 'empty.csv', tmp_path / 'none.png') is None
    assert not (tmp_path / 'none.png').exists()


def test_a_failing_plot_is_a_warning(tmp_path, monkeypatch, caplog):
    def broken(*_):
        raise RuntimeError('no fonts')
    monkeypatch.setattr(run_logger, 'plot_curves', broken)
    writer = RunWriter(tmp_path, tensorboard=False)
    writer.summary({'epoch': 0, 'train_loss': 1.0})
    with caplog.at_level(logging.WARNING):
        writer.close()  # does not raise
    assert 'no curves.png written: RuntimeError: no fonts' in caplog.text
    RunWriter(None).close()  # the other ranks: nothing to write, nothing drawn


def test_log_wandb_without_the_package_is_one_line(demo_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'wandb', None)  # import wandb -> ImportError, as when it is not installed
    with pytest.raises(SystemExit) as e:
        train.main(['--data-dir', str(demo_dataset), *TINY, '--log-wandb', '--output', str(tmp_path / 'out')])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["train.py: error: --log-wandb needs the wandb package: pip install wandb (or pip install -e "
                   "'.[wandb]')"]
    assert not (tmp_path / 'out').exists()  # checked before the run folder exists


def test_log_wandb_logs_the_summary_rows(demo_dataset, tmp_path, monkeypatch):
    wandb = pytest.importorskip('wandb')
    for k, v in dict(WANDB_MODE='offline', WANDB_SILENT='true', WANDB_CONSOLE='off',
                     WANDB_DISABLE_CODE='true').items():
        monkeypatch.setenv(k, v)
    logged, started = [], []
    real_init, real_log = wandb.init, wandb.sdk.wandb_run.Run.log

    def init(**kw):
        started.append(kw)
        return real_init(**kw)

    def log(run, data, step=None, **kw):
        logged.append((step, dict(data)))
        return real_log(run, data, step=step, **kw)
    monkeypatch.setattr(wandb, 'init', init)
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, 'log', log)
    train.main(['--data-dir', str(demo_dataset), *TINY, '--epochs', '2', '--log-wandb', '--wandb-project', 'naflex',
                '--output', str(tmp_path), '--experiment', 'wb'])
    run = tmp_path / 'wb'
    assert [(k['project'], k['name'], k['dir']) for k in started] == [('naflex', 'wb', str(run))]
    assert started[0]['config']['model'] == 'naflexvit_tiny_test' and started[0]['config']['lr'] == 1e-3
    summary = _summary_rows(run / 'summary.csv')
    assert [step for step, _ in logged] == [0, 1]
    for (_, row), csv_row in zip(logged, summary):
        assert {k: f'{v}' for k, v in row.items()} == {k: v for k, v in csv_row.items() if v != ''}
    assert list((run / 'wandb').glob('offline-run-*/run-*.wandb'))  # the offline run, ready for `wandb sync`


def test_train_log_holds_the_runs_lines_only(tmp_path):
    """A library's INFO line (matplotlib's 'generated new fontManager' on a fresh machine) stays out of train.log;
    the run's lines and anyone's warnings go in, those logged before the file existed included."""
    import logging

    from naflex.train.logger import attach_log_file, setup_logging
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    setup_logging(None, primary=True)
    try:
        logging.getLogger('train').info('device cpu, output x')
        logging.getLogger('matplotlib.font_manager').info('generated new fontManager')
        attach_log_file(tmp_path / 'train.log')
        logging.getLogger('naflex.train.optim').info('optimizer built')
        logging.getLogger('PIL.Image').warning('a warning from a library')
        logging.getLogger('matplotlib').info('another library line')
        text = (tmp_path / 'train.log').read_text()
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            if h not in saved[1]:
                h.close()
        for h in saved[1]:
            root.addHandler(h)
        root.setLevel(saved[0])
    assert 'device cpu' in text and 'optimizer built' in text and 'a warning from a library' in text
    assert 'fontManager' not in text and 'another library line' not in text
