"""train.py and validate.py on tar shards served over HTTP from 127.0.0.1 (loaders.stream): two gloo ranks train
through a corrupt member, validate.py scores what the local path scores, and a server that goes away mid-run ends
the run with one line, quickly."""
import time

import pytest
import torch
import torch.multiprocessing as mp

import naflex
import train
import validate
from shard_server import ShardServer, write_shards
from test_ddp import _init_gloo, train_and_record_exit

TINY = ['--model', 'naflexvit_tiny_test', '--device', 'cpu', '--warmup-epochs', '0', '--naflex-max-seq-len', '32']


@pytest.fixture
def shards(tmp_path):
    """train: shards of 6, 6 and 3 samples, sample 4's image corrupt; validation: 4 and 3, sample 2's corrupt."""
    root = tmp_path / 'wds'
    write_shards(root, [6, 6, 3], bad=[4])
    write_shards(root, [4, 3], split='validation', bad=[2])
    return root


@pytest.fixture
def quick_failures(monkeypatch):
    monkeypatch.setenv('NAFLEX_STREAM_TIMEOUT', '2')
    monkeypatch.setenv('NAFLEX_STREAM_RETRIES', '1')


def _rank_main(rank, store, argv, out_dir):
    _init_gloo(rank, store)
    train_and_record_exit(rank, argv, out_dir)


@pytest.mark.slow  # two processes importing torch and training: ~30 s on an idle 2-core machine
def test_two_ranks_train_over_http_through_a_corrupt_member(shards, tmp_path):
    with ShardServer(shards, process=True) as server:
        url = server.url
        argv = ['--data-dir', url, *TINY, '-b', '8', '-j', '1', '--epochs', '1', '--naflex-train-seq-lens', '16', '32',
                '--bad-file-limit', '0.5', '--output', str(tmp_path), '--experiment', 'http']
        mp.start_processes(_rank_main, args=(str(tmp_path / 'store'), argv, str(tmp_path)), nprocs=2, join=True,
                           start_method='spawn')
    assert [(tmp_path / f'rank{r}.txt').read_text() for r in (0, 1)] == ['0', '0']
    run = tmp_path / 'http'
    log = (run / 'train.log').read_text()
    assert 'streaming 15 samples in 3 shards from http://127.0.0.1:' in log and 'Eval: 0' in log, log[-2000:]
    assert (run / 'bad_files.txt').read_text().split() == [f'{url}/ds-train-0000.tar:s00004.jpg',
                                                           f'{url}/ds-validation-0000.tar:s00002.jpg']
    assert (run / 'last.pth').is_file()


def test_validate_over_http_scores_what_the_local_shards_score(shards, tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / 'tiny.pth'
    torch.save({'state_dict': naflex.create_model('naflexvit_tiny_test', num_classes=15).state_dict()}, ckpt)
    argv = ['--model', 'naflexvit_tiny_test', '--checkpoint', str(ckpt), '-j', '2', '-b', '3',
            '--naflex-max-seq-len', '32', '--device', 'cpu']
    local = validate.main(['--data-dir', str(shards)] + argv)[0]
    with ShardServer(shards, process=True) as server:
        streamed = validate.main(['--data-dir', server.url] + argv)[0]
    assert (streamed['images'], streamed['bad_files']) == (local['images'], local['bad_files']) == (6, 1)
    assert (streamed['top1'], streamed['top5']) == (local['top1'], local['top5'])
    assert streamed['loss'] == pytest.approx(local['loss'], abs=1e-6)


def test_the_server_going_away_mid_run_is_one_line(shards, tmp_path, quick_failures, capsys):
    write_shards(shards, [2] * 10)  # 20 steps of one image, a shard every second step
    server = ShardServer(shards, process=True)

    class StopServer:
        def after_update(self, engine, state):
            if state.step == 2:
                server.stop()

        def after_epoch(self, state):
            return False

    with server:
        url = server.url
        argv = ['--data-dir', url, *TINY, '-b', '2', '-j', '1', '--epochs', '1', '--naflex-train-seq-lens', '16',
                '--wds-shuffle-buffer', '0', '--val-split', '', '--output', str(tmp_path), '--experiment', 'gone']
        t0 = time.time()
        with pytest.raises(SystemExit) as exc:
            train.main(argv, hooks=StopServer())
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and len(err) == 1, err
    assert err[0].startswith('train.py: error: ') and url in err[0], err
    assert time.time() - t0 < 60


def test_bench_loader_compares_local_and_http_streamed_shards(demo_shards, capsys):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'scripts' / 'bench'))
    import bench_loader
    best = bench_loader.main(['--data-dir', str(demo_shards), '--dataset', 'wds/demo', '--steps', '2', '-j', '1',
                              '-b', '4', '--naflex-train-seq-lens', '32', '64', '--stream-http'])
    assert best['shards']['steps'] == best['http']['steps'] == 2 and best['http']['ms_cpu_img'] > 0
    assert '| http |' in capsys.readouterr().out
