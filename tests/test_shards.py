"""WebDataset tar shards (loaders.shards, scripts/make_shards.py): timm's wds layout, the member index and its
cache, random access from forked workers, bad members, and every sample once per epoch over ranks x workers."""
import io
import json
import os
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import loaders
from augment import AugConfig
from loaders import shards as S
from naflex.train.bad_files import BadFileTracker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'scripts'))
import make_shards  # noqa: E402


def test_expand_braces():
    assert S.expand_braces('a-{0000..0002}.tar') == ['a-0000.tar', 'a-0001.tar', 'a-0002.tar']
    assert S.expand_braces('x{8..11}') == ['x8', 'x9', 'x10', 'x11']
    assert S.expand_braces('{a,b{1..2}}-{0..4..2}') == ['a-0', 'a-2', 'a-4', 'b1-0', 'b1-2', 'b1-4', 'b2-0',
                                                       'b2-2', 'b2-4']
    assert S.expand_braces('t-{00..01}.tar::v-{7,9}.tar') == ['t-00.tar', 't-01.tar', 'v-7.tar', 'v-9.tar']
    assert S.expand_braces('plain{}.tar') == ['plain{}.tar'] and S.expand_braces('un{closed') == ['un{closed']


def test_make_shards_layout_and_same_samples_as_the_folder(demo_dataset, demo_shards):
    info = json.loads((demo_shards / '_info.json').read_text())
    assert set(info['splits']) == {'train', 'validation'}  # the 'val' folder is written as timm's 'validation'
    train = info['splits']['train']
    assert train['filenames'][0] == 'demo-train-0000.tar' and train['num_samples'] == 24
    assert train['shard_lengths'] == [5, 5, 5, 5, 4] and info['num_classes'] == 4
    with tarfile.open(demo_shards / 'demo-train-0000.tar') as tf:
        names = tf.getnames()
    assert [n.split('.', 1)[1] for n in names[:3]] == ['jpg', 'cls', 'json']  # KEY.jpg + KEY.cls (+ KEY.json)
    folder = loaders.ImageFolderDataset(demo_dataset, 'train')
    ds = loaders.ShardDataset(demo_shards, 'train')
    assert len(ds) == len(folder) and ds.classes == folder.classes and ds.class_names_known
    assert np.array_equal(ds.targets, folder.targets)
    for i in range(len(ds)):
        assert ds.path(i).read_bytes() == Path(folder.path(i)).read_bytes()
        assert str(ds.path(i)).startswith(str(demo_shards / 'demo-train-')) and ds.path(i).endswith('.jpg')
    assert len(loaders.ShardDataset(demo_shards, 'val')) == 16  # 'val' finds 'validation'


def test_shuffled_shards_hold_every_image_once(demo_dataset, tmp_path):
    make_shards.make_shards(demo_dataset, tmp_path, splits=['train'], samples_per_shard=7, seed=3)
    ds = loaders.ShardDataset(tmp_path, 'train')
    folder = loaders.ImageFolderDataset(demo_dataset, 'train')
    ours = sorted((ds.path(i).read_bytes(), ds.target(i)) for i in range(len(ds)))
    assert ours == sorted((Path(folder.path(i)).read_bytes(), folder.target(i)) for i in range(len(folder)))
    assert [ds.target(i) for i in range(len(ds))] != sorted(folder.targets.tolist())  # shuffled across shards


def test_split_names_brace_patterns_and_folders_without_info(demo_shards, tmp_path):
    part = loaders.ShardDataset(demo_shards, 'demo-train-{0001..0002}.tar')
    assert len(part) == 10 and part.split == 'demo-train-{0001..0002}.tar'
    assert len(loaders.ShardDataset(demo_shards, 'demo-train-{0000..0004}.tar|24')) == 24  # timm's '|N' suffix
    with pytest.raises(FileNotFoundError, match="split 'test' is not in .*splits: train, validation"):
        loaders.ShardDataset(demo_shards, 'test')
    # no _info.json: the split is a word of the shard names
    for f in demo_shards.glob('*.tar'):
        (tmp_path / f.name).symlink_to(f)
    ds = loaders.ShardDataset(tmp_path, 'val')
    assert ds.split == 'validation' and len(ds) == 16 and not ds.class_names_known and len(ds.classes) == 4


def test_shard_folders_are_found_without_the_flag(demo_dataset, demo_shards, tmp_path):
    assert S.is_shard_source(demo_shards, 'train') and S.is_shard_source(demo_shards, 'validation')
    assert not S.is_shard_source(demo_dataset, 'train')  # an image folder stays one
    assert S.is_shard_source(demo_dataset, 'train', 'wds/demo') and not S.is_shard_source(demo_shards, 'x.txt')
    (tmp_path / 'train').mkdir()
    (tmp_path / 'stray.tar').write_bytes(b'')
    assert not S.is_shard_source(tmp_path, 'train')  # a split folder wins over .tar files beside it
    assert isinstance(loaders.open_dataset(demo_shards, 'train'), loaders.ShardDataset)
    assert isinstance(loaders.open_dataset(demo_dataset, 'train'), loaders.ImageFolderDataset)
    assert S.dataset_kind('wds/imagenet-1k') == 'wds' and S.dataset_kind('imagenet') == ''
    assert S.dataset_kind('hfds/x') == 'hfds'


def test_index_is_cached_outside_the_data_folder(demo_shards, tmp_path, monkeypatch):
    before = sorted(p.name for p in demo_shards.iterdir())
    cache = tmp_path / 'cache'
    first = loaders.ShardDataset(demo_shards, 'train', cache_dir=cache)
    assert len(list(cache.glob('naflex_shards_*.npz'))) == 1
    assert sorted(p.name for p in demo_shards.iterdir()) == before  # nothing written beside the shards

    def no_rebuild(shards, **kw):
        raise AssertionError('index rebuilt although it is cached')

    monkeypatch.setattr(S, 'build_index', no_rebuild)
    again = loaders.ShardDataset(demo_shards, 'train', cache_dir=cache)
    assert [again.path(i) for i in range(len(again))] == [first.path(i) for i in range(len(first))]
    monkeypatch.undo()
    cached = next(cache.glob('naflex_shards_*.npz'))
    cached.write_bytes(cached.read_bytes()[:100])  # a torn cache file is rebuilt, not trusted
    assert len(loaders.ShardDataset(demo_shards, 'train', cache_dir=cache)) == len(first)
    assert cached.stat().st_size > 100
    monkeypatch.setenv('NAFLEX_CACHE_DIR', str(tmp_path / 'default'))
    loaders.ShardDataset(demo_shards, 'train')  # cache_dir None: $NAFLEX_CACHE_DIR
    assert len(list((tmp_path / 'default').glob('*.npz'))) == 1
    shard = demo_shards / 'demo-train-0001.tar'
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # a changed shard: rebuilt
    loaders.ShardDataset(demo_shards, 'train', cache_dir=cache)
    assert len(list(cache.glob('naflex_shards_*.npz'))) == 2


def _write_tar(path, members, fmt=tarfile.PAX_FORMAT, mtime=0):
    with tarfile.open(path, 'w', format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
                continue
            info.size, info.mtime = len(data), mtime
            tf.addfile(info, io.BytesIO(data))
    return path


def _tarfile_index(path):
    with open(path, 'rb') as f:
        samples, problems = [], []
        S._group_samples(S._tarfile_members(str(path), f.fileno(), os.path.getsize(path)), f.fileno(), path.name,
                         samples, problems)
    return samples, problems


@pytest.mark.parametrize('fmt,mtime', [(tarfile.USTAR_FORMAT, 0), (tarfile.GNU_FORMAT, 0),
                                       (tarfile.PAX_FORMAT, 1.5)])  # a float mtime: a pax header per member
def test_header_scanner_equals_tarfile(tmp_path, monkeypatch, fmt, mtime):
    long_dir = 'd' * 120 if fmt != tarfile.USTAR_FORMAT else 'p' * 90 + '/' + 'q' * 20  # pax / GNU long names
    members = [(long_dir, None)]
    for i in range(5):
        key = f'{long_dir}/s{i}' if i % 2 else f'k{i}'
        members += [(f'{key}.jpg', bytes([i]) * (100 + 700 * i)), (f'{key}.cls', str(i).encode()),
                    (f'{key}.json', b'{}')]
    members += [('orphan.jpg', b'x'), ('nocls.png', b'y' * 10), ('badcls.jpg', b'z'), ('badcls.cls', b'-1')]
    path = _write_tar(tmp_path / 'a.tar', members, fmt, mtime)
    reference = _tarfile_index(path)
    monkeypatch.setattr(S, '_tarfile_members', None)  # the fast scanner reads this shard without falling back
    samples, problems, _ = S.index_shard(str(path))
    assert (samples, problems) == reference
    assert [s[2] for s in samples] == [0, 1, 2, 3, 4] and len(problems) == 3
    with open(path, 'rb') as f:
        assert all(os.pread(f.fileno(), size, off) == bytes([t]) * (100 + 700 * t) for off, size, t, _ in samples)


def test_broken_shards(tmp_path):
    members = [(f'k{i}.{e}', d) for i in range(4) for e, d in (('jpg', b'j' * 3000), ('cls', b'1'))]
    whole = _write_tar(tmp_path / 'whole.tar', members).read_bytes()
    (tmp_path / 'cut.tar').write_bytes(whole[:3 * 4096])  # cut inside the 3rd sample's image
    samples, problems, cut = S.index_shard(str(tmp_path / 'cut.tar'))
    assert len(samples) == 2 and 'cut short after 2 samples' in problems[0] and cut == problems[0]
    (tmp_path / 'junk.tar').write_bytes(b'<html>not found</html>' * 40)
    with pytest.raises(ValueError, match='not a readable tar shard'):
        S.index_shard(str(tmp_path / 'junk.tar'))
    import gzip
    (tmp_path / 'z.tar').write_bytes(gzip.compress(whole))
    with pytest.raises(ValueError, match='compressed shards'):
        S.index_shard(str(tmp_path / 'z.tar'))
    info = {'splits': {'train': {'name': 'train', 'filenames': ['whole.tar', 'cut.tar'], 'num_samples': 8,
                                 'shard_lengths': [4, 4]}}}
    (tmp_path / '_info.json').write_text(json.dumps(info))
    with pytest.warns(UserWarning, match='cut short after 2 samples'):
        ds = loaders.ShardDataset(tmp_path, 'train')
    assert len(ds) == 6 and ds.problems and ds.cut_short == [problems[0]]
    with pytest.raises(loaders.IncompleteSplit, match='cut.tar: cut short after 2 samples'):
        loaders.make_eval_loader(ds)  # the samples after the cut can be neither scored nor counted
    whole = loaders.ShardDataset(tmp_path, 'whole.tar')  # the cached index keeps the cut shards apart too
    assert whole.cut_short == [] and loaders.ShardDataset(tmp_path, 'train').cut_short == [problems[0]]


def test_input_key_target_key_and_alt_label_as_timm(tmp_path):
    """--input-key picks the image member (first of 'a;b' present), --target-key a field of KEY.json as the label;
    a split's alt_label in _info.json does the same without the flag. Samples without it are left out, counted."""
    import io
    rng = np.random.default_rng(0)

    def png():
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(buf, format='PNG')
        return buf.getvalue()

    members = []
    for k in range(4):
        members += [(f's{k}.png', png()), (f's{k}.webp.txt', b'x'), (f's{k}.cls', b'0'),
                    (f's{k}.json', json.dumps({'meta': {'label12k': 10 + k}, 'label': 3 - k}).encode())]
    members += [('s4.png', png()), ('s4.cls', b'1'), ('s4.json', json.dumps({'label': -1}).encode())]
    _write_tar(tmp_path / 'd-train-0.tar', members)
    by_cls = loaders.ShardDataset(tmp_path, 'train', cache_dir=tmp_path / 'c')
    assert by_cls.targets.tolist() == [0, 0, 0, 0, 1]
    with pytest.warns(UserWarning, match=r"s4' has a skipped label \(-1 in .json field 'label'\)"):
        by_json = loaders.ShardDataset(tmp_path, 'train', target_key='label', cache_dir=tmp_path / 'c')
    assert by_json.targets.tolist() == [3, 2, 1, 0] and by_json.path(0).endswith(':s0.png')
    info = {'splits': {'train': {'name': 'train', 'filenames': ['d-train-0.tar'], 'alt_label': 'meta.label12k'}}}
    (tmp_path / '_info.json').write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="s4' has no field 'meta.label12k'"):
        alt = loaders.ShardDataset(tmp_path, 'train', cache_dir=tmp_path / 'c')
    assert alt.targets.tolist() == [10, 11, 12, 13]
    with pytest.warns(UserWarning, match='has no image member'):
        assert len(loaders.ShardDataset(tmp_path, 'train', input_key='jpg', cache_dir=tmp_path / 'c')) == 0
    webp_first = loaders.ShardDataset(tmp_path, 'train', input_key='webp;png', target_key='label',
                                      cache_dir=tmp_path / 'c')
    assert webp_first.path(0).endswith(':s0.png')  # no .webp member: the next key


def test_a_shard_cut_during_evaluation_counts_its_lost_samples_as_bad_files(demo_shards, tmp_path):
    """Indexed whole, then cut inside its 3rd sample's image (a file replaced while the run reads it): the samples
    from the cut on fail to read and are counted as bad files, so images + bad files is still the split's size."""
    import shutil
    shutil.copytree(demo_shards, tmp_path / 'wds')
    ds = loaders.ShardDataset(tmp_path / 'wds', 'validation', cache_dir=tmp_path / 'cache')
    shard = tmp_path / 'wds' / 'demo-validation-0000.tar'
    with tarfile.open(shard) as tf:
        m = [m for m in tf if m.name.endswith('.jpg')][2]
    with open(shard, 'r+b') as f:
        f.truncate(m.offset_data + m.size // 2)
    images, bad = 0, []
    for inputs, target in loaders.make_eval_loader(ds, batch_size=4, max_seq_len=64, patch_size=8, num_workers=1):
        images += target.shape[0]
        bad += inputs['bad_files']
    assert len(ds) == 16 and images + len(bad) == 16
    assert bad == [str(ds.path(i)) for i in (2, 3, 4)] and bad[0] == f'{shard}:{m.name}'


def _corrupt_one_member(src: Path, dst: Path) -> str:
    """A copy of the shards with the first image member of shard 0001 overwritten: returns its SHARD:MEMBER."""
    import shutil
    shutil.copytree(src, dst)
    shard = dst / 'demo-train-0001.tar'
    with tarfile.open(shard) as tf:
        m = next(m for m in tf if m.name.endswith('.jpg'))
    with open(shard, 'r+b') as f:
        f.seek(m.offset_data)
        f.write(b'\0' * m.size)
    return f'{shard}:{m.name}'


def test_bad_member_replaced_and_reported_with_shard_and_member(demo_shards, tmp_path):
    bad = _corrupt_one_member(demo_shards, tmp_path / 'wds')
    ld = loaders.create_train_loader(loaders.ShardDataset(tmp_path / 'wds', 'train'), seq_lens=(16, 64),
                                     batch_size=4, patch_size=8, num_workers=1, seed=0)
    reported = []
    for step, (inputs, target) in zip(ld.schedule.steps(0), ld):
        assert inputs['seq_lens'].shape[0] == len(step.indices) == target.shape[0]  # replaced: the step keeps its shape
        reported += inputs['bad_files']
    assert set(reported) == {bad} and type(reported[0]) is str  # a plain name once it left the worker
    tracker = BadFileTracker(tmp_path / 'out', max_fraction=0.5, min_samples=1)
    tracker.add(reported, len(ld.dataset))
    assert (tmp_path / 'out' / 'bad_files.txt').read_text() == bad + '\n'  # SHARD.tar:MEMBER
    ev = loaders.make_eval_loader(loaders.ShardDataset(tmp_path / 'wds', 'train'), max_seq_len=16, batch_size=4,
                                  patch_size=8, num_workers=2)
    seen, ev_bad = 0, []
    for inputs, target in ev:
        seen += target.shape[0]
        ev_bad += inputs['bad_files']
    assert seen == 23 and ev_bad == [bad]


@pytest.fixture(scope='module')
def coded_shards(tmp_path_factory):
    """23 solid-colour PNGs of varied sizes whose red value encodes the sample (8 * id + 4), as 4 shards."""
    root = tmp_path_factory.mktemp('coded')
    rng = np.random.default_rng(0)
    for i in range(23):
        d = root / 'train' / f'c{i % 3}'
        d.mkdir(parents=True, exist_ok=True)
        h, w = (int(x) for x in rng.integers(12, 48, 2))
        Image.new('RGB', (w, h), (8 * i + 4, 100, 50)).save(d / f'{i:02d}.png')
    make_shards.make_shards(root, root / 'wds', samples_per_shard=6, seed=1)
    return root / 'wds'


def _ids_read(loader, epoch):
    """The sample ids a loader's workers actually decoded in ``epoch``, step by step."""
    loader.set_epoch(epoch)
    steps = []
    for inputs, _ in loader:
        starts = inputs['cu_seqlens'][:-1].long()
        steps.append([(int(r) - 4) // 8 for r in inputs['patches'][starts, 0]])
    return steps


@pytest.mark.parametrize('world_size,num_workers', [(1, 2), (3, 0), (2, 2)])
def test_every_sample_once_per_epoch_over_ranks_and_workers(coded_shards, world_size, num_workers):
    ds = loaders.ShardDataset(coded_shards, 'train')
    truth = {i: ds.path(i).read_bytes() for i in range(len(ds))}  # this process opens the shards first (forks follow)
    assert len(truth) == 23
    aug = AugConfig(hflip=0.0, color_jitter=0.0, interpolation='bilinear')
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world_size):
            ld = loaders.create_train_loader(ds, aug=aug, seq_lens=(16, 64), batch_size=3, patch_size=8,
                                             num_workers=num_workers, seed=5, rank=rank, world_size=world_size)
            steps = _ids_read(ld, epoch)
            name_of = {int(Path(ds.path(i).rsplit(':', 1)[1]).stem.split('_')[1]): i for i in range(len(ds))}
            expected = [[name_of[j] for j in ids] for ids in steps]
            assert expected == [[int(i) for i in s.indices] for s in ld.schedule.steps(epoch)]  # the bytes of the
            per_rank.append(steps)                                                               # scheduled sample
        assert len({len(s) for s in per_rank}) == 1  # the same number of steps on every rank
        counts = Counter(j for steps in per_rank for ids in steps for j in ids)
        assert set(counts) == set(range(23))  # every sample read this epoch ...
        extra = -(-23 // world_size) * world_size - 23
        assert sum(counts.values()) == 23 + extra and sum(c - 1 for c in counts.values()) == extra  # ... once


def test_forked_worker_opens_its_own_descriptor(coded_shards):
    ds = loaders.ShardDataset(coded_shards, 'train')
    member = ds.path(0)
    member.read_bytes()
    parent_fds = dict(S._open_shards._fds)
    assert parent_fds and S._open_shards._pid == os.getpid()
    import multiprocessing as mp
    ctx = mp.get_context('fork')
    q = ctx.Queue()

    def child():
        data = member.read_bytes()
        whole = Path(member.shard).read_bytes()
        q.put((S._open_shards._pid == os.getpid(), data == whole[member.offset:member.offset + member.size]))

    p = ctx.Process(target=child)
    p.start()
    own_pid, same_bytes = q.get(timeout=60)
    p.join()
    assert own_pid and same_bytes and dict(S._open_shards._fds) == parent_fds
    assert os.fstat(parent_fds[member.shard])  # the parent's descriptor is still open


def test_open_file_cap(coded_shards, monkeypatch):
    ds = loaders.ShardDataset(coded_shards, 'train')
    pool = S._OpenShards()
    pool.capacity = 2
    monkeypatch.setattr(S, '_open_shards', pool)
    for i in range(len(ds)):
        assert ds.path(i).read_bytes()[:4] == b'\x89PNG'
        assert len(pool._fds) <= 2
    assert len(ds.shards) == 4


def test_benchmarks_read_shards(demo_dataset, demo_shards, capsys):
    """scripts/bench: bench_loader.py runs our loader on shards (timm's is refused there), bench_shards.py runs."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'scripts' / 'bench'))
    import bench_loader
    import bench_shards
    argv = ['--data-dir', str(demo_shards), '--dataset', 'wds/demo', '--steps', '2', '-j', '0', '-b', '4',
            '--naflex-train-seq-lens', '32', '64']
    best = bench_loader.main(argv + ['--only', 'ours'])
    assert best['ours']['steps'] == 2 and 'data=ShardDataset' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_loader.main(argv)
    rows = bench_shards.main(['--folder', str(demo_dataset), '--shards', str(demo_shards), '--repeats', '1'])
    assert [count for what, _, count in rows if what.startswith('index')] == [24, 24, 24]
