"""--dataset hfids/NAME (timm's): a Hugging Face dataset streamed by its parquet files (loaders.hfids), here a local
folder in the Hub's layout read offline: the files are the shards of loaders.stream (every sample once per epoch
across ranks), and train.py / validate.py read it as they read hfds/NAME."""
import io

import numpy as np
import pytest
from PIL import Image

import loaders
import train
import validate
from loaders.stream import StreamSource

datasets = pytest.importorskip('datasets')
TINY = ('--model naflexvit_tiny_test -b 8 -j 1 --device cpu --epochs 1 --warmup-epochs 0 '
        '--naflex-train-seq-lens 16 32 --naflex-max-seq-len 32 --log-interval 1').split()


@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory):
    """data/train-0000{0,1,2}-of-00003.parquet (4, 3 and 2 rows) and two validation files (3 and 2 rows); row k of
    a split has class k (a ClassLabel of 9 names)."""
    root = tmp_path_factory.mktemp('hfids')
    (root / 'data').mkdir()
    rng = np.random.default_rng(0)
    features = datasets.Features({'image': datasets.Image(),
                                  'label': datasets.ClassLabel(names=[f'n{i}' for i in range(9)])})
    for split, lengths in (('train', [4, 3, 2]), ('validation', [3, 2])):
        k = 0
        for i, n in enumerate(lengths):
            images = []
            for _ in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (int(rng.integers(20, 60)), 40, 3), dtype=np.uint8)).save(
                    buf, 'JPEG')
                images.append({'bytes': buf.getvalue(), 'path': None})
            ds = datasets.Dataset.from_dict({'image': images, 'label': list(range(k, k + n))}, features=features)
            ds.to_parquet(str(root / 'data' / f'{split}-{i:05d}-of-{len(lengths):05d}.parquet'))
            k += n
    return root


@pytest.fixture(autouse=True)
def _offline(hf_offline):
    """Every test here runs with the Hugging Face libraries offline."""


def test_parquet_files_are_the_shards_and_two_ranks_read_each_row_once(hf_folder):
    source = loaders.open_dataset(None, 'train', dataset=f'hfids/{hf_folder}')
    assert isinstance(source, StreamSource) and source.lengths.tolist() == [4, 3, 2] and len(source.urls) == 3
    assert source.classes == [f'n{i}' for i in range(9)]
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            loader = loaders.create_train_loader(source, seq_lens=(16, 32), batch_size=8, num_workers=0, patch_size=16,
                                                 rank=rank, world_size=2)
            loader.set_epoch(epoch)
            seen += [t for _, target in loader for t in target.tolist()]
        assert sorted(seen) == list(range(9))
    rows = list(source.read(0, skip=3)) + list(source.read(2, skip=1))
    assert [(r.target, r.name) for r in rows] == [(3, f'{hf_folder}[train][3]'), (8, f'{hf_folder}[train][8]')]


def test_train_and_validate_stream_it_offline(hf_folder, tmp_path, capsys):
    out = tmp_path / 'out'
    train.main(['--dataset', f'hfids/{hf_folder}', '--output', str(out), '--experiment', 'ids'] + TINY)
    log = (out / 'ids' / 'train.log').read_text()
    assert 'streaming 9 samples in 3 shards from hfids/' in log and 'Eval: 0' in log
    argv = ['--checkpoint', str(out / 'ids' / 'last.pth'), '-j', '2', '-b', '2', '--naflex-max-seq-len', '32',
            '--device', 'cpu']
    streamed = validate.main(['--dataset', f'hfids/{hf_folder}'] + argv)[0]
    by_index = validate.main(['--dataset', f'hfds/{hf_folder}'] + argv)[0]
    assert streamed['images'] == by_index['images'] == 5
    assert (streamed['top1'], streamed['top5']) == (by_index['top1'], by_index['top5'])


def test_row_counts_of_files_on_the_hub_are_read_once(hf_folder, tmp_path, monkeypatch):
    """Remote parquet files (fsspec's memory:// standing in for hf://) are counted from their footers once; the
    next open reads the counts from the cache folder."""
    import fsspec
    from loaders import hfids
    monkeypatch.setenv('NAFLEX_CACHE_DIR', str(tmp_path / 'cache'))
    files = []
    for path in sorted((hf_folder / 'data').glob('train-*.parquet')):
        files.append(f'memory://hub/{path.name}')
        with fsspec.open(files[-1], 'wb') as f:
            f.write(path.read_bytes())
    assert hfids.row_counts(files) == [4, 3, 2]

    def unreadable(path):
        raise OSError('the footer was read again')
    monkeypatch.setattr(hfids, '_num_rows', unreadable)
    assert hfids.row_counts(files) == [4, 3, 2]
    with pytest.raises(OSError, match='read again'):
        hfids.row_counts([str(p) for p in sorted((hf_folder / 'data').glob('train-*.parquet'))])  # local: not cached
