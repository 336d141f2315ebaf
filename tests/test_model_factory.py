"""``naflex.create_model`` keeps timm 1.0.31's ``create_model`` contract, checked against timm itself.

Each test calls ``timm.create_model`` and ``naflex.create_model`` the same way (a registered NaFlexViT
architecture sized down with keyword overrides, or on the meta device) and compares what they build: parameter
placement for ``device`` / ``dtype``, the resolved pretrained_cfg and class count for ``pretrained_cfg`` /
``pretrained_cfg_overlay``, the loaded weights (through their logits) for ``pretrained_cfg_overlay=dict(file=)``,
``checkpoint_path`` and ``local-dir:`` folders written by timm's ``save_for_hf``, and the error types.
Nothing downloads: weights come from files written here.
"""
import os

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import save_for_hf

import naflex
from naflex.model.weights import DIR_EXTENSIONS, DIR_FILES

from test_model import TOL, maxdiff, randomize_

ARCH = 'naflexvit_base_patch16_gap'
SMALL = dict(embed_dim=64, depth=2, num_heads=4)  # a registered timm architecture, sized down


def both(name=ARCH, **kwargs):
    """(ours, timm's) built by the same call."""
    return naflex.create_model(name, **kwargs), timm.create_model(name, **kwargs)


@pytest.fixture(scope='module')
def ref():
    """timm's model with random weights (every parameter perturbed, so no zero bias hides a skipped tensor)."""
    return randomize_(timm.create_model(ARCH, **SMALL), seed=2).eval()


@pytest.fixture(scope='module')
def image():
    return torch.randn(2, 3, 64, 96)


def placement(model):
    return {k: (v.device.type, v.dtype) for k, v in model.state_dict().items()}


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float64])
def test_device_and_dtype_place_the_parameters_like_timm(dtype):
    ours, theirs = both(depth=1, device='meta', dtype=dtype)
    assert placement(ours) == placement(theirs)
    assert {d for d, _ in placement(ours).values()} == {'meta'}
    with torch.device('meta'):  # device=None keeps the caller's default device, as in timm
        ours, theirs = both(depth=1)
    assert placement(ours) == placement(theirs)


@torch.no_grad()
def test_float64_model_computes_like_timm(ref, image):
    ours, theirs = both(**SMALL, dtype=torch.float64, device='cpu')
    theirs.load_state_dict(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    assert placement(ours) == placement(theirs)
    assert maxdiff(ours.eval()(image.double()), theirs.eval()(image.double())) < TOL


@pytest.mark.parametrize('kwargs', [
    dict(),
    dict(pretrained_cfg='e300_s576_in1k'),
    dict(pretrained_cfg_overlay=dict(file='/weights/w.pth', num_classes=10)),  # the cfg's classes size the head
    dict(pretrained_cfg=dict(num_classes=0, input_size=(1, 64, 64))),  # a whole cfg: also sets in_chans
    dict(pretrained_cfg=dict(num_classes=5), pretrained_cfg_overlay=dict(mean=(0.1, 0.2, 0.3))),
    dict(pretrained_cfg_overlay=dict(hf_hub_id='', custom_load=True), num_classes=3),
])
def test_pretrained_cfg_and_overlay_resolve_like_timm(kwargs):
    with torch.device('meta'):
        names = (ARCH, 'naflexvit_base_patch16_map', 'naflexvit_base_patch16_siglip')
        for name in names[:1] if isinstance(kwargs.get('pretrained_cfg'), str) else names:  # a tag of ARCH
            ours, theirs = both(name, depth=1, **kwargs)
            assert ours.pretrained_cfg == theirs.pretrained_cfg, name
            assert (ours.num_classes, ours.in_chans) == (theirs.num_classes, theirs.in_chans), name
    with pytest.raises(TypeError):
        timm.create_model(ARCH, pretrained_cfg_overlay=dict(no_such_entry=1))
    with pytest.raises(TypeError):
        naflex.create_model(ARCH, pretrained_cfg_overlay=dict(no_such_entry=1))


@torch.no_grad()
def test_overlay_file_loads_the_weights_like_timm(ref, image, tmp_path):
    path = str(tmp_path / 'w.safetensors')
    save_file(ref.state_dict(), path)
    overlay = dict(file=path)
    ours, theirs = both(**SMALL, pretrained=True, pretrained_cfg_overlay=overlay)
    assert maxdiff(ours.eval()(image), ref(image)) < TOL
    assert maxdiff(ours(image), theirs.eval()(image)) < TOL
    # another class count: the classifier starts fresh in both, everything else is the file's
    ours, theirs = both(**SMALL, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=7)
    assert ours.head.out_features == theirs.head.out_features == 7
    pooled = ref.forward_head(ref.forward_features(image), pre_logits=True)
    assert maxdiff(ours.eval().forward_head(ours.forward_features(image), pre_logits=True), pooled) < TOL
    # pretrained=False: the overlay only describes the weights, nothing is loaded
    ours = naflex.create_model(ARCH, **SMALL, pretrained_cfg_overlay=overlay).eval()
    assert maxdiff(ours(image), ref(image)) > 1e-2


@torch.no_grad()
def test_checkpoint_path_loads_after_creation_like_timm(ref, image, tmp_path):
    zeros = {k: torch.zeros_like(v) for k, v in ref.state_dict().items()}
    path = str(tmp_path / 'train.pth')
    torch.save({'state_dict': zeros, 'state_dict_ema': ref.state_dict(), 'epoch': 3}, path)
    ours, theirs = both(**SMALL, checkpoint_path=path)
    assert maxdiff(ours.eval()(image), ref(image)) < TOL  # the EMA copy first, as timm's load_checkpoint
    assert maxdiff(ours(image), theirs.eval()(image)) < TOL
    # loaded strictly: a checkpoint of another class count is an error in both
    with pytest.raises(RuntimeError):
        timm.create_model(ARCH, **SMALL, num_classes=4, checkpoint_path=path)
    with pytest.raises(naflex.WeightsMismatch, match='shape mismatch'):
        naflex.create_model(ARCH, **SMALL, num_classes=4, checkpoint_path=path)


@pytest.mark.parametrize('safe', [True, False])
@torch.no_grad()
def test_local_dir_reads_a_timm_save_for_hf_folder_like_timm(image, tmp_path, safe):
    """timm's own export (config.json with model_args, safetensors or pytorch_model.bin) builds the same model
    with the same pretrained_cfg in both libraries; pretrained=True takes the folder's weights."""
    saved = randomize_(timm.create_model(ARCH, **SMALL, num_classes=10, pos_embed_grid_size=(8, 12)), seed=4).eval()
    save_for_hf(saved, str(tmp_path), safe_serialization=safe)
    name = f'local-dir:{tmp_path}'
    ours, theirs = both(name, pretrained=True)
    assert ours.pretrained_cfg == theirs.pretrained_cfg
    assert ours.num_classes == theirs.num_classes == 10
    assert ours.embeds.pos_embed.shape == theirs.embeds.pos_embed.shape == (1, 8, 12, 64)
    assert maxdiff(ours.eval()(image), saved(image)) < TOL
    assert maxdiff(ours(image), theirs.eval()(image)) < TOL
    # keywords still win over the folder's arguments, and pretrained=False builds without its weights
    ours, theirs = both(name, num_classes=3)
    assert ours.num_classes == theirs.num_classes == 3
    assert maxdiff(ours.eval().forward_features(image), saved.forward_features(image)) > 1e-2


def test_local_dir_picks_the_weights_file_like_timm(tmp_path):
    from timm.models._hub import _EXT_PRIORITY, _PREFERRED_FILES
    from naflex.model.weights import dir_weights_file
    assert (DIR_FILES, DIR_EXTENSIONS) == (_PREFERRED_FILES, _EXT_PRIORITY)
    for name in ('b.pth', 'a.pth', 'z.safetensors', 'pytorch_model.bin', 'model.safetensors'):
        (tmp_path / name).write_bytes(b'')
    order = []
    for _ in range(5):
        order.append(os.path.basename(dir_weights_file(tmp_path)))
        os.remove(tmp_path / order[-1])
    assert order == ['model.safetensors', 'pytorch_model.bin', 'z.safetensors', 'a.pth', 'b.pth']
    with pytest.raises(FileNotFoundError, match='no weights file'):
        dir_weights_file(tmp_path)


def test_names_keywords_and_sources_fail_like_timm(tmp_path):
    for name in ('ftp:naflexvit_tiny_test', 'local-dir:'):
        with pytest.raises(ValueError):
            timm.create_model(name)
        with pytest.raises(ValueError):
            naflex.create_model(name)
    for module in (timm, naflex):
        with pytest.raises(FileNotFoundError):
            module.create_model(f'local-dir:{tmp_path / "nothing"}')
    # an unknown keyword is a TypeError in both; ours also lists the valid keywords
    with pytest.raises(TypeError):
        timm.create_model(ARCH, depth=1, drop_pth_rate=0.1)
    with pytest.raises(TypeError, match=r"\['drop_pth_rate'\] for naflexvit_tiny_test; valid: .*drop_path_rate"):
        naflex.create_model('naflexvit_tiny_test', drop_pth_rate=0.1)
    # as in timm, the model class itself takes config fields as keywords and refuses others
    from timm.models.naflexvit import NaFlexVit as TimmNaFlexVit
    for cls in (TimmNaFlexVit, naflex.NaFlexVit):
        assert cls(depth=1, embed_dim=32, num_heads=2, num_classes=3).blocks[0].attn.num_heads == 2
        with pytest.raises(TypeError, match='drop_pth_rate'):
            cls(depth=1, drop_pth_rate=0.1)


@pytest.mark.parametrize('kwargs', [
    dict(), dict(out_indices=(0, 1)), dict(out_indices=[-1], feature_cls='getter'),
    dict(out_indices=1, feature_cls='Getter', pretrained_cfg_overlay=dict(mean=(0, 0, 0)))])
@torch.no_grad()
def test_features_only_is_timms_feature_getter(kwargs):
    """features_only=True: timm's FeatureGetterNet (its NaFlexViT default): same pruned state dict, outputs,
    feature_info, input traits, and the backbone's pretrained_cfg without the classifier entries."""
    kwargs = dict(SMALL, depth=3, features_only=True, **kwargs)
    ours, theirs = both(**kwargs)
    assert type(theirs).__name__ == 'FeatureGetterNet' and isinstance(ours, naflex.NaFlexFeatures)
    assert ours.pretrained_cfg == theirs.pretrained_cfg and 'num_classes' not in ours.pretrained_cfg
    assert ours.default_cfg == theirs.default_cfg
    assert (ours._traits, ours.in_chans) == (theirs._traits, theirs.in_chans)
    assert timm.data.resolve_model_data_config(ours) == timm.data.resolve_model_data_config(theirs)
    assert ours.out_indices == theirs.out_indices
    for what in ('channels', 'reduction', 'module_name'):
        assert getattr(ours.feature_info, what)() == getattr(theirs.feature_info, what)()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    randomize_(theirs, seed=8)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 48, 80)
    outs, touts = ours(x), theirs(x)
    assert len(outs) == len(touts) == len(ours.out_indices)
    for a, b in zip(outs, touts):
        assert a.shape == b.shape and maxdiff(a, b) < TOL
    assert timm.models.get_model_args(ours) == timm.models.get_model_args(theirs)


def test_other_feature_classes_are_refused():
    with pytest.raises(ValueError, match="feature_cls='hook' is not available for NaFlexViT; valid: getter"):
        naflex.create_model('naflexvit_tiny_test', features_only=True, feature_cls='hook')


def test_img_size_is_timms_keyword():
    """timm's constructor takes ``img_size`` (classic-ViT call sites pass it): with a position-table grid set, as
    every registered variant has, it changes nothing, in both libraries, and is recorded as timm records it. A grid
    of None (kept here, where timm drops a None keyword) takes ``img_size // patch_size``; neither is an error."""
    ours, theirs = both(img_size=(64, 96), **SMALL)
    assert ours.embeds.pos_embed.shape == theirs.embeds.pos_embed.shape
    assert timm.models.get_model_args(ours) == timm.models.get_model_args(theirs)
    sized = naflex.create_model(ARCH, embed_dim=64, depth=1, num_heads=2, img_size=(64, 96), pos_embed_grid_size=None)
    assert sized.embeds.pos_embed.shape[1:3] == (4, 6)
    with pytest.raises(ValueError, match='needs img_size'):
        naflex.create_model(ARCH, embed_dim=64, depth=1, num_heads=2, pos_embed_grid_size=None)
