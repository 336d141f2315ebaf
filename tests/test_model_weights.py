"""``create_model(name, pretrained=path)``: local timm / project checkpoints in every accepted container.

Parameter names equal timm's NaFlexVit (SigLIP 2 NaFlex, arXiv:2502.14786), so a timm state dict loads
strictly and reproduces timm's outputs. Bad files fail with one clear error.
"""
import pytest
import torch
from safetensors.torch import save_file

import naflex

from test_model import TOL, maxdiff, randomize_, timm_twin

NAME = 'naflexvit_tiny_test'


@pytest.fixture(scope='module')
def ref():
    return randomize_(timm_twin(NAME), seed=1).eval()


def _save(path, state, wrap=None):
    if str(path).endswith('.safetensors'):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({wrap: state, 'epoch': 3} if wrap else state, str(path))
    return path


@pytest.mark.parametrize('fname,wrap', [('w.safetensors', None), ('w.pth', None), ('w.bin', None),
                                        ('c.pth', 'state_dict'), ('c.pth', 'model'), ('c.pth.tar', 'state_dict_ema'),
                                        ('c.pth', 'model_ema')])
@torch.no_grad()
def test_loads_timm_weights_in_any_container(tmp_path, ref, fname, wrap):
    path = _save(tmp_path / fname, ref.state_dict(), wrap)
    model = naflex.create_model(NAME, pretrained=str(path)).eval()
    x = torch.randn(2, 3, 128, 192)
    assert maxdiff(model(x), ref(x)) < TOL


@torch.no_grad()
def test_ema_weights_preferred_like_timm(tmp_path, ref):
    plain = {k: torch.zeros_like(v) for k, v in ref.state_dict().items()}
    torch.save({'state_dict': plain, 'state_dict_ema': ref.state_dict()}, str(tmp_path / 'ckpt.pth'))
    model = naflex.create_model(NAME, pretrained=str(tmp_path / 'ckpt.pth')).eval()
    x = torch.randn(1, 3, 64, 64)
    assert maxdiff(model(x), ref(x)) < TOL


@torch.no_grad()
def test_ddp_prefix_and_project_checkpoint_roundtrip(tmp_path, ref):
    state = {'module.' + k: v for k, v in ref.state_dict().items()}
    path = _save(tmp_path / 'ddp.pth', state, 'state_dict')
    model = naflex.create_model(NAME, pretrained=path).eval()
    x = torch.randn(1, 3, 64, 64)
    assert maxdiff(model(x), ref(x)) < TOL
    # our own state dict loads back into timm strictly (same names and shapes)
    back = timm_twin(NAME).eval()
    back.load_state_dict(model.state_dict(), strict=True)
    assert maxdiff(back(x), ref(x)) < TOL


@torch.no_grad()
def test_new_head_or_no_head_skips_classifier(tmp_path, ref):
    path = _save(tmp_path / 'w.safetensors', ref.state_dict())
    ten = naflex.create_model(NAME, pretrained=str(path), num_classes=10).eval()
    assert ten.head.out_features == 10
    torch.testing.assert_close(ten.embeds.pos_embed, ref.embeds.pos_embed)
    pooled = naflex.create_model(NAME, pretrained=str(path), num_classes=0).eval()
    x = torch.randn(1, 3, 64, 96)
    assert maxdiff(pooled(x), ref.forward_head(ref.forward_features(x), pre_logits=True)) < TOL
    feats = naflex.create_model(NAME, pretrained=str(path), features_only=True, out_indices=1)
    assert feats(x)[0].shape == (1, 64, 4, 6)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='not found'):
        naflex.create_model(NAME, pretrained=str(tmp_path / 'nope.safetensors'))


def test_mismatched_weights_are_a_clear_error(tmp_path):
    other = timm_twin('naflexvit_tiny_test_parfac')  # factorized pos embed: different tensors
    path = _save(tmp_path / 'fac.safetensors', other.state_dict())
    with pytest.raises(ValueError, match=r'missing: \[.embeds.pos_embed.\].*unexpected'):
        naflex.create_model(NAME, pretrained=str(path))
    wide = naflex.create_model(NAME, embed_dim=128)
    path = _save(tmp_path / 'wide.pth', wide.state_dict())
    with pytest.raises(ValueError, match='shape mismatch'):
        naflex.create_model(NAME, pretrained=str(path))


def test_unreadable_file_is_a_clear_error(tmp_path):
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='could not read'):
        naflex.create_model(NAME, pretrained=str(bad))
    junk = tmp_path / 'junk.pth'
    torch.save({'epoch': 1}, str(junk))
    with pytest.raises(ValueError, match='state dict'):
        naflex.create_model(NAME, pretrained=str(junk))


def test_read_state_dict_is_the_one_reader(tmp_path):
    """timm train.py checkpoint (args Namespace), DDP + torch.compile prefixes, explicit EMA choice."""
    import argparse

    from naflex.model.weights import read_file, read_state_dict
    plain = {'a.w': torch.ones(2), 'b.w': torch.ones(3)}
    ema = {'module._orig_mod.a.w': torch.zeros(2), '_orig_mod.b.w': torch.zeros(3)}
    path = tmp_path / 'timm.pth.tar'
    torch.save({'state_dict': plain, 'state_dict_ema': ema, 'args': argparse.Namespace(lr=1.0)}, str(path))
    assert isinstance(read_file(path)['args'], argparse.Namespace)
    assert sorted(read_state_dict(path)) == ['a.w', 'b.w']
    assert all(v.sum() == 0 for v in read_state_dict(path).values())  # EMA first, like timm
    assert all(v.sum() > 0 for v in read_state_dict(path, use_ema=False).values())
    torch.save({'model': plain}, str(tmp_path / 'no_ema.pth'))
    assert sorted(read_state_dict(tmp_path / 'no_ema.pth')) == ['a.w', 'b.w']  # falls back to plain
    with pytest.raises(ValueError, match='holds no EMA weights'):
        read_state_dict(tmp_path / 'no_ema.pth', require_ema=True)
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'\x80\x02 not a pickle')
    with pytest.raises(ValueError, match='could not read') as e:
        read_state_dict(junk)
    assert '\n' not in str(e.value)
