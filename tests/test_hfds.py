"""--dataset hfds/NAME (timm's): a Hugging Face dataset, here a local folder in the Hub's parquet layout, read offline;
train.py trains on it and validate.py scores every validation sample once."""
import io

import numpy as np
import pytest
from PIL import Image

import loaders
import train
import validate

datasets = pytest.importorskip('datasets')
TINY = ('--model naflexvit_tiny_test -b 4 -j 0 --device cpu --epochs 1 --warmup-epochs 0 '
        '--naflex-train-seq-lens 32 64 --naflex-max-seq-len 64 --log-interval 1').split()


@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory):
    """data/train-*.parquet (12 JPEGs) and data/validation-*.parquet (6), labels a ClassLabel of 3 names."""
    root = tmp_path_factory.mktemp('hfds')
    rng = np.random.default_rng(0)
    features = datasets.Features({'image': datasets.Image(),
                                  'label': datasets.ClassLabel(names=['cat', 'dog', 'emu'])})
    for split, n in (('train', 12), ('validation', 6)):
        images = []
        for i in range(n):
            buf = io.BytesIO()
            h, w = int(rng.integers(30, 90)), int(rng.integers(30, 90))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, 'JPEG')
            images.append({'bytes': buf.getvalue(), 'path': None})
        ds = datasets.Dataset.from_dict({'image': images, 'label': [i % 3 for i in range(n)]}, features=features)
        (root / 'data').mkdir(exist_ok=True)
        ds.to_parquet(str(root / 'data' / f'{split}-00000-of-00001.parquet'))
    return root


@pytest.fixture(autouse=True)
def _offline(hf_offline):
    """Every test here runs with the Hugging Face libraries offline."""


def test_dataset_reads_images_labels_and_class_names(hf_folder, tmp_path):
    ds = loaders.open_dataset(tmp_path / 'cache', 'val', dataset=f'hfds/{hf_folder}')  # 'val' finds 'validation'
    assert (len(ds), ds.classes, ds.targets.tolist()) == (6, ['cat', 'dog', 'emu'], [0, 1, 2, 0, 1, 2])
    img = Image.open(io.BytesIO(ds.path(4).read_bytes()))
    assert img.format == 'JPEG' and str(ds.path(4)).endswith('[validation][4]')
    remapped = loaders.open_dataset(None, 'train', dataset=f'hfds/{hf_folder}', classes=['emu', 'dog', 'cat'])
    assert remapped.targets.tolist()[:3] == [2, 1, 0]
    with pytest.raises(FileNotFoundError, match=r"has no split 'test' \(splits: train, validation\)"):
        loaders.open_dataset(None, 'test', dataset=f'hfds/{hf_folder}')
    with pytest.raises(ValueError, match="has no column 'img'.*--input-key"):
        loaders.open_dataset(None, 'train', dataset=f'hfds/{hf_folder}', input_key='img')


def test_train_and_validate_offline(hf_folder, tmp_path, capsys):
    out = tmp_path / 'out'
    train.main(['--dataset', f'hfds/{hf_folder}', '--val-split', 'validation', '-j', '1', '--output', str(out),
                '--experiment', 'hf'] + TINY[:4] + TINY[6:])
    assert (out / 'hf' / 'last.pth').is_file()
    rows = validate.main(['--dataset', f'hfds/{hf_folder}', '--model', 'naflexvit_tiny_test', '-j', '0',
                          '--checkpoint', str(out / 'hf' / 'last.pth'), '--naflex-max-seq-len', '64'])
    assert rows[0]['images'] == 6 and rows[0]['bad_files'] == 0
    with pytest.raises(SystemExit):
        validate.main(['--dataset', f'hfds/{tmp_path / "nothing"}', '--checkpoint', str(out / 'hf' / 'last.pth')])
    assert 'hfds/' in capsys.readouterr().err
