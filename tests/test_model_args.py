"""The model records how it was built, as timm's models do, so timm's ``get_model_args`` and ``save_for_hf`` work on
it and a saved folder (``local-dir:PATH``) rebuilds the same model, in this library and in timm.

Compared with timm 1.0.31 on the same calls: ``get_model_args`` / ``get_model_input_config`` (also after
``reset_classifier`` changes the pooling), the whole ``config.json`` ``save_for_hf`` writes, and the logits of the
models rebuilt from the folders, in both directions.
"""
import json

import pytest
import timm
import torch
from timm.models import get_model_args, get_model_input_config, save_for_hf

import naflex

from test_model import TOL, maxdiff, randomize_

ARCH = 'naflexvit_base_patch16_gap'
CALLS = [
    dict(embed_dim=64, depth=2, num_heads=4),
    dict(embed_dim=64, depth=2, num_heads=4, num_classes=10, pos_embed_grid_size=(8, 12), drop_path_rate=0.1),
    dict(embed_dim=32, depth=1, num_heads=2, reg_tokens=1, global_pool='map', qk_norm=True, in_chans=1),
]


def both(name=ARCH, **kwargs):
    return naflex.create_model(name, **kwargs), timm.create_model(name, **kwargs)


def saved_config(model, folder) -> dict:
    save_for_hf(model, str(folder), safe_serialization=True)
    return json.loads((folder / 'config.json').read_text())


@pytest.mark.parametrize('kwargs', CALLS)
def test_get_model_args_and_saved_config_equal_timms(kwargs, tmp_path):
    ours, theirs = both(**kwargs)
    assert get_model_args(ours) == get_model_args(theirs)
    assert get_model_input_config(ours) == get_model_input_config(theirs)
    assert saved_config(ours, tmp_path / 'ours') == saved_config(theirs, tmp_path / 'timm')
    # a new head with another pooling: fc_norm is pinned so that a rebuild keeps the current norm placement
    for model in (ours, theirs):
        model.reset_classifier(5, 'max')
    assert get_model_args(ours) == get_model_args(theirs)
    assert get_model_args(ours)['global_pool'] == 'max' and get_model_args(ours)['num_classes'] == 5


def test_runtime_choices_are_not_recorded():
    """attn_backend, device and dtype say how the model runs, not what it is (timm leaves out device and dtype),
    so a folder saved from a model on another backend still loads in timm."""
    model = naflex.create_model(ARCH, depth=1, attn_backend='sdpa_dense', device='meta', dtype=torch.bfloat16)
    assert get_model_args(model) == {'depth': 1, 'in_chans': 3, 'num_classes': 1000, 'global_pool': 'avg'}


@torch.no_grad()
@pytest.mark.parametrize('reset', [False, True])
def test_save_for_hf_then_local_dir_rebuilds_the_same_model(tmp_path, reset):
    """Ours saved by timm's save_for_hf: ours and timm rebuild it from the folder with the same logits."""
    ours = randomize_(naflex.create_model(ARCH, **CALLS[1]), seed=5).eval()
    if reset:
        ours.reset_classifier(6, 'avgmax')
        randomize_(ours.head, seed=6)
    save_for_hf(ours, str(tmp_path), safe_serialization=True)
    x = torch.randn(2, 3, 96, 64)
    again, theirs = both(f'local-dir:{tmp_path}', pretrained=True)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert {k: v.shape for k, v in again.state_dict().items()} == shapes
    assert again.global_pool == theirs.global_pool == ours.global_pool
    assert get_model_args(again) == get_model_args(theirs)  # the JSON lists included, as timm reads them
    assert again.pretrained_model_args == theirs.pretrained_model_args == json.loads(
        (tmp_path / 'config.json').read_text())['model_args']
    assert maxdiff(again.eval()(x), ours(x)) < TOL
    assert maxdiff(theirs.eval()(x), ours(x)) < TOL


@torch.no_grad()
def test_tiny_variant_round_trips_through_a_folder(tmp_path):
    """A variant only this library registers: the folder names it and its overrides (None included)."""
    model = randomize_(naflex.create_model('naflexvit_tiny_test', embed_dim=32, num_heads=2, init_values=None,
                                           num_classes=3), seed=7).eval()
    save_for_hf(model, str(tmp_path), safe_serialization=True)
    again = naflex.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert again.cfg == model.cfg and again.cfg.init_values is None
    x = torch.randn(1, 3, 48, 80)
    assert maxdiff(again(x), model(x)) < TOL
