"""Streamed tar shards (loaders.stream): who reads what in an epoch, steps, resume, and the loaders over it.

Sample k of the generated shards has class k, so the targets of a loader's batches say exactly which samples it
read. Shards are read through ``file://`` here (the same code path as a URL, without a server); test_stream_http.py
serves them over HTTP.
"""
import gc
import time

import numpy as np
import pytest
import torch

import loaders
from loaders.stream import StreamSource, rank_step_sizes, segments, shard_order, split_streams
from shard_server import ShardServer, write_shards


def _loader(source, rank=0, world_size=1, **fields):
    cfg = dict(seq_lens=(16, 32), batch_size=8, num_workers=0, patch_size=16, shuffle_buffer=4)
    return loaders.create_train_loader(source, cfg=loaders.TrainLoaderConfig(**dict(cfg, **fields)), rank=rank,
                                       world_size=world_size)


def _epoch(loader, epoch, start=0):
    loader.set_epoch(epoch)
    loader.set_start_step(start)
    return [(inputs, target) for inputs, target in loader]


def _read(shards, lengths):
    write_shards(shards, lengths)
    source = loaders.open_dataset(f'file://{shards}', 'train')
    assert isinstance(source, StreamSource) and len(source) == sum(lengths)
    return source


def test_segments_follow_the_shard_order_and_wrap_around():
    lengths, order = np.array([6, 6, 3]), np.array([2, 0, 1])  # shard 2 (3 samples), shard 0 (6), shard 1 (6)
    assert segments(lengths, order, 1, 11) == [(2, 1, 2, 0), (0, 0, 6, 0), (1, 0, 2, 0)]
    assert segments(lengths, order, 13, 18) == [(1, 4, 2, 0), (2, 0, 3, 1)]  # past the end: copy 1
    assert not np.array_equal(shard_order(100, 0, 0), shard_order(100, 0, 1))
    assert np.array_equal(shard_order(100, 0, 1), shard_order(100, 0, 1))


def test_a_short_rank_takes_one_image_fewer_in_its_largest_step():
    assert rank_step_sizes([8, 16, 3], 26) == ([8, 15, 3], 0)
    assert rank_step_sizes([8, 16, 3], 27) == ([8, 16, 3], 0)
    assert rank_step_sizes([1, 1, 1], 2) == ([1, 1, 1], 1)  # no step can give one up: one sample more is read
    parts = split_streams([4, 3, 2, 5, 1], 10, 2)  # steps 0, 2, 4 on stream 0; 1, 3 on stream 1
    assert [(p.lo, p.hi) for p in parts] == [(10, 17), (17, 25)]
    assert parts[1].steps == ((1, 0, 3), (3, 3, 5))


@pytest.mark.parametrize('workers', [0, 2])
def test_two_ranks_read_every_sample_once_with_uneven_shards(tmp_path, workers):
    """timm's wds reader reads 16 samples (14 distinct) of shards of 6, 6 and 3 on 2 ranks; here each of the 15 once
    per epoch, both ranks run the same steps (sequence lengths and count), the short rank one image fewer."""
    source = _read(tmp_path, [6, 6, 3])
    for epoch in (0, 1):
        seen, shapes = [], []
        for rank in (0, 1):
            steps = _epoch(_loader(source, rank, 2, num_workers=workers), epoch)
            seen += [t for _, target in steps for t in target.tolist()]
            shapes.append([(len(target), int(inputs['max_seqlen'])) for inputs, target in steps])
        assert sorted(seen) == list(range(15)), (epoch, seen)
        assert [L for _, L in shapes[0]] == [L for _, L in shapes[1]]
        images = [[n for n, _ in shape] for shape in shapes]
        assert sum(abs(a - b) for a, b in zip(*images)) == 1  # rank 1 (8 samples) has one image more in one step


def test_three_ranks_and_workers_over_many_steps_each_sample_once(tmp_path):
    source = _read(tmp_path, [9, 4, 7, 5, 6, 2])
    seen, counts = [], []
    for rank in range(3):
        steps = _epoch(_loader(source, rank, 3, batch_size=2, seq_lens=(16,), num_workers=2), 3)
        counts.append(len(steps))
        seen += [t for _, target in steps for t in target.tolist()]
    assert sorted(seen) == list(range(33)) and counts == [11, 11, 11]


def test_shuffle_window_draws_from_the_seed(tmp_path):
    source = _read(tmp_path, [9, 4, 7, 5, 6])
    order = {}
    for buffer in (0, 8):
        for run in (0, 1):
            steps = _epoch(_loader(source, batch_size=2, seq_lens=(16,), shuffle_buffer=buffer), 0)
            order[buffer, run] = [t for _, target in steps for t in target.tolist()]
    assert order[0, 0] == order[0, 1] and order[8, 0] == order[8, 1]
    assert order[0, 0] != order[8, 0] and sorted(order[8, 0]) == list(range(31))
    assert all(abs(a - b) < 8 for a, b in zip(np.argsort(order[0, 0]), np.argsort(order[8, 0])))  # within windows


@pytest.mark.parametrize('start', [5, 12])
def test_resume_mid_epoch_gives_the_rest_of_the_uninterrupted_epoch(tmp_path, start):
    """Two workers, a shuffle window of 4, several steps per worker stream: a loader that starts the epoch at step
    ``start`` yields the same images, augmented the same way, as the uninterrupted epoch from there."""
    source = _read(tmp_path, [9, 4, 7, 5, 6])
    full = _epoch(_loader(source, batch_size=2, seq_lens=(16,), num_workers=2), 2)
    rest = _epoch(_loader(source, batch_size=2, seq_lens=(16,), num_workers=2), 2, start=start)
    assert len(full) == 31 and len(rest) == 31 - start
    for (a, ta), (b, tb) in zip(full[start:], rest):
        assert torch.equal(ta, tb) and torch.equal(a['patches'], b['patches'])


def test_augmentation_draws_are_the_local_paths(tmp_path):
    """One rank, no sample shuffle: streamed step k holds other samples than the local step k, but an image
    augmented in a step of the same length and patch size draws the same crop and flips as on the local path."""
    source = _read(tmp_path, [5, 5])
    local = loaders.open_dataset(tmp_path, 'train', dataset='wds/ds')
    cfg = dict(batch_size=2, seq_lens=(16,), shuffle_buffer=0)
    streamed = {int(t): inputs for inputs, t in _epoch(_loader(source, **cfg), 0)}
    on_disk = {int(t): inputs for inputs, t in _epoch(_loader(local, **cfg), 0)}
    assert sorted(streamed) == sorted(on_disk) == list(range(10))
    for k in range(10):
        assert torch.equal(streamed[k]['patches'], on_disk[k]['patches']), k


def test_a_bad_member_is_replaced_within_its_step_and_reported(tmp_path):
    write_shards(tmp_path, [4, 4], bad=[5])
    source = loaders.open_dataset(f'file://{tmp_path}', 'train')
    steps = _epoch(_loader(source, batch_size=8, seq_lens=(16,), shuffle_buffer=0), 0)
    bad = [p for inputs, _ in steps for p in inputs.get('bad_files', [])]
    targets = sorted(t for _, target in steps for t in target.tolist())
    assert bad == [f'{tmp_path}/ds-train-0001.tar:s00005.jpg'] and len(targets) == 8 and 5 not in targets


def test_evaluation_scores_each_sample_once_across_ranks_and_workers(tmp_path):
    source = _read(tmp_path, [6, 6, 3])
    seen = []
    for rank in (0, 1):
        loader = loaders.make_eval_loader(source, max_seq_len=16, batch_size=2, num_workers=2, patch_size=16,
                                          rank=rank, world_size=2)
        seen += [t for _, target in loader for t in target.tolist()]
        assert len(loader) == 4  # batches of 2 of the rank's two worker parts (7 samples: 3 + 4; 8: 4 + 4)
    assert sorted(seen) == list(range(15))


def test_a_split_without_shard_lengths_is_one_error(tmp_path):
    import json
    write_shards(tmp_path, [3, 3])
    info = json.loads((tmp_path / '_info.json').read_text())
    del info['splits']['train']['shard_lengths']
    (tmp_path / '_info.json').write_text(json.dumps(info))
    with pytest.raises(ValueError, match="gives no shard_lengths for its 2 shards"):
        loaders.open_dataset(f'file://{tmp_path}', 'train')
    with pytest.raises(FileNotFoundError, match=r"split 'test' is not in"):
        loaders.open_dataset(f'file://{tmp_path}', 'test')


@pytest.mark.slow  # three short training runs: ~20 s on an idle 2-core machine
def test_train_sigterm_mid_epoch_resumes_the_stream_exactly(demo_shards, tmp_path):
    """train.py on the demo shards streamed (file://, 2 loader workers, a shuffle window of 4): SIGTERM at epoch 1
    step 1, then --resume auto gives the uninterrupted run's losses and weights."""
    import os
    import signal

    import train
    from test_train import Hooks, _weights, card_argv

    class Term(Hooks):
        def after_update(self, engine, state):
            super().after_update(engine, state)
            if (state.epoch, state.step) == (1, 1):
                os.kill(os.getpid(), signal.SIGTERM)

    def argv(name):
        return card_argv(f'file://{demo_shards}', tmp_path, name, '-j', '2', '--wds-shuffle-buffer', '4')
    full = Hooks()
    train.main(argv('full'), hooks=full)
    with pytest.raises(SystemExit) as exc:
        train.main(argv('cut'), hooks=Term())
    assert exc.value.code == 143
    resumed = Hooks()
    train.main(argv('cut') + ['--resume', 'auto'], hooks=resumed)
    assert resumed.losses and resumed.losses == [h for h in full.losses if (h[0], h[1]) >= (1, 2)]
    for k, v in _weights(tmp_path / 'full' / 'last.pth').items():
        assert torch.equal(v, _weights(tmp_path / 'cut' / 'last.pth')[k]), k


def _cut(shard, member_index):
    """Truncate ``shard`` inside the data of its ``member_index``-th member (a download that stopped there)."""
    import tarfile
    with tarfile.open(shard) as tf:
        m = tf.getmembers()[member_index]
    with open(shard, 'r+b') as f:
        f.truncate(m.offset_data + m.size // 2)


def test_a_failed_shard_is_counted_and_its_samples_made_up(tmp_path):
    """Shard 1 (samples 4-7) ends inside sample 6's image: training reports it once per missing sample (2) and reads
    two samples further on, so the epoch keeps its 12 images; evaluation counts the 2 as bad files."""
    write_shards(tmp_path, [4, 4, 4])
    _cut(tmp_path / 'ds-train-0001.tar', 4)  # members: 4 .jpg, 4 .cls, ...: the 3rd sample's image
    source = loaders.open_dataset(f'file://{tmp_path}', 'train')
    steps = _epoch(_loader(source, batch_size=2, seq_lens=(16,), shuffle_buffer=0), 0)
    bad = [p for inputs, _ in steps for p in inputs.get('bad_files', [])]
    images = [t for _, target in steps for t in target.tolist()]
    assert len(images) == 12 and not {6, 7} & set(images) and len(set(images)) == 10
    assert len(bad) == 2 and len(set(bad)) == 1 and bad[0].startswith(f'{tmp_path}/ds-train-0001.tar: ')
    assert ': 2 samples not read (' in bad[0] and 'after 2 of 4 samples' in bad[0]
    evaluated = list(loaders.make_eval_loader(source, max_seq_len=16, batch_size=5, num_workers=0, patch_size=16))
    assert sum(len(t) for _, t in evaluated) == 10
    assert sum(len(inputs.get('bad_files', [])) for inputs, _ in evaluated) == 2


def _lose_source_in_eval(rank, store, out_dir):
    """Evaluation on two gloo ranks whose rank 1 loses its streamed source after one batch."""
    import os

    import naflex
    from loaders.stream_io import DataSourceError
    from naflex.train.evaluate import evaluate
    from test_ddp import GRIDS, _init_gloo, make_packed
    _init_gloo(rank, store)

    def batches():
        for s in range(3):
            yield make_packed(GRIDS, s)
            if rank == 1:
                raise DataSourceError('http://127.0.0.1:1/x.tar: connection refused by 127.0.0.1:1 (after 3 '
                                      'retries)')
    model = naflex.create_model('naflexvit_tiny_test', num_classes=4)
    try:
        evaluate(model, batches(), 'cpu', world_size=2, mean=(0.5,) * 3, std=(0.5,) * 3)
        outcome = 'no error'
    except DataSourceError as e:
        outcome = str(e)
    with open(os.path.join(out_dir, f'rank{rank}.txt'), 'w') as f:
        f.write(outcome)
    import torch.distributed as dist
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: ~10 s on an idle 2-core machine
def test_a_source_lost_on_one_rank_during_evaluation_stops_every_rank(tmp_path):
    """No rank waits in the evaluation's all-reduce for one that lost its source: both raise rank 1's error."""
    import time

    import torch.multiprocessing as mp
    t0 = time.time()
    mp.start_processes(_lose_source_in_eval, args=(str(tmp_path / 'store'), str(tmp_path)), nprocs=2, join=True,
                       start_method='spawn')
    outcomes = [(tmp_path / f'rank{r}.txt').read_text() for r in (0, 1)]
    lost = 'http://127.0.0.1:1/x.tar: connection refused by 127.0.0.1:1 (after 3 retries)'
    assert outcomes == [f'rank 1 of 2: {lost}'] * 2
    assert time.time() - t0 < 120


def _epoch_in_process(source, world_size, workers, epoch):
    """Every rank's steps of ``epoch`` built in this process, as its ``workers`` DataLoader workers would build them
    (step s by stream s mod workers): the targets of each step. The loaders are dropped with their readers open, so
    the garbage collector ends reads whose connections go back to the pool (which must not hand them out again)."""
    steps = []
    for rank in range(world_size):
        loader = _loader(source, rank, world_size, batch_size=2, seq_lens=(16,), num_workers=workers)
        steps += [loader.step_dataset[(epoch, s)][1].tolist() for s in range(len(loader))]
    return steps


def _quiet_bytes(server, settle_s: float = 0.3, limit_s: float = 10.0) -> int:
    """The server's byte count once the readers left open are collected and it has sent nothing for ``settle_s``:
    a response a reader abandoned may still be draining into the socket, and must not count in the next epoch."""
    gc.collect()
    deadline = time.monotonic() + limit_s
    last = server.bytes_sent
    while time.monotonic() < deadline:
        time.sleep(settle_s)
        now = server.bytes_sent
        if now == last:
            return now
        last = now
    return last


@pytest.mark.filterwarnings('ignore:This DataLoader will create')  # its 4 workers are never started
def test_a_warm_epoch_gives_the_same_samples_from_fewer_bytes(tmp_path, monkeypatch):
    """2 ranks x 4 workers over 6 shards: most streams start inside a shard. The first epoch reads those shards'
    heads to skip them and remembers where each sample starts; the same epoch again opens them at the sample and
    asks for no byte past the stream's last sample there."""
    for name in ('http_proxy', 'HTTP_PROXY'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('NAFLEX_CACHE_DIR', str(tmp_path / 'cache'))
    write_shards(tmp_path / 'wds', [7, 5, 6, 4, 8, 6])
    with ShardServer(tmp_path / 'wds') as server:
        source = loaders.open_dataset(server.url, 'train')
        cold = _epoch_in_process(source, 2, 4, epoch=1)
        cold_bytes = _quiet_bytes(server)
        ranges = sum(rng is not None for _, rng in server.requests)
        warm = _epoch_in_process(source, 2, 4, epoch=1)
        warm_bytes = server.bytes_sent - cold_bytes
        warm_ranges = sum(rng is not None for _, rng in server.requests) - ranges
    assert cold == warm and sorted(sum(cold, [])) == list(range(36))
    shards_bytes = sum(p.stat().st_size for p in (tmp_path / 'wds').glob('*.tar'))
    assert cold_bytes > 1.2 * shards_bytes and warm_ranges > ranges
    assert warm_bytes == shards_bytes  # each byte once: every piece of a shard asks for its own bytes only


def test_the_shuffle_buffer_on_data_read_by_random_access_says_it_has_no_effect(demo_shards, tmp_path, caplog):
    import train
    from test_train import Hooks, card_argv

    with caplog.at_level('INFO'):
        train.main(card_argv(demo_shards, tmp_path, 'local', '--epochs', '1', '--wds-shuffle-buffer', '64'),
                   hooks=Hooks())
    said = [r.getMessage() for r in caplog.records if '--wds-shuffle-buffer' in r.getMessage()]
    assert said == ['--wds-shuffle-buffer 64 has no effect: it is the sample shuffle of streamed data (tar shards '
                    'from a URL, bucket or file:// --data-dir; --dataset hfids/), and this training set is read by '
                    'random access, in a fresh order of all its samples every epoch'], said
