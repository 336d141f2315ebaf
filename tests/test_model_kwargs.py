"""``--model-kwargs key=value ...`` (timm's flag): parsed as Python literals, checked by the model config, recorded in
args.yaml and the checkpoint, so validate.py and ``--resume`` rebuild the same model without the flags."""
import pytest
import torch
import yaml

import train
import validate
from naflex.train.cli import ConfigError, config_from_args, format_kwargs, parse_args

SMALL = ['embed_dim=32', 'depth=1', 'num_heads=2', 'pos_embed_grid_size=(8,8)', 'act_layer=gelu_tanh']
TINY = ['--model', 'naflexvit_tiny_test', '--device', 'cpu', '-b', '8', '-j', '0', '--warmup-epochs', '0',
        '--naflex-train-seq-lens', '32', '--naflex-max-seq-len', '32', '--opt', 'adamw', '--lr', '1e-3']


def test_values_are_literals_and_reach_the_model_config(tmp_path):
    args, text = parse_args(['--data-dir', 'd', '--model', 'naflexvit_tiny_test', '--model-kwargs', *SMALL,
                             'init_values=None', 'mlp_ratio=2'])
    expected = {'embed_dim': 32, 'depth': 1, 'num_heads': 2, 'pos_embed_grid_size': [8, 8],
                'act_layer': 'gelu_tanh', 'init_values': None, 'mlp_ratio': 2}
    assert args.model_kwargs == expected
    cfg = config_from_args(args)
    assert cfg.model.kwargs == expected and cfg.model.overrides(5)['embed_dim'] == 32
    # the resolved args are a -c file that gives the same kwargs back
    (tmp_path / 'args.yaml').write_text(text)
    again, _ = parse_args(['-c', str(tmp_path / 'args.yaml')])
    assert again.model_kwargs == expected and yaml.safe_load(text)['model_kwargs'] == expected
    # and messages print them as words the flag reads back
    words = format_kwargs(dict(expected, name='1'))
    assert words == "embed_dim=32 depth=1 num_heads=2 pos_embed_grid_size=(8,8) act_layer=gelu_tanh init_values=None " \
                    "mlp_ratio=2 name='1'"
    assert parse_args(['--data-dir', 'd', '--model-kwargs', *words.split()[:-1]])[0].model_kwargs == expected


@pytest.mark.parametrize('kwargs, message', [
    (['depth=2', 'widht=3', 'in_chans=1'], '--model-kwargs unknown key(s) in_chans, widht; valid: act_layer, '),
    (['drop_path_rate=0.1', 'global_pool=avg'], '--model-kwargs drop_path_rate, global_pool: set with --drop-path, '
                                                '--gp'),
    (['depth=2.5'], '--model-kwargs depth=2.5 is not an int'),
    (['embed_dim=30'], '--model-kwargs embed_dim=30 is not divisible by num_heads=4'),
    (['pos_embed=rope'], "--model-kwargs invalid pos_embed='rope'"),
    (['depth'], "--model-kwargs: expected KEY=VALUE, got 'depth'"),
])
def test_bad_kwargs_are_one_config_error(kwargs, message):
    with pytest.raises(ConfigError) as e:
        parse_args(['--data-dir', 'd', '--model', 'naflexvit_tiny_test', '--model-kwargs', *kwargs])
    assert message in str(e.value) and '\n' not in str(e.value)


@pytest.fixture(scope='module')
def small_run(demo_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp('kwargs')
    train.main(['--data-dir', str(demo_dataset), *TINY, '--epochs', '1', '--model-kwargs', *SMALL,
                '--output', str(out), '--experiment', 'small'])
    return out / 'small'


def test_recorded_in_args_yaml_and_checkpoint(small_run):
    recorded = yaml.safe_load((small_run / 'args.yaml').read_text())['model_kwargs']
    ckpt = torch.load(small_run / 'last.pth', map_location='cpu', weights_only=True)
    assert recorded == ckpt['args']['model_kwargs'] == {'embed_dim': 32, 'depth': 1, 'num_heads': 2,
                                                       'pos_embed_grid_size': [8, 8], 'act_layer': 'gelu_tanh'}
    sd = ckpt['state_dict']
    assert sd['embeds.pos_embed'].shape == (1, 8, 8, 32)  # the model was built with them
    assert not any(k.startswith('blocks.1.') for k in sd)


def test_validate_rebuilds_the_model_from_the_checkpoint(small_run, demo_dataset, capsys):
    base = ['--data-dir', str(demo_dataset), '-j', '0', '--naflex-max-seq-len', '32']
    rebuilt = validate.main(base + ['--checkpoint', str(small_run / 'last.pth')])[0]  # no --model, no kwargs
    assert 'model kwargs recorded in the checkpoint: embed_dim=32 depth=1' in capsys.readouterr().out
    explicit = validate.main(base + ['--checkpoint', str(small_run / 'last.pth'), '--model', 'naflexvit_tiny_test',
                                     '--model-kwargs', *SMALL])[0]
    assert rebuilt['model'] == 'naflexvit_tiny_test'
    assert (rebuilt['top1'], rebuilt['loss']) == (explicit['top1'], explicit['loss'])


def test_resume_rebuilds_the_model_from_the_checkpoint(small_run, demo_dataset, tmp_path, capsys):
    common = ['--data-dir', str(demo_dataset), *TINY, '--epochs', '2', '--output', str(tmp_path)]
    results = train.main(common + ['--resume', str(small_run / 'last.pth'), '--experiment', 'more'])
    assert [r['epoch'] for r in results] == [1]
    assert yaml.safe_load((tmp_path / 'more' / 'args.yaml').read_text())['model_kwargs']['embed_dim'] == 32
    with pytest.raises(SystemExit) as e:
        train.main(common + ['--resume', str(small_run / 'last.pth'), '--experiment', 'other', '--model-kwargs',
                             'embed_dim=64'])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["train.py: error: --model-kwargs embed_dim=64 differ from the checkpoint's (embed_dim=32 depth=1 "
                   "num_heads=2 pos_embed_grid_size=(8,8) act_layer=gelu_tanh): drop them to resume"]
