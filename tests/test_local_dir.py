"""train.py and validate.py with ``--model local-dir:PATH``: a folder written by ``timm.models.save_for_hf``.

As ``timm.create_model('local-dir:PATH')``: the folder's config.json names the architecture, its model_args size
it, its pretrained_cfg gives the class count and the data config (mean / std), and its weights file is what
``--pretrained`` (train.py) and the default without ``--checkpoint`` (validate.py) load. Offline, tiny models.
"""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from timm.models import save_for_hf

import naflex
import train
import validate

KWARGS = dict(embed_dim=32, num_heads=2)
MEAN, STD = (0.3, 0.35, 0.4), (0.2, 0.25, 0.3)  # the folder's own data config, unlike the registry's
TRAIN = ['--device', 'cpu', '-b', '8', '--epochs', '1', '--warmup-epochs', '0', '--lr', '1e-12', '--weight-decay', '0',
         '--opt', 'adamw', '--naflex-train-seq-lens', '32', '--val-split', '', '-j', '0']


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """A save_for_hf folder of a 4-class tiny model (narrower than the registered one), with its own mean / std."""
    torch.manual_seed(5)
    model = naflex.create_model('naflexvit_tiny_test', num_classes=4, **KWARGS)
    with torch.no_grad():
        model.head.weight.mul_(50)  # logits that spread, so top-1 is not a tie-break
    path = tmp_path_factory.mktemp('local_dir') / 'tiny4'
    save_for_hf(model, str(path), safe_serialization=True)
    config = json.loads((path / 'config.json').read_text())
    config['pretrained_cfg'].update(mean=list(MEAN), std=list(STD))
    (path / 'config.json').write_text(json.dumps(config))
    return path


def _scores(rows):
    return [(r['top1'], r['top5'], r['loss']) for r in rows]


def test_validate_local_dir_equals_its_file_with_its_data_config(folder, demo_dataset):
    common = ['--data-dir', str(demo_dataset), '-j', '0', '--naflex-max-seq-len', '36', '64']
    by_name = validate.main([*common, '--model', f'local-dir:{folder}'])
    assert [r['checkpoint'] for r in by_name] == [str(folder / 'model.safetensors')] * 2
    by_file = validate.main([*common, '--model', 'naflexvit_tiny_test', '--model-kwargs', 'embed_dim=32',
                             'num_heads=2', '--checkpoint', str(folder / 'model.safetensors'),
                             '--mean', *map(str, MEAN), '--std', *map(str, STD)])
    assert _scores(by_name) == _scores(by_file)
    registry_norm = validate.main([*common, '--model', 'naflexvit_tiny_test', '--model-kwargs', 'embed_dim=32',
                                   'num_heads=2', '--checkpoint', str(folder / 'model.safetensors')])
    assert [r['loss'] for r in registry_norm] != [r['loss'] for r in by_name]  # the folder's mean / std mattered


def test_train_local_dir_pretrained_starts_from_its_weights(folder, demo_dataset, tmp_path, capsys):
    train.main(['--data-dir', str(demo_dataset), '--model', f'local-dir:{folder}', '--pretrained', *TRAIN,
                '--output', str(tmp_path), '--experiment', 'ld'])
    assert f'loaded weights from {folder / "model.safetensors"}' in capsys.readouterr().out
    start = load_file(str(folder / 'model.safetensors'))
    trained = torch.load(tmp_path / 'ld' / 'last.pth', map_location='cpu', weights_only=True)
    assert trained['state_dict'].keys() == start.keys()
    for k, v in start.items():
        torch.testing.assert_close(trained['state_dict'][k], v, atol=1e-6, rtol=0, msg=k)
    args = yaml.safe_load((tmp_path / 'ld' / 'args.yaml').read_text())
    assert args['model'] == f'local-dir:{folder}'
    norm = naflex.data_config(naflex.create_model(f'local-dir:{folder}'))  # what train.py normalizes with
    assert norm['mean'] == pytest.approx(MEAN) and norm['std'] == pytest.approx(STD)
    # the checkpoint names the folder, so validate.py rebuilds the model from it without --model
    rows = validate.main(['--data-dir', str(demo_dataset), '-j', '0', '--naflex-max-seq-len', '36',
                          '--checkpoint', str(tmp_path / 'ld' / 'last.pth')])
    again = validate.main(['--data-dir', str(demo_dataset), '-j', '0', '--naflex-max-seq-len', '36',
                           '--model', f'local-dir:{folder}'])
    assert [r['top1'] for r in rows] == [r['top1'] for r in again]
    assert [r['loss'] for r in rows] == pytest.approx([r['loss'] for r in again], abs=1e-4)


def test_train_local_dir_without_pretrained_builds_its_architecture(folder, demo_dataset, tmp_path):
    train.main(['--data-dir', str(demo_dataset), '--model', f'local-dir:{folder}', *TRAIN, '--output', str(tmp_path),
                '--experiment', 'arch'])
    state = torch.load(tmp_path / 'arch' / 'last.pth', map_location='cpu', weights_only=True)['state_dict']
    assert state['embeds.proj.weight'].shape == (32, 768)  # the folder's embed_dim, not the registered 64
    start = load_file(str(folder / 'model.safetensors'))
    assert not torch.allclose(state['embeds.proj.weight'], start['embeds.proj.weight'])  # fresh weights


@pytest.mark.parametrize('script', ['train', 'validate'])
def test_missing_folder_is_one_line(script, demo_dataset, tmp_path, capsys):
    argv = ['--data-dir', str(demo_dataset), '--model', f'local-dir:{tmp_path / "nope"}']
    argv += [*TRAIN, '--output', str(tmp_path)] if script == 'train' else ['-j', '0']
    with pytest.raises(SystemExit) as exit_info:
        {'train': train, 'validate': validate}[script].main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f'{script}.py: error:') and f'local-dir:{tmp_path / "nope"}: is not a folder' in err[0]
