"""Train/eval loader, packing and device prefetch on small generated image folders."""

import contextlib
import time

import numpy as np
import pytest
import torch
from PIL import Image

import loaders
from augment import AugConfig, MixupConfig
from loaders.packing import pack, pad, patchify_hwc
from loaders.prefetch import normalize_patches

NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # mean, std


def make_folder(root, num_classes=3, per_class=7, seed=0):
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        d = root / 'train' / f'class{c}'
        d.mkdir(parents=True)
        for i in range(per_class):
            h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f'img{i}.jpg' if i % 2 else d / f'img{i}.png')
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path)


def small_loader(root, **kw):
    args = dict(seq_lens=(16, 32, 64), batch_size=4, patch_size=8, num_workers=0, seed=3)
    args.update(kw)
    return loaders.create_train_loader(root, 'train', **args)


def test_packed_batch_format(folder):
    ld = small_loader(folder)
    inputs, target = next(iter(ld))
    B = inputs['seq_lens'].shape[0]
    T = int(inputs['seq_lens'].sum())
    assert inputs['patches'].dtype == torch.uint8 and inputs['patches'].shape == (T, 8 * 8 * 3)
    assert inputs['patch_coord'].shape == (T, 2) and inputs['patch_coord'].dtype == torch.int32
    assert inputs['cu_seqlens'].tolist() == [0] + torch.cumsum(inputs['seq_lens'], 0).tolist()
    assert inputs['cu_seqlens'].dtype == torch.int32 and inputs['seq_lens'].dtype == torch.int32
    gs = inputs['grid_sizes']
    assert gs.shape == (B, 2) and (gs[:, 0] * gs[:, 1]).tolist() == inputs['seq_lens'].tolist()
    assert inputs['max_seqlen'] == int(inputs['seq_lens'].max())
    assert inputs['patch_size'] == 8 and inputs['bad_files'] == []
    assert target.dtype == torch.int64 and target.shape == (B,)
    # coordinates are row-major inside each image's grid
    cu = inputs['cu_seqlens']
    for b in range(B):
        c = inputs['patch_coord'][cu[b]:cu[b + 1]]
        gh, gw = gs[b].tolist()
        assert c[:, 0].max() == gh - 1 and c[:, 1].max() == gw - 1 and c[1, 1] == (1 if gw > 1 else 0)


def test_packed_batches_carry_the_step_seq_len(folder):
    """'seq_len' = the step's L from the schedule (train) or max_seq_len (eval); max_seqlen only bounds it."""
    from naflex.model.batch import describe_seq_len
    ld = small_loader(folder)
    for k, (inputs, _) in enumerate(ld):
        L = ld.schedule.step(0, k).seq_len
        assert inputs['seq_len'] == L and inputs['max_seqlen'] <= L and int(inputs['seq_lens'].max()) <= L
        assert describe_seq_len(inputs) == str(L)
    ev = loaders.create_eval_loader(folder, 'train', max_seq_len=48, batch_size=4, patch_size=8, num_workers=0)
    assert all(inputs['seq_len'] == 48 for inputs, _ in ev)


def test_padded_batch_format(folder):
    ld = small_loader(folder, packing=False)
    inputs, target = next(iter(ld))
    B, N, D = inputs['patches'].shape
    L = ld.schedule.step(0, 0).seq_len
    assert N == L and D == 192 and inputs['patches'].dtype == torch.uint8
    assert inputs['patch_valid'].shape == (B, N) and inputs['patch_coord'].shape == (B, N, 2)
    assert (inputs['patches'][~inputs['patch_valid']] == 0).all()


def test_patchify_matches_timm_layout():
    from timm.data.naflex_transforms import patchify_image
    img = torch.randint(0, 256, (32, 48, 3), dtype=torch.uint8)
    ours = patchify_hwc(img, 16)
    ref, coord, _ = patchify_image(img.permute(2, 0, 1).contiguous(), (16, 16), channels_last=True)
    assert torch.equal(ours, ref)
    packed = pack([img, img[:16]], 16)
    assert torch.equal(packed['patch_coord'][:6].long(), coord)
    padded = pad([img], 16, seq_len=8)
    assert torch.equal(padded['patches'][0, :6], ref) and padded['patch_valid'][0].sum() == 6


def test_prefetcher_normalizes_on_device(folder):
    ld = small_loader(folder, num_workers=0)
    mean, std = (0.48, 0.45, 0.40), (0.27, 0.26, 0.28)
    pf = loaders.DevicePrefetcher(ld, 'cpu', mean=mean, std=std)
    assert len(pf) == len(ld)
    raw, _ = next(iter(ld))
    got, _ = next(iter(pf))
    p = raw['patches'].float().view(raw['patches'].shape[0], -1, 3)
    ref = ((p / 255 - torch.tensor(mean)) / torch.tensor(std)).view(raw['patches'].shape)
    assert got['patches'].dtype == torch.float32
    torch.testing.assert_close(got['patches'], ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(got['seq_lens'], raw['seq_lens']) and got['max_seqlen'] == raw['max_seqlen']


def test_normalize_padded_shape():
    p = torch.randint(0, 256, (2, 5, 12), dtype=torch.uint8)
    out = normalize_patches(p, torch.tensor([0.5] * 3), torch.tensor([0.5] * 3))
    torch.testing.assert_close(out, p.float() / 127.5 - 1)


def _epoch_keys(ld, epoch):
    ld.set_epoch(epoch)
    out = []
    for inputs, target in ld:
        out.append((inputs['patches'].clone(), target.clone(), inputs['seq_lens'].clone()))
    return out


def test_deterministic_and_worker_independent(folder):
    aug = AugConfig(aa='rand-m9-mstd1.0', grayscale_prob=0.2, reprob=0.5)
    mix = MixupConfig(num_classes=3, mixup_alpha=0.8, cutmix_alpha=1.0)
    a = _epoch_keys(small_loader(folder, num_workers=0, aug=aug, mixup=mix), 1)
    b = _epoch_keys(small_loader(folder, num_workers=2, aug=aug, mixup=mix), 1)
    assert len(a) == len(b) > 1
    for (pa, ta, la), (pb, tb, lb) in zip(a, b):
        assert torch.equal(pa, pb) and torch.equal(ta, tb) and torch.equal(la, lb)
    c = _epoch_keys(small_loader(folder, num_workers=0, aug=aug, mixup=mix), 2)
    assert any(x[0].shape != y[0].shape or not torch.equal(x[0], y[0]) for x, y in zip(a, c))


def test_set_epoch_with_persistent_workers_and_resume(folder):
    ld = small_loader(folder, num_workers=2, persistent_workers=True)
    e0 = _epoch_keys(ld, 0)
    e1 = _epoch_keys(ld, 1)
    ref1 = _epoch_keys(small_loader(folder, num_workers=0), 1)
    assert len(e1) == len(ref1) == len(ld)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(e1, ref1))
    assert any(x[0].shape != y[0].shape or not torch.equal(x[0], y[0]) for x, y in zip(e0, e1))
    # exact mid-epoch resume
    ld.set_epoch(1)
    ld.set_start_step(2)
    resumed = [(x['patches'], t) for x, t in ld]
    assert len(resumed) == len(ld) - 2
    assert all(torch.equal(r[0], e[0]) and torch.equal(r[1], e[1]) for r, e in zip(resumed, e1[2:]))
    # start offset is one-shot
    assert len(_epoch_keys(ld, 1)) == len(ld)


class DrawRecorder:
    """Records what the loader draws, through the real pipeline: per loaded sample ('class/file', the first
    number its RNG gives: the crop's area draw), and per mixed step the MixUp lambda (read back from the
    own-weights mix_variable_size returns: own = 1 - (1 - lam) * overlap / area)."""

    def __init__(self, monkeypatch):
        import random as _random

        from loaders import train_loader
        from loaders.pipeline import TrainSampleBuilder
        self.crops, self.lams = [], []
        build, mix = TrainSampleBuilder.build_pil, train_loader.mix_variable_size

        def build_pil(builder, path, L, P, rng):
            probe = _random.Random()
            probe.setstate(rng.getstate())
            self.crops.append(('/'.join(str(path).split('/')[-2:]), probe.random()))
            return build(builder, path, L, P, rng)

        def mix_variable_size(imgs, targets, cfg, rng, **kw):
            sizes = [(x.height, x.width) for x in imgs]
            out = mix(imgs, targets, cfg, rng, **kw)
            own, partner = out[2], out[3]
            i = next(i for i, j in enumerate(partner) if j is not None)
            (hi, wi), (hj, wj) = sizes[i], sizes[partner[i]]
            self.lams.append(1 - (1 - own[i]) * hi * wi / (min(hi, hj) * min(wi, wj)))
            return out

        monkeypatch.setattr(TrainSampleBuilder, 'build_pil', build_pil)
        monkeypatch.setattr(train_loader, 'mix_variable_size', mix_variable_size)

    def step(self, loader, epoch, k):
        """(crop draws, lambda or None) of one step of ``loader``."""
        c, m = len(self.crops), len(self.lams)
        loader.step_dataset[(epoch, k)]
        return self.crops[c:], (self.lams[m] if len(self.lams) > m else None)


MIXUP_ONLY = MixupConfig(num_classes=3, mixup_alpha=0.8, cutmix_alpha=0.0)


def test_ranks_draw_independent_crops_and_lambdas(tmp_path, monkeypatch):
    """world_size 2: on every step the two ranks draw other crops and another MixUp lambda (the same draws on
    every rank would give a global step W times fewer independent augmentations)."""
    folder = make_folder(tmp_path, per_class=14)
    rec = DrawRecorder(monkeypatch)
    ranks = [small_loader(folder, seq_lens=(16,), batch_size=8, rank=r, world_size=2, mixup=MIXUP_ONLY)
             for r in (0, 1)]  # 21 images per rank: steps of 8, 8 and 5, all mixed
    num_lams = 0
    for k in range(len(ranks[0])):
        (crops0, lam0), (crops1, lam1) = (rec.step(ld, 0, k) for ld in ranks)
        assert {name for name, _ in crops0}.isdisjoint(name for name, _ in crops1)  # disjoint shards
        assert all(a[1] != b[1] for a, b in zip(crops0, crops1)), k  # slot by slot, other crop draws
        if lam0 is not None and lam1 is not None:
            assert 0 <= lam0 <= 1 and 0 <= lam1 <= 1 and abs(lam0 - lam1) > 1e-9, k
            num_lams += 1
    assert num_lams == len(ranks[0]) == 3
    draws = [d for _, d in rec.crops]
    assert len(set(draws)) == len(draws) == 42  # every image of the epoch drew its own crop


def test_sample_draws_do_not_depend_on_world_size_or_slot(tmp_path, monkeypatch):
    """An image's augmentation is seeded by (seed, epoch, dataset index, copy): the same crop draws with 1 or 2
    ranks, and (another epoch) other ones. A bad file's replacement is seeded by the index it replaces."""
    folder = make_folder(tmp_path, per_class=6)
    (folder / 'train' / 'class0' / 'broken.jpg').write_bytes(b'not an image')
    rec = DrawRecorder(monkeypatch)

    def epoch_draws(epoch, world_size):
        rec.crops.clear()
        for r in range(world_size):
            ld = small_loader(folder, rank=r, world_size=world_size)
            for k in range(len(ld)):
                rec.step(ld, epoch, k)
        return sorted(rec.crops)

    one, two = epoch_draws(0, 1), epoch_draws(0, 2)  # the broken file is replaced (reported by the trainer)
    later = epoch_draws(1, 1)
    assert len(one) == 20  # 19 files (one broken) and the broken one's replacement
    # 2 ranks: the same draws, plus the one index repeated to even out the ranks, with a draw of its own
    assert set(one) < set(two) and len(set(two)) == len(two) == len(one) + 1
    assert [n for n, _ in one].count('class0/broken.jpg') == 1
    assert {d for _, d in one}.isdisjoint(d for _, d in later)


def test_train_loader_sees_every_file_once(folder):
    ld = small_loader(folder)
    ds = ld.dataset
    seen = []
    for epoch in range(2):
        steps = ld.schedule.steps(epoch)
        idx = np.concatenate([s.indices for s in steps])
        assert sorted(idx.tolist()) == list(range(len(ds)))
        seen.append(idx.tolist())
    assert seen[0] != seen[1]


def test_mixup_targets_are_soft(folder):
    mix = MixupConfig(num_classes=0, mixup_alpha=0.8, cutmix_alpha=1.0, smoothing=0.1)
    ld = small_loader(folder, mixup=mix)
    inputs, target = next(iter(ld))
    assert target.dtype == torch.float32 and target.shape == (inputs['seq_lens'].shape[0], 3)
    torch.testing.assert_close(target.sum(1), torch.ones(target.shape[0]))


def test_mixup_off_keeps_soft_targets(folder):
    """Mixing switched off (MixupConfig.off_epoch, the one switch) reaches a persistent worker; targets stay soft."""
    mix = MixupConfig(num_classes=0, mixup_alpha=0.8, cutmix_alpha=1.0, smoothing=0.0, off_epoch=1)
    ld = small_loader(folder, mixup=mix, num_workers=1)
    _, t_on = next(iter(ld))
    ld.set_epoch(1)
    _, t_off = next(iter(ld))  # another step of the schedule: the batch size may differ, the format does not
    assert t_off.dtype == t_on.dtype and t_off.shape[1] == t_on.shape[1] and (t_off.max(1).values == 1).all()
    assert (t_on.max(1).values < 1).any()


def test_mixup_off_epoch_flag_stops_mixing_at_that_epoch(folder):
    """--mixup-off-epoch 1 (through train.py's flags): epoch 0 mixes, epoch 1 has one-hot soft targets."""
    from naflex.train.cli import build_parser, config_from_args
    parser = build_parser()
    args = parser.parse_args(['--mixup', '0.8', '--cutmix', '1.0', '--mixup-off-epoch', '1', '--smoothing', '0'])
    mix = config_from_args(args, parser).mixup
    ld = small_loader(folder, mixup=mix)
    assert any((t.max(1).values < 1).any() for _, t in ld)
    ld.set_epoch(1)
    for _, t in ld:
        assert t.dtype == torch.float32 and (t.max(1).values == 1).all()


def test_eval_loader_grid_and_sharding(folder):
    from timm.data.naflex_transforms import get_image_size_for_seq
    ds = loaders.ImageFolderDataset(folder, 'train')
    seen = []
    for rank in range(3):
        ev = loaders.create_eval_loader(folder, 'train', max_seq_len=64, batch_size=5, patch_size=8,
                                        num_workers=0, rank=rank, world_size=3)
        for inputs, target in ev:
            seen.extend(target.tolist())
            assert int(inputs['seq_lens'].max()) <= 64
    assert sorted(seen) == sorted(ds.targets.tolist())
    ev = loaders.create_eval_loader(folder, 'train', max_seq_len=64, batch_size=64, patch_size=8, num_workers=0)
    inputs, _ = next(iter(ev))
    for i in range(len(ds)):
        w, h = Image.open(ds.path(i)).size
        _, (th, tw) = get_image_size_for_seq((h, w), 8, 64)
        assert inputs['grid_sizes'][i].tolist() == [th // 8, tw // 8]


def test_create_from_args(folder):
    """train.py's flags -> configs -> the one loader factory (what train.py and the loader benchmarks do)."""
    from naflex.train.cli import build_parser, config_from_args
    p = build_parser(groups=('dataset', 'aug', 'naflex', 'run'))
    args = p.parse_args(['--data-dir', str(folder), '--train-split', 'train', '--val-split', 'train',
                         '--naflex-train-seq-lens', '16', '32', '-b', '4', '-j', '0', '--mixup', '0.8',
                         '--cutmix', '1.0', '--aa', 'rand-m8-inc1-mstd1.0', '--naflex-max-seq-len', '32'])
    cfg = config_from_args(args, p)
    train = loaders.create_train_loader(folder, cfg.data.train_split, cfg.loader, aug=cfg.aug, mixup=cfg.mixup,
                                        patch_size=8)
    val = loaders.create_eval_loader(folder, cfg.data.val_split, cfg.eval, patch_size=8)
    args.color_jitter = None  # timm: --color-jitter None (e.g. from a -c file) means no jitter
    assert config_from_args(args, p).aug.color_jitter is None
    assert config_from_args(p.parse_args([]), p).aug.color_jitter == 0.4
    x, t = next(iter(train))
    assert t.shape[1] == 3 and int(x['seq_lens'].max()) <= 32
    x, t = next(iter(val))
    assert t.dtype == torch.int64 and int(x['seq_lens'].max()) <= 32


@pytest.mark.cuda
def test_prefetcher_cuda_matches_cpu(folder):
    ld = small_loader(folder, num_workers=1, pin_memory=True)
    cpu = [x['patches'] for x, _ in loaders.DevicePrefetcher(ld, 'cpu', *NORM)]
    ld.set_epoch(0)
    gpu = list(loaders.DevicePrefetcher(ld, 'cuda', *NORM, dtype=torch.bfloat16))
    assert len(gpu) == len(cpu)
    for (x, t), ref in zip(gpu, cpu):
        assert x['patches'].is_cuda and x['patches'].dtype == torch.bfloat16 and x['cu_seqlens'].is_cuda
        torch.testing.assert_close(x['patches'].float().cpu(), ref, atol=1e-2, rtol=1e-2)
        assert t.is_cuda


class FakeCopyStream:
    """Stand-in for loaders.prefetch.CudaCopyStream: an "event" is the number of copies queued when it was
    recorded, and each hand-over logs the event it waited on and how many copies were queued by then."""

    def __init__(self):
        self.queued, self.hand_overs, self.started = 0, [], False

    def start(self):
        self.started = True

    @contextlib.contextmanager
    def queue(self):
        yield
        self.queued += 1

    def mark_ready(self):
        return self.queued

    def hand_over(self, ready, tensors):
        assert all(torch.is_tensor(t) for t in tensors)
        self.hand_overs.append((ready, self.queued))


def test_prefetcher_hand_over_waits_for_its_own_copy(folder):
    """Batch k is handed over on the event recorded after copy k, although copy k+1 is already queued: the
    consumer never waits for the next batch's copy (waiting on the side stream itself would)."""
    ld = small_loader(folder)
    expected = list(loaders.DevicePrefetcher(ld, 'cpu', *NORM))
    pf = loaders.DevicePrefetcher(ld, 'cpu', *NORM)
    pf.copy_stream = fake = FakeCopyStream()
    got = list(pf)
    n = len(expected)
    assert n >= 3 and len(got) == n and fake.started
    assert [ready for ready, _ in fake.hand_overs] == list(range(1, n + 1))
    assert [queued for _, queued in fake.hand_overs] == list(range(2, n + 1)) + [n]  # one batch ahead
    for (x, t), (rx, rt) in zip(got, expected):
        assert torch.equal(x['patches'], rx['patches']) and torch.equal(t, rt)


@pytest.mark.cuda
def test_prefetcher_cuda_step_does_not_wait_for_next_copy(folder):
    """On the GPU: with every copy followed by a long side-stream sleep, the consumer gets batch 0 and finishes
    work on it while batch 1's copy (and its sleep) is still running."""
    ld = small_loader(folder, pin_memory=True)
    pf = loaders.DevicePrefetcher(ld, 'cuda', *NORM)
    events, copy = [], pf._to_device

    def slow_copy(batch):
        out = copy(batch)
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU clock cycles, queued on the side stream after the copy
        return out
    pf._to_device = slow_copy
    mark_ready = pf.copy_stream.mark_ready
    pf.copy_stream.mark_ready = lambda: events.append(mark_ready()) or events[-1]
    it = iter(pf)
    x, _ = next(it)
    x['patches'].float().sum().item()  # consumer-stream work on batch 0, then a host sync
    assert events[0].query() and len(events) == 2
    assert not events[1].query(), 'the hand-over of batch 0 waited for the copy of batch 1'
    torch.cuda.synchronize()


def test_variable_patch_size_per_step(folder):
    ld = small_loader(folder, seq_lens=(16, 32), patch_sizes=(8, 16), patch_size_probs=(1, 1), batch_size=2)
    seen = set()
    for (inputs, _), step in zip(ld, ld.schedule.steps(0)):
        P = step.patch_size
        assert inputs['patch_size'] == P and inputs['patches'].shape[1] == P * P * 3
        assert int(inputs['seq_lens'].max()) <= step.seq_len
        seen.add(P)
    assert seen == {8, 16}


def test_shared_data_one_step_documented_flags(shared_data):
    from loaders.schedule import batch_size_for
    ld = loaders.create_train_loader(
        shared_data, 'train', seq_lens=(128, 256), batch_size=8, num_workers=0, seed=0,
        aug=AugConfig(aa='rand-m8-inc1-mstd1.0', grayscale_prob=0.1), mixup=MixupConfig(num_classes=0))
    step = ld.schedule.step(0, 0)
    inputs, target = next(iter(ld))
    assert target.shape == (batch_size_for(step.seq_len, 8 * 256), 101)
    assert int(inputs['seq_lens'].max()) <= step.seq_len and inputs['bad_files'] == []
    # most crops fill the sequence well (the largest grid that fits L)
    assert float(inputs['seq_lens'].float().mean()) > 0.8 * step.seq_len


def test_prefetcher_matches_timm_prefetcher_normalization(folder):
    from timm.data.naflex_loader import NaFlexPrefetchLoader
    ld = small_loader(folder, packing=False)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ours = [x['patches'] for x, _ in loaders.DevicePrefetcher(ld, 'cpu', mean=mean, std=std)]
    batches = [({k: v for k, v in x.items() if isinstance(v, torch.Tensor)}, t) for x, t in ld]
    ref = [x['patches'] for x, _ in NaFlexPrefetchLoader(batches, mean=mean, std=std, device=torch.device('cpu'))]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _signalled_worker(init, ready):
    init(0)
    ready.set()
    time.sleep(60)


def test_workers_leave_sigint_and_sigterm_to_the_main_process():
    """A worker set up by loaders.workers lives through the SIGINT and SIGTERM that a terminal or a scheduler sends
    to every process of a job, and still dies of the SIGTERM its main process sends (DataLoader's terminate())."""
    import multiprocessing
    import os
    import signal
    import subprocess

    from loaders.workers import worker_init
    ctx = multiprocessing.get_context('fork')
    ready = ctx.Event()
    worker = ctx.Process(target=_signalled_worker, args=(worker_init(), ready), daemon=True)
    worker.start()
    try:
        assert ready.wait(30)
        os.kill(worker.pid, signal.SIGINT)
        subprocess.run(['kill', '-TERM', str(worker.pid)], check=True)  # sent by another process
        worker.join(1.0)
        assert worker.is_alive()
        worker.terminate()  # SIGTERM from this process, the worker's main process
        worker.join(10)
        assert worker.exitcode == -signal.SIGTERM
    finally:
        if worker.is_alive():
            worker.kill()
