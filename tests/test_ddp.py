"""DDP gradient weighting: 2 gloo processes == 1 process on the same global batch.

The engine multiplies each rank's loss by world * b_rank / b_global, so DDP's gradient average weights
every image equally even when the images of a step split unevenly across ranks (3 + 5 here). After 3 steps
(SGD with momentum; also with --grad-accum-steps 2) the parameters of rank 0 match the single-process run to
atol/rtol 1e-5 (float32 summation order is the only difference). Also: torchrun end to end, and a non-finite
loss on one rank stopping every rank.
"""
import contextlib
import os

import pytest
import torch
import torch.multiprocessing as mp

import naflex
from naflex.train.config import TrainConfig
from naflex.train.engine import TrainState, Trainer, train_one_epoch

PATCH = 16
NUM_CLASSES = 4


def make_packed(grids, seed):
    """A packed batch of random normalized images with the given (h, w) patch grids + int targets."""
    g = torch.Generator().manual_seed(seed)
    lens = [h * w for h, w in grids]
    coords = [torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij'), -1).reshape(-1, 2)
              for h, w in grids]
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    inputs = {
        'patches': torch.randn(sum(lens), PATCH * PATCH * 3, generator=g),
        'patch_coord': torch.cat(coords).to(torch.int32),
        'seq_lens': seq_lens,
        'cu_seqlens': torch.nn.functional.pad(seq_lens.cumsum(0), (1, 0)).to(torch.int32),
        'max_seqlen': max(lens),
        'grid_sizes': torch.tensor(grids, dtype=torch.int32),
        'patch_size': PATCH,
    }
    target = torch.randint(0, NUM_CLASSES, (len(grids),), generator=g)
    return inputs, target


def take(batch, idx):
    """Sub-batch of the images ``idx`` of a packed batch."""
    inputs, target = batch
    lens = inputs['seq_lens'].tolist()
    starts = inputs['cu_seqlens'].tolist()
    grids = inputs['grid_sizes'][idx].tolist()
    sub = make_packed(grids, 0)[0]
    sub['patches'] = torch.cat([inputs['patches'][starts[i]:starts[i] + lens[i]] for i in idx])
    return sub, target[idx]


GRIDS = [(2, 3), (3, 2), (1, 4), (2, 2), (4, 1), (3, 3), (2, 1), (1, 2)]
SPLIT = [[0, 1, 2], [3, 4, 5, 6, 7]]  # uneven: 3 images on rank 0, 5 on rank 1
STEPS = 3


def _model():
    torch.manual_seed(0)
    return naflex.create_model('naflexvit_tiny_test', num_classes=NUM_CLASSES)


def _train(model, batches, world_size, accum=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    cfg = TrainConfig(device='cpu', loss_scale='none', smoothing=0.1, log_interval=1, grad_accum_steps=accum)
    eng = Trainer(model, opt, cfg, batch_size_reference=8, world_size=world_size)
    state = TrainState()
    metrics = train_one_epoch(eng, iter(batches), len(batches), state)
    return metrics, state


def _finish():
    """Tear down after the DDP objects are gone: destroying the group under a live DDP reducer can make gloo
    abort at exit ('terminate called without an active exception')."""
    import gc

    import torch.distributed as dist
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _init_gloo(rank, store):
    """Join a 2-process gloo group through a file store (no TCP port to race for with other test runs)."""
    import torch.distributed as dist
    os.environ.update(RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=2)


def _worker(rank, store, out):
    from naflex.train.distributed import init_distributed
    _init_gloo(rank, store)
    info = init_distributed('cpu')  # picks up the existing group
    batches = [take(make_packed(GRIDS, s), SPLIT[rank]) for s in range(STEPS)]
    result = {}
    for accum in (1, 2):  # accum 2: the first micro-batch of each update runs under DDP's no_sync
        model = torch.nn.parallel.DistributedDataParallel(_model())
        metrics, _ = _train(model, batches, 2, accum)
        result[accum] = {'params': {k: v.detach() for k, v in model.module.state_dict().items()},
                         'loss': metrics['loss'], 'images': metrics['images']}
    if info.rank == 0:
        torch.save(result, out)
    del model
    _finish()


_DDP_RESULTS = {}  # one 2-process spawn serves both parametrizations


@pytest.mark.parametrize('accum', [1, 2])
def test_two_process_gloo_matches_single_process(tmp_path_factory, accum):
    """accum 2 over 3 steps: updates of 2 micro-batches (DDP no_sync on the first) and a final one of 1."""
    if not _DDP_RESULTS:
        out = tmp_path_factory.mktemp('ddp') / 'rank0.pt'
        store = out.parent / 'store'
        mp.start_processes(_worker, args=(str(store), str(out)), nprocs=2, join=True, start_method='spawn')
        _DDP_RESULTS.update(torch.load(out))
    ddp = _DDP_RESULTS[accum]
    single = _model()
    metrics, state = _train(single, [make_packed(GRIDS, s) for s in range(STEPS)], 1, accum)
    assert state.num_updates == -(-STEPS // accum)
    assert ddp['images'] == metrics['images'] == STEPS * len(GRIDS)
    assert ddp['loss'] == pytest.approx(metrics['loss'], rel=1e-5)
    moved = 0.0
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp['params'][k], v, atol=1e-5, rtol=1e-5, msg=k)
        moved = max(moved, (v - _model().state_dict()[k]).abs().max().item())
    assert moved > 1e-3  # training actually changed the weights


def test_torchrun_two_processes_end_to_end(demo_dataset, tmp_path):
    """`torchrun --nproc_per_node 2 train.py ...` on CPU (gloo): trains, evaluates, only rank 0 writes files."""
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           'train.py', '--data-dir', str(demo_dataset), '--model', 'naflexvit_tiny_test', '--device', 'cpu',
           '-b', '4', '-j', '0', '--epochs', '1', '--warmup-epochs', '0', '--naflex-train-seq-lens', '32', '64',
           '--naflex-max-seq-len', '64', '--opt', 'adamw', '--lr', '1e-3', '--mixup', '0.8', '--log-interval', '1',
           '--output', str(tmp_path), '--experiment', 'ddp']
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / 'ddp'
    assert [p.name for p in tmp_path.iterdir()] == ['ddp']
    assert (run / 'last.pth').is_file() and (run / 'summary.csv').read_text().count('\n') == 2
    log = (run / 'train.log').read_text()
    assert 'rank 0 of 2' in log and 'Eval: 0' in log
    ckpt = torch.load(run / 'last.pth', weights_only=True)
    assert ckpt['train_state']['world_size'] == 2 and len(ckpt['rng']) == 2


def _nan_worker(rank, store, out_dir):
    from naflex.train.engine import NonFiniteLossError
    _init_gloo(rank, store)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    batches = [take(make_packed(GRIDS, s), SPLIT[rank]) for s in range(STEPS)]
    if rank == 1:
        batches[1][0]['patches'][:] = float('nan')  # only rank 1 sees a non-finite loss at step 1
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = Trainer(model, opt, TrainConfig(device='cpu', loss_scale='none', log_interval=100, smoothing=0.0),
                  batch_size_reference=1, world_size=2)
    try:
        train_one_epoch(eng, iter(batches), len(batches), TrainState())
        msg = 'finished'
    except NonFiniteLossError as e:
        msg = str(e)
    with open(os.path.join(out_dir, f'rank{rank}.txt'), 'w') as f:
        f.write(msg)
    del model, eng
    _finish()


def test_non_finite_loss_on_one_rank_stops_all(tmp_path):
    ctx = mp.start_processes(_nan_worker, args=(str(tmp_path / 'store'), str(tmp_path)), nprocs=2, join=False,
                             start_method='spawn')
    deadline = 120
    import time
    t0 = time.time()
    while not ctx.join(timeout=5):
        assert time.time() - t0 < deadline, 'ranks hung after a non-finite loss'
    for rank in (0, 1):
        msg = (tmp_path / f'rank{rank}.txt').read_text()
        assert msg.startswith('non-finite loss at epoch 0 step 1/3'), msg


def _stop_worker(rank, store, out_dir):
    from naflex.train.engine import StopRequested
    _init_gloo(rank, store)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    batches = [take(make_packed(GRIDS, s), SPLIT[rank]) for s in range(STEPS)]

    class Sigterm:  # only rank 1 "receives SIGTERM", after its first update
        requested = False

        def after_update(self, engine, state):
            if rank == 1 and state.step == 1:
                self.requested = True

        def wants_stop(self):
            return self.requested

    _epoch_outcome(rank, out_dir, model, batches, Sigterm(), StopRequested, log_interval=1)
    del model
    _finish()


def _failure_worker(rank, store, out_dir):
    _init_gloo(rank, store)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    batches = [take(make_packed(GRIDS, s), SPLIT[rank]) for s in range(STEPS)]

    class Broken:  # only rank 1 holds an error (as its bad-file tracker does), from its first update on
        error = None

        def after_update(self, engine, state):
            if rank == 1:
                self.error = RuntimeError('its share is undecodable')

        def failure(self):
            return self.error

    _epoch_outcome(rank, out_dir, model, batches, Broken(), RuntimeError, log_interval=100, recovery_interval=1)
    del model
    _finish()


def _epoch_outcome(rank, out_dir, model, batches, callback, stops_with, **train_cfg):
    """One epoch with ``callback``; writes 'finished' or the stop message with the recovery saves to rank<R>.txt."""
    saved = []
    eng = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                  TrainConfig(device='cpu', loss_scale='none', smoothing=0.0, **train_cfg), batch_size_reference=1,
                  world_size=2, callbacks=[callback])
    try:
        train_one_epoch(eng, iter(batches), len(batches), TrainState(), save_recovery=lambda st: saved.append(st.step))
        msg = 'finished'
    except stops_with as e:
        msg = f'{e} saved={saved}'
    del eng
    with open(os.path.join(out_dir, f'rank{rank}.txt'), 'w') as f:
        f.write(msg)


def test_an_error_on_one_rank_stops_all_before_the_next_save(tmp_path):
    """A failure one rank holds is agreed on before a recovery save between log updates: both ranks raise it at
    the same update (its message names the rank) and nothing is saved after it."""
    mp.start_processes(_failure_worker, args=(str(tmp_path / 'store'), str(tmp_path)), nprocs=2, join=True,
                       start_method='spawn')
    for rank in (0, 1):
        assert (tmp_path / f'rank{rank}.txt').read_text() == 'rank 1 of 2: its share is undecodable saved=[1]'


def test_sigterm_on_one_rank_stops_all_at_the_same_step(tmp_path):
    mp.start_processes(_stop_worker, args=(str(tmp_path / 'store'), str(tmp_path)), nprocs=2, join=True,
                       start_method='spawn')
    for rank in (0, 1):
        msg = (tmp_path / f'rank{rank}.txt').read_text()
        assert msg.startswith('stopped on SIGTERM at epoch 0 step 2/3') and msg.endswith('saved=[2]'), msg


@pytest.mark.parametrize('to', ['torchrun', 'group'])
def test_sigterm_to_torchrun_saves_and_torchrun_exits_1(demo_dataset, tmp_path, to):
    """What a scheduler sees: torchrun forwards SIGTERM to every process, each stops at the same update after the
    recovery save and exits 143, and torchrun itself exits 1 with a SignalException (documented in the README).
    'group': SIGTERM to every process of the job at once (Slurm, Kubernetes), 2 loader workers per rank included."""
    import signal
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           'train.py', '--data-dir', str(demo_dataset), '--model', 'naflexvit_tiny_test', '--device', 'cpu',
           '-b', '4', '-j', '2' if to == 'group' else '0', '--epochs', '1000', '--warmup-epochs', '0',
           '--naflex-train-seq-lens', '32', '--naflex-max-seq-len', '32', '--val-split', '', '--log-interval', '1',
           '--output', str(tmp_path), '--experiment', 'term']
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:  # rank 0's log: the signal handlers are installed once training logs a step
            if 'Train: 0' in line:
                break
        if to == 'group':
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever the test left running
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err[-3000:]
    assert 'SignalException' in err and 'got signal: 15' in err
    assert 'DataLoader worker' not in err, err[-3000:]
    assert 'stopped on SIGTERM' in out and 'continue with --resume auto' in out
    run = tmp_path / 'term'
    assert list(run.glob('recovery-*.pth')) or (run / 'last.pth').is_file()


def _broken_share_worker(rank, store, argv, out_dir, share):
    """train.py's main on one of two gloo ranks; rank 1's reads fail, as on a node whose data mount broke: all of
    them (``share`` 'all': it gives up on its first sample) or those of two classes (half: the share rule)."""
    from loaders import pipeline
    from loaders.decode import UndecodableImage
    _init_gloo(rank, store)
    if rank == 1:
        build = pipeline.TrainSampleBuilder.build_pil

        def failing(self, path, *args):
            if share == 'all' or '00_disk' in str(path) or '01_square' in str(path):
                raise UndecodableImage('unreadable')
            return build(self, path, *args)
        pipeline.TrainSampleBuilder.build_pil = failing
    train_and_record_exit(rank, argv, out_dir)


def train_and_record_exit(rank, argv, out_dir):
    """train.main(argv) on this rank; its exit code (0 when it returns) written to ``out_dir/rank{rank}.txt``."""
    import train
    try:
        train.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    with open(os.path.join(out_dir, f'rank{rank}.txt'), 'w') as f:
        f.write(str(code))


@pytest.mark.parametrize('share', ['all', 'half'])
def test_bad_files_on_one_rank_stop_every_rank(demo_dataset, tmp_path, share):
    """Only rank 1's share is undecodable: both ranks stop within a minute with exit 1 (none waits in a collective
    for the other), train.log says why and bad_files.txt lists rank 1's files."""
    import time
    argv = ['--data-dir', str(demo_dataset), '--model', 'naflexvit_tiny_test', '--device', 'cpu', '-b', '4', '-j', '0',
            '--epochs', '3', '--warmup-epochs', '0', '--naflex-train-seq-lens', '32', '--naflex-max-seq-len', '32',
            '--log-interval', '1', '--output', str(tmp_path), '--experiment', 'bad']
    ctx = mp.start_processes(_broken_share_worker, args=(str(tmp_path / 'store'), argv, str(tmp_path), share),
                             nprocs=2, join=False, start_method='spawn')
    t0 = time.time()
    try:
        while not ctx.join(timeout=2):
            assert time.time() - t0 < 90, 'a rank still waits after the other stopped on bad files'
    finally:
        for p in ctx.processes:
            p.kill() if p.is_alive() else None
    assert [(tmp_path / f'rank{r}.txt').read_text() for r in (0, 1)] == ['1', '1']
    run = tmp_path / 'bad'
    log = (run / 'train.log').read_text()
    expected = ('20 files in a row failed to decode for one sample of step 0 (epoch 0)' if share == 'all' else
                'above the 1.00% threshold (--bad-file-limit 0.01)')
    assert 'ERROR rank 1 of 2: ' in log and expected in log, log[-2000:]
    listed = (run / 'bad_files.txt').read_text().split()
    assert listed and f'{len(listed)} distinct files listed in {run}/bad_files.txt' in log
    assert share == 'all' or all('00_disk' in p or '01_square' in p for p in listed)
    assert not (run / 'last.pth').exists() and not list(run.glob('recovery-*'))
