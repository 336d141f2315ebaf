"""Datasets (folder scan, class order, splits), decoding (modes, EXIF, JPEG draft) and bad-file handling."""
import io
import itertools
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import loaders
from augment import MixupConfig
from naflex.train.bad_files import BadFileTracker, TooManyBadFiles
from loaders.dataset import ImageFolderDataset
from loaders.decode import decode_resized, open_image, to_rgb


def _rand(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 255 // max(1, w - 1)), (y * 255 // max(1, h - 1)), (x + y) % 256], -1).astype(np.uint8)


def make_odd_files(d):
    """Decodable-but-unusual files and undecodable ones. Returns (good names, bad names)."""
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rand(40, 50)).save(d / 'normal.jpg')
    Image.fromarray(_rand(1, 1)).save(d / 'one_pixel.png')
    Image.fromarray(_rand(20, 10000)).save(d / 'wide_10000x20.png')  # 10000 wide, 20 high
    Image.fromarray(_rand(30, 30)).convert('CMYK').save(d / 'cmyk.jpg')
    Image.fromarray((np.arange(24 * 24).reshape(24, 24) * 100).astype(np.uint16)).save(d / 'sixteen_bit.png')
    pal = Image.fromarray(_rand(20, 20)).convert('P', palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info['transparency'] = 0
    pal.save(d / 'palette_transparent.png', transparency=0)
    Image.fromarray(_rand(20, 20)).convert('LA').save(d / 'grey_alpha.PNG')
    buf = io.BytesIO()
    Image.fromarray(_rand(64, 64)).save(buf, format='JPEG')
    (d / 'truncated.jpg').write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / 'zero_bytes.jpg').write_bytes(b'')
    (d / 'text.jpg').write_text('this is not an image\n' * 10)
    good = ['normal.jpg', 'one_pixel.png', 'wide_10000x20.png', 'cmyk.jpg', 'sixteen_bit.png',
            'palette_transparent.png', 'grey_alpha.PNG']
    return good, ['truncated.jpg', 'zero_bytes.jpg', 'text.jpg']


def _class_folders(root, names, per_class=2):
    for c in names:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(_rand(8, 8, i)).save(root / c / f'{i}.JPEG')


def test_class_order_matches_timms_reader(tmp_path):
    """timm's folder reader sorts class names naturally (case-insensitive, numbers by value): a timm checkpoint's
    labels line up with ours. torchvision's sorted() would give 1, 10, 2, Apple, banana."""
    from timm.data import create_dataset
    _class_folders(tmp_path / 'train', ['1', '2', '10', 'Apple', 'banana', 'Faces', 'a_b'])
    (tmp_path / 'train' / 'Faces' / 'notes.txt').write_text('skip me')
    ds = ImageFolderDataset(tmp_path, 'train')
    ref = create_dataset('', root=str(tmp_path), split='train')
    assert ds.classes == ['1', '2', '10', 'a_b', 'Apple', 'banana', 'Faces']
    assert ds.class_to_idx == ref.reader.class_to_idx
    base = tmp_path / 'train'
    ours = sorted((ds.relpath(i), ds.target(i)) for i in range(len(ds)))
    assert ours == sorted((str(Path(p).relative_to(base)), t) for p, t in ref.reader.samples)


def test_class_map_fixes_the_label_space(tmp_path):
    """--class-map (timm's file): index i is line i; folders it does not name are left out, as timm's reader
    does; a name it lists without a folder is an empty class; text-list splits follow it too."""
    from timm.data import create_dataset
    from loaders import read_class_map
    _class_folders(tmp_path / 'train', ['cat', 'dog', 'emu'])
    (tmp_path / 'map.txt').write_text('dog\ncat\nyak\n')
    names = read_class_map('map.txt', tmp_path)  # relative to the data root, as timm finds it
    assert names == ['dog', 'cat', 'yak']
    ds = ImageFolderDataset(tmp_path, 'train', classes=names)
    ref = create_dataset('', root=str(tmp_path), split='train', class_map=str(tmp_path / 'map.txt'))
    assert ds.classes == names and ds.skipped_classes == ['emu']
    assert sorted((ds.relpath(i), ds.target(i)) for i in range(len(ds))) == sorted(
        (str(Path(p).relative_to(tmp_path / 'train')), t) for p, t in ref.reader.samples)
    (tmp_path / 'train' / 'list.txt').write_text('emu/0.JPEG\ncat/1.JPEG\n')
    listed = ImageFolderDataset(tmp_path, 'train/list.txt', classes=names)
    assert [listed.relpath(i) for i in range(len(listed))] == ['cat/1.JPEG'] and list(listed.targets) == [1]
    with pytest.raises(ValueError, match='twice'):
        ImageFolderDataset(tmp_path, 'train', classes=['cat', 'cat'])
    with pytest.raises(FileNotFoundError, match='nowhere.txt'):
        read_class_map('nowhere.txt', tmp_path)


def test_split_aliases_text_split_and_cache(tmp_path):
    for split in ('train', 'val'):
        for c in ('a', 'b'):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(_rand(8, 8, i)).save(tmp_path / split / c / f'{i}.png')
    assert len(ImageFolderDataset(tmp_path, 'validation')) == 6  # 'validation' -> val/
    (tmp_path / 'train_sub.txt').write_text('b/1.png\na/2.png\n')
    sub = ImageFolderDataset(tmp_path / 'train', str(tmp_path / 'train_sub.txt'))
    assert [sub.target(i) for i in range(2)] == [1, 0] and sub.path(0).endswith('b/1.png')
    # 'train/<class>/<file>' lines in a list at the root (as the not-found message suggests): the classes are the
    # class folders, not 'train'
    (tmp_path / 'list.txt').write_text('train/b/1.png\ntrain/a/2.png\n')
    listed = ImageFolderDataset(tmp_path, 'list.txt')
    assert listed.classes == ['a', 'b'] and list(listed.targets) == [1, 0] and listed.path(0).endswith('train/b/1.png')
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path, 'test')
    cache = tmp_path / 'cache'
    a = ImageFolderDataset(tmp_path, 'train', cache_dir=cache)
    b = ImageFolderDataset(tmp_path, 'train', cache_dir=cache)
    assert len(list(cache.iterdir())) == 1 and [a.path(i) for i in range(6)] == [b.path(i) for i in range(6)]


def test_decode_modes_to_rgb(tmp_path):
    good, bad = make_odd_files(tmp_path)
    for name in good:
        img = decode_resized(tmp_path / name, None, (16, 16))
        assert img.mode == 'RGB' and img.size == (16, 16)
    # 16-bit grey is scaled, not clipped
    arr = np.asarray(to_rgb(Image.open(tmp_path / 'sixteen_bit.png')))
    assert arr.max() > 200 and len(np.unique(arr[..., 0])) > 100
    for name in bad:
        with pytest.raises(Exception):
            decode_resized(tmp_path / name, None, (16, 16))


def _exif_rotated_jpeg(path):
    """A 40 wide, 20 high JPEG whose EXIF tag says: show it rotated 90 degrees clockwise (20 wide, 40 high)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_smooth(20, 40)).save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_off_by_default_like_timm(tmp_path):
    """timm's readers hand Image.open(f).convert('RGB') to the transforms: the stored pixels, not the upright view.
    Ours by default too; exif_orientation=True turns the image upright."""
    path = _exif_rotated_jpeg(tmp_path / 'rot.jpg')
    assert open_image(path)[1:] == (20, 40, 1)
    stored = decode_resized(path, None, (20, 40), draft=False)
    with Image.open(path) as ref:
        assert np.array_equal(np.asarray(stored), np.asarray(ref.convert('RGB')))
    assert open_image(path, exif_orientation=True)[1:] == (40, 20, 6)
    upright = decode_resized(path, None, (40, 20), opened=open_image(path, exif_orientation=True))
    assert upright.size == (20, 40)
    assert np.array_equal(np.asarray(upright), np.asarray(stored.transpose(Image.Transpose.ROTATE_270)))


def test_exif_orientation_switch_reaches_train_and_eval_loaders(tmp_path):
    """--exif-orientation (train.py: train and eval loaders; validate.py: eval) decides the grid of a rotated file."""
    from augment import AugConfig
    from naflex.train.cli import build_parser, config_from_args
    folder = tmp_path / 'd' / 'train' / 'a'
    folder.mkdir(parents=True)
    _exif_rotated_jpeg(folder / 'r.jpg')
    p = build_parser()
    for argv, grid in (([], [2, 4]), (['--exif-orientation'], [4, 2])):  # 20 x 40 px, P = 8, L = 10
        cfg = config_from_args(p.parse_args(argv), p)
        assert cfg.aug.exif_orientation == cfg.eval.exif_orientation == bool(argv)
        ev = loaders.create_eval_loader(tmp_path / 'd', 'train', cfg.eval, max_seq_len=10, patch_size=8,
                                        num_workers=0)
        assert next(iter(ev))[0]['grid_sizes'][0].tolist() == grid
        aug = AugConfig(scale=(1, 1), ratio=(1, 1), exif_orientation=cfg.aug.exif_orientation)
        tr = loaders.create_train_loader(tmp_path / 'd', 'train', aug=aug, seq_lens=(10,), batch_size=1,
                                         patch_size=8, num_workers=0)
        assert next(iter(tr))[0]['grid_sizes'][0].tolist() == grid


def test_jpeg_draft_covers_same_region(tmp_path):
    Image.fromarray(_smooth(1200, 1600)).save(tmp_path / 'big.jpg', quality=95)
    box = (300, 400, 800, 1000)  # top, left, h, w
    a = np.asarray(decode_resized(tmp_path / 'big.jpg', box, (96, 120), draft=True)).astype(float)
    b = np.asarray(decode_resized(tmp_path / 'big.jpg', box, (96, 120), draft=False)).astype(float)
    assert a.shape == b.shape == (96, 120, 3)
    assert np.abs(a - b).mean() < 2.0  # same region, only resampling differs
    with Image.open(tmp_path / 'big.jpg') as img:
        img.draft('RGB', (200, 150))
        assert img.size[0] < 1600  # draft really reduces this file


def test_bad_files_replaced_and_reported(tmp_path):
    good, bad = make_odd_files(tmp_path / 'data' / 'train' / 'odd')
    for i in range(6):
        (tmp_path / 'data' / 'train' / 'ok').mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rand(30, 40, i)).save(tmp_path / 'data' / 'train' / 'ok' / f'{i}.jpg')
    ld = loaders.create_train_loader(tmp_path / 'data', 'train', seq_lens=(16, 64), batch_size=4, patch_size=8,
                                     num_workers=0, seed=0)
    reported = []
    for epoch in range(3):
        ld.set_epoch(epoch)
        for step, (inputs, target) in zip(ld.schedule.steps(epoch), ld):
            assert inputs['seq_lens'].shape[0] == len(step.indices) == target.shape[0]  # shape kept
            assert int(inputs['seq_lens'].max()) <= step.seq_len
            reported += inputs['bad_files']
    names = {p.rsplit('/', 1)[1] for p in reported}
    assert names == set(bad)  # every bad file used was reported; no decodable one was
    tracker = BadFileTracker(tmp_path / 'out', max_fraction=0.5, min_samples=1)
    tracker.add(reported, 3 * len(ld.dataset))
    lines = (tmp_path / 'out' / 'bad_files.txt').read_text().split()
    assert sorted(lines) == sorted(set(reported))
    ev = loaders.create_eval_loader(tmp_path / 'data', 'train', max_seq_len=16, batch_size=4, patch_size=8,
                                    num_workers=0)
    n_ok, ev_bad = 0, []
    for inputs, target in ev:
        n_ok += target.shape[0]
        ev_bad += inputs['bad_files']
        assert inputs['seq_lens'].shape[0] == target.shape[0]
    assert n_ok == len(good) + 6 and {p.rsplit('/', 1)[1] for p in ev_bad} == set(bad)


def test_bad_file_tracker_threshold(tmp_path, caplog):
    t = BadFileTracker(tmp_path, max_fraction=0.01, min_samples=100)
    with caplog.at_level(logging.WARNING):
        t.update({'bad_files': ['/x/a.jpg'], 'seq_lens': torch.zeros(200)})
        t.update({'bad_files': ['/x/a.jpg'], 'seq_lens': torch.zeros(200)})
    assert t.num_failures == 2 and caplog.text.count('/x/a.jpg') == 1  # logged once
    assert (tmp_path / 'bad_files.txt').read_text() == '/x/a.jpg\n'
    with pytest.raises(TooManyBadFiles, match='threshold'):
        t.update({'bad_files': ['/x/b.jpg'] * 5, 'seq_lens': torch.zeros(10)})


def test_a_step_given_up_on_comes_with_stand_ins(tmp_path):
    """Every file undecodable: iterating the loader raises UndecodableFiles with the 20 failures of the sample it
    gave up on, and with the step itself (grey one-patch stand-ins, the shape kept), through a worker process."""
    for c in ('a', 'b'):
        (tmp_path / 'train' / c).mkdir(parents=True)
        for i in range(4):
            (tmp_path / 'train' / c / f'{i}.jpg').write_bytes(b'not an image')
    ld = loaders.create_train_loader(tmp_path, 'train', seq_lens=(16,), batch_size=8, patch_size=8, num_workers=1,
                                     seed=0, mixup=MixupConfig(num_classes=2, mixup_alpha=0.8, cutmix_alpha=1.0))
    step = next(iter(ld.schedule.steps(0)))
    with pytest.raises(loaders.UndecodableFiles) as exc:
        next(iter(ld))
    inputs, target = exc.value.batch
    assert len(exc.value.paths) == 20 and inputs['bad_files'] == exc.value.paths
    assert inputs['seq_lens'].tolist() == [1] * len(step.indices) and target.shape == (len(step.indices), 2)
    assert (inputs['patches'] == 128).all()


def _batch(name, num_images, bad=()):
    return {'bad_files': list(bad), 'seq_lens': torch.zeros(num_images), 'name': name}, None


def test_bad_file_tracker_of_one_rank_of_several_holds_its_stop(tmp_path):
    """With several ranks the tracker raises nothing: it keeps the stop for the trainer (``failure()``) and hands
    out the batch at hand again, so this rank reaches the update where all ranks agree to stop."""
    t = BadFileTracker(tmp_path, max_fraction=0.01, min_samples=10, writes=False, world_size=2)
    batches = [_batch('a', 10), _batch('b', 10, ['/x/b.jpg'] * 5), _batch('c', 10)]
    it = t.track(iter(batches))
    assert t.failure() is None and next(it)[0]['name'] == 'a' and t.failure() is None
    assert [next(it)[0]['name'] for _ in range(4)] == ['b'] * 4
    assert 'above the 1.00% threshold' in str(t.failure()) and t.failure().paths == ['/x/b.jpg']
    assert not (tmp_path / 'bad_files.txt').exists() and f'listed in {tmp_path}/bad_files.txt' in str(t.failure())

    def gives_up():
        yield _batch('a', 10)
        raise loaders.UndecodableFiles(['/x/c.jpg'] * 20, 0, 1, _batch('stand-ins', 10, ['/x/c.jpg'] * 20))

    t = BadFileTracker(tmp_path, writes=False, world_size=2)
    assert [b['name'] for b, _ in itertools.islice(t.track(gives_up()), 4)] == ['a'] + ['stand-ins'] * 3
    assert str(t.failure()).startswith('20 files in a row failed to decode for one sample of step 1 (epoch 0)')
    with pytest.raises(TooManyBadFiles, match='20 files in a row'):  # one process: at once, as before
        list(BadFileTracker(tmp_path).track(gives_up()))


def test_shared_data_classes_and_eval(shared_data):
    from timm.data import create_dataset
    ds = ImageFolderDataset(shared_data, 'train')
    ref = create_dataset('', root=str(shared_data), split='train').reader
    assert ds.class_to_idx == ref.class_to_idx and len(ds) == len(ref.samples) == 5784
    assert ds.classes != sorted(ds.classes)  # caltech101's Faces, Leopards, ...: timm's order is not sorted()'s
    assert len(ImageFolderDataset(shared_data, 'validation')) == 2893


def test_non_utf8_names_and_symlink_loops(tmp_path):
    """A file name that is not UTF-8 is indexed and opens; a symlink loop is left out with a warning naming it; a
    folder symlink to another folder is followed; macOS's ._x.jpg files are not images; the rest is there."""
    _class_folders(tmp_path / 'train', ['a', 'b'])
    a = tmp_path / 'train' / 'a'
    (a / '0.JPEG').rename(os.fsdecode(bytes(a) + b'/bad\xff\xfe.JPEG'))
    os.symlink('.', a / 'loop')
    os.symlink('../b', a / 'more')
    (a / '._1.JPEG').write_bytes(b'\x00\x05\x16\x07 AppleDouble')  # macOS resource fork: not an image
    with pytest.warns(UserWarning, match=r'symlink loop'):
        ds = ImageFolderDataset(tmp_path, 'train')
    rels = [ds.relpath(i) for i in range(len(ds))]
    assert sorted(rels) == sorted(['a/1.JPEG', os.fsdecode(b'a/bad\xff\xfe.JPEG'), 'a/more/0.JPEG', 'a/more/1.JPEG',
                                   'b/0.JPEG', 'b/1.JPEG'])
    bad = next(i for i, r in enumerate(rels) if r.startswith('a/bad'))
    assert Image.open(ds.path(bad)).size == (8, 8)
