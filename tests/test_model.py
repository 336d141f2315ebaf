"""Tiny NaFlexViT variants against timm 1.0.31 (same weights): image / padded-dict / packed inputs, API.

The NaFlex model (SigLIP 2, arXiv:2502.14786) with NaViT packing (arXiv:2307.06304) must equal timm's
NaFlexVit to 1e-4 in fp32 eval, and packed batches must equal the padded form of the same images.
Helpers here (``timm_twin``, ``make_batches``, ``randomize_``, ``assert_images_match``, ``assert_batches_match``) are
reused by the other model test files.
"""
from dataclasses import fields

import pytest
import timm
import torch
import torch.nn.functional as F

import naflex
from naflex.model import NaFlexVitCfg
from naflex.model.batch import grid_coords

TOL = 1e-4
TINY = ['naflexvit_tiny_test', 'naflexvit_tiny_test_par', 'naflexvit_tiny_test_parfac', 'naflexvit_tiny_test_map',
        'naflexvit_tiny_test_token']
# timm registration whose defaults our variant overrides (None-valued overrides are dropped by timm.create_model)
TIMM_BASE = {
    'naflexvit_tiny_test': 'naflexvit_base_patch16_gap',
    'naflexvit_tiny_test_par': 'naflexvit_base_patch16_par_gap',
    'naflexvit_tiny_test_parfac': 'naflexvit_base_patch16_parfac_gap',
    'naflexvit_tiny_test_map': 'naflexvit_base_patch16_map',
    'naflexvit_tiny_test_token': 'naflexvit_base_patch16_map',
}
# sizes (h, w) in patches: larger and smaller than the 16x16 table, both aspect ratios, one exact 16x16
GRIDS = [(18, 20), (5, 7), (16, 16), (2, 26), (9, 3)]


def timm_twin(name: str, **overrides) -> torch.nn.Module:
    """timm NaFlexVit built with exactly our variant's config."""
    cfg = naflex.get_config(name)
    kwargs = {f.name: getattr(cfg, f.name) for f in fields(NaFlexVitCfg) if f.name != 'attn_backend'}
    kwargs.update(overrides, enable_patch_interpolator=True)  # ours resamples patch sizes whatever the switch
    base = TIMM_BASE.get(name, name)
    return timm.create_model(base, pretrained=False, **kwargs)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter so that layer scale / zero biases do not hide differences."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    """[C, H, W] -> [h*w, p*p*C] in P-P-C order (timm's batch_patchify(channels_last=True))."""
    c, h, w = img.shape
    return img.reshape(c, h // p, p, w // p, p).permute(1, 3, 2, 4, 0).reshape(-1, p * p * c)


def make_batches(grids, p: int = 16, seed: int = 0, unflatten: bool = False):
    """Random images at the given patch grids, as timm's padded dict and as our packed dict."""
    g = torch.Generator().manual_seed(seed)
    toks, coords = [], []
    for h, w in grids:
        toks.append(patchify(torch.randn(3, h * p, w * p, generator=g), p))
        coords.append(grid_coords(h, w))
    lens = torch.tensor([t.shape[0] for t in toks])
    b, n = len(grids), int(lens.max())
    patches = torch.zeros(b, n, p * p * 3)
    coord = torch.zeros(b, n, 2, dtype=torch.long)
    valid = torch.zeros(b, n, dtype=torch.bool)
    for i, (t, c) in enumerate(zip(toks, coords)):
        patches[i, :len(t)], coord[i, :len(t)], valid[i, :len(t)] = t, c, True
    padded = dict(patches=patches.reshape(b, n, p, p, 3) if unflatten else patches, patch_coord=coord,
                  patch_valid=valid)
    packed = dict(patches=torch.cat(toks), patch_coord=torch.cat(coords).to(torch.int32),
                  seq_lens=lens.to(torch.int32), cu_seqlens=F.pad(lens.cumsum(0), (1, 0)).to(torch.int32),
                  max_seqlen=int(lens.max()), grid_sizes=torch.tensor(grids, dtype=torch.int32), patch_size=p)
    return padded, packed


def pair(name: str, seed: int = 0, **overrides):
    """(ours, timm) with identical random weights, eval mode."""
    ref = randomize_(timm_twin(name, **overrides), seed).eval()
    ours = naflex.create_model(name, **overrides).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


def assert_images_match(ours, ref, shapes):
    """ours and timm's ref give the same output (shape, and values to TOL) on a random image batch of each shape."""
    for shape in shapes:
        x = torch.randn(*shape)
        out, ref_out = ours(x), ref(x)
        assert out.shape == ref_out.shape, shape
        assert maxdiff(out, ref_out) < TOL, shape


def assert_batches_match(ours, ref, grids, check_padded=True, **batch_kwargs):
    """ours on the packed batch (and, if ``check_padded``, on timm's padded dict) equals ref on the padded dict."""
    padded, packed = make_batches(grids, **batch_kwargs)
    ref_out = ref(padded)
    if check_padded:
        assert maxdiff(ours(padded), ref_out) < TOL
    out = ours(packed)
    assert out.shape == ref_out.shape
    assert maxdiff(out, ref_out) < TOL


# ------------------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize('name', TINY)
@torch.no_grad()
def test_tiny_matches_timm_all_inputs(name):
    ours, ref = pair(name)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert ref.num_classes == 1000
    assert_images_match(ours, ref, [(2, 3, 384, 384), (2, 3, 160, 288)])
    assert_batches_match(ours, ref, GRIDS)


@torch.no_grad()
def test_packed_equals_padded_and_per_image():
    """Packing must not leak across images: each image alone gives the same logits as inside a pack."""
    ours, _ = pair('naflexvit_tiny_test_map')
    padded, packed = make_batches(GRIDS, seed=3)
    together = ours(packed)
    assert maxdiff(together, ours(padded)) < TOL
    for i, grid in enumerate(GRIDS):
        _, single = make_batches([grid], seed=3)
        start, end = packed['cu_seqlens'][i], packed['cu_seqlens'][i + 1]
        single['patches'] = packed['patches'][start:end]
        assert maxdiff(ours(single)[0], together[i]) < TOL


@torch.no_grad()
def test_packed_without_optional_keys():
    """grid_sizes / cu_seqlens / max_seqlen are derived on device when absent."""
    ours, _ = pair('naflexvit_tiny_test_par')
    _, packed = make_batches(GRIDS)
    full = ours(packed)
    minimal = {k: packed[k] for k in ('patches', 'patch_coord', 'seq_lens')}
    assert maxdiff(ours(minimal), full) < TOL
    assert maxdiff(ours(dict(packed, patch_coord=packed['patch_coord'].to(torch.int16))), full) < TOL


@pytest.mark.parametrize('pool', ['avg', 'max', 'avgmax', 'token', ''])
@torch.no_grad()
def test_global_pool_overrides_match_timm(pool):
    ours, ref = pair('naflexvit_tiny_test_token', global_pool=pool, num_classes=0 if pool == '' else 10)
    assert_images_match(ours, ref, [(2, 3, 192, 128)])
    if pool:
        assert_batches_match(ours, ref, GRIDS[:3])


@torch.no_grad()
def test_pool_include_prefix_matches_timm():
    for name in ('naflexvit_tiny_test', 'naflexvit_tiny_test_map'):
        ours, ref = pair(name, pool_include_prefix=True)
        assert_batches_match(ours, ref, GRIDS[:3])


@pytest.mark.parametrize('overrides', [
    dict(qk_norm=True), dict(pre_norm=True), dict(pos_embed_antialias=False),
    dict(pos_embed_interp_mode='bilinear'), dict(pos_embed='none'), dict(pos_embed_grid_size=(12, 20)),
    dict(act_layer='gelu_tanh', mlp_ratio=3.0, qkv_bias=False),
    dict(init_values=0.0, reg_tokens=0)])  # init_values=None would be dropped by timm.create_model
@torch.no_grad()
def test_config_overrides_match_timm(overrides):
    ours, ref = pair('naflexvit_tiny_test_par', **overrides)
    assert_batches_match(ours, ref, GRIDS[:4])
    assert_images_match(ours, ref, [(1, 3, 112, 336)])


@pytest.mark.parametrize('p', [8, 12, 24, 32])
@torch.no_grad()
def test_variable_patch_size_matches_timm(p):
    """FlexiViT PI-resize of the patch embedding (arXiv:2212.08013) equals timm's for the same weights."""
    ours, ref = pair('naflexvit_tiny_test')
    grids = [(6, 5), (3, 9)] if p >= 24 else [(9, 7), (20, 4)]
    assert_batches_match(ours, ref, grids, p=p, unflatten=True)


# ------------------------------------------------------------------------------------------ training bits
def test_packed_backward_and_drop_path_per_image():
    model = naflex.create_model('naflexvit_tiny_test', drop_path_rate=0.5)
    assert [round(b.drop_path_rate, 6) for b in model.blocks] == [0.0, 0.5]  # timm's linear rule
    _, packed = make_batches(GRIDS[:3])
    model.train()
    out = model(packed)
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # stochastic depth draws per image: outputs vary between calls in train mode, not in eval
    torch.manual_seed(0)
    a = model(packed)
    b = model(packed)
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(packed), model(packed))


def test_grad_checkpointing_same_grads():
    torch.manual_seed(0)
    model = naflex.create_model('naflexvit_tiny_test_map')
    _, packed = make_batches(GRIDS[:2])
    model(packed).square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(packed).square().mean().backward()
    for g0, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, g0, rtol=1e-4, atol=1e-6)


def test_layer_scale_and_init_like_timm():
    model = naflex.create_model('naflexvit_tiny_test')
    assert torch.all(model.blocks[0].ls1.gamma == 1e-5)
    assert model.embeds.pos_embed.std().item() == pytest.approx(0.02, rel=0.2)
    no_ls = naflex.create_model('naflexvit_tiny_test', init_values=None)
    assert not any('gamma' in k for k in no_ls.state_dict())


def test_no_weight_decay_and_group_matcher():
    model = naflex.create_model('naflexvit_tiny_test')
    names = {n for n, _ in model.named_parameters()}
    nwd = model.no_weight_decay()
    assert {'embeds.pos_embed', 'embeds.reg_token'} <= nwd
    assert not (nwd & {n for n in names if 'blocks' in n})
    gm = model.group_matcher()
    assert gm['stem'] == r'^embeds'
    fac = naflex.create_model('naflexvit_tiny_test_parfac')
    assert {'embeds.pos_embed_y', 'embeds.pos_embed_x'} <= fac.no_weight_decay()
    # timm's optimizer-factory helpers accept our model
    from timm.optim import param_groups_layer_decay
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    assert sum(len(g['params']) for g in groups) == len(names)


# ------------------------------------------------------------------------------------------ API
def test_registry_and_overrides():
    names = naflex.list_models()
    for n in ['naflexvit_base_patch16_gap', 'naflexvit_base_patch16_par_gap', 'naflexvit_base_patch16_parfac_gap',
              'naflexvit_base_patch16_map', 'naflexvit_so150m2_patch16_reg1_gap', 'naflexvit_so150m2_patch16_reg1_map',
              'naflexvit_base_patch16_siglip', 'naflexvit_so400m_patch16_siglip', *TINY]:
        assert n in names
    assert naflex.list_models('*tiny*') == sorted(TINY) and naflex.list_models('tiny') == []  # timm's fnmatch
    assert naflex.list_models('naflexvit_base*', pretrained=True) == [n for n in naflex.list_models(pretrained=True)
                                                                     if n.startswith('naflexvit_base')]
    with pytest.raises(ValueError, match='naflexvit_tiny_test'):
        naflex.create_model('naflexvit_nope')
    with pytest.raises(TypeError, match='drop_path_rate'):  # timm's error type for an unknown keyword
        naflex.create_model('naflexvit_tiny_test', drop_pth_rate=0.1)
    with pytest.raises(ValueError, match='global_pool'):
        naflex.create_model('naflexvit_tiny_test', global_pool='mean')
    with pytest.raises(ValueError, match='naflexvit_tiny_test has no published weights'):
        naflex.create_model('naflexvit_tiny_test', pretrained=True)
    with pytest.raises(ValueError, match='attn_backend'):
        naflex.create_model('naflexvit_tiny_test', attn_backend='flash9')
    m = naflex.create_model('naflexvit_tiny_test', num_classes=7, drop_rate=0.1, pos_embed_grid_size=[8, 8])
    assert m.num_classes == 7 and m.head.out_features == 7 and m.head_drop.p == 0.1
    assert m.embeds.pos_embed.shape == (1, 8, 8, 64)
    assert (m.patch_size, m.embed_dim, m.num_prefix_tokens) == (16, 64, 4)


def test_registry_hparams_match_timm():
    """Every full-size variant has timm 1.0.31's registered hyper-parameters (compared on the meta device)."""
    for name in naflex.list_models():
        if 'tiny' in name:
            continue
        with torch.device('meta'):
            ref = timm.create_model(name, pretrained=False)
            ours = naflex.create_model(name)
        theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs, name
        assert ours.num_classes == ref.num_classes, name
        assert type(ours.blocks[0].mlp.act) is torch.nn.GELU
        act = ref.blocks[0].mlp.act
        tanh = 'Tanh' in type(act).__name__ or getattr(act, 'approximate', 'none') == 'tanh'
        assert (ours.blocks[0].mlp.act.approximate == 'tanh') == tanh, name
        assert ours.embeds.pos_embed_interp_mode == ref.embeds.pos_embed_interp_mode, name
        assert ours.embeds.pos_embed_ar_preserving == ref.embeds.pos_embed_ar_preserving, name
        assert ours.global_pool == ref.global_pool, name


def test_pretrained_cfg_resolves_with_timm_data():
    model = naflex.create_model('naflexvit_tiny_test')
    cfg = timm.data.resolve_model_data_config(model)
    assert cfg['input_size'] == (3, 384, 384) and cfg['mean'] == (0.5, 0.5, 0.5)
    assert cfg['interpolation'] == 'bicubic' and cfg['crop_pct'] == 1.0
    base = naflex.create_model('naflexvit_base_patch16_gap', depth=1)
    assert base.pretrained_cfg['tag'] == 'e300_s576_in1k'


@torch.no_grad()
def test_features_only_and_forward_head_like_timm():
    ours, ref = pair('naflexvit_tiny_test')
    x = torch.randn(1, 3, 384, 384)
    tokens = ours.forward_features(x)
    assert tokens.shape == (1, 4 + 576, 64)
    assert maxdiff(tokens, ref.forward_features(x)) < TOL
    pooled = ours.forward_head(tokens, pre_logits=True)
    assert pooled.shape == (1, 64)
    assert maxdiff(pooled, ref.forward_head(ref.forward_features(x), pre_logits=True)) < TOL
    # num_classes=0 -> pooled features
    ours.reset_classifier(0)
    assert ours(x).shape == (1, 64)
    # features_only: pruned like timm's FeatureGetterNet, same state-dict keys and outputs
    feat = naflex.create_model('naflexvit_tiny_test', features_only=True, out_indices=(0, 1))
    tfeat = timm.create_model('naflexvit_base_patch16_gap', embed_dim=64, depth=2, num_heads=4, init_values=1e-5,
                              features_only=True, out_indices=(0, 1))
    randomize_(tfeat)
    feat.load_state_dict(tfeat.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 160)
    outs, touts = feat(x), tfeat(x)
    assert [o.shape for o in outs] == [(2, 64, 14, 10)] * 2
    for a, b in zip(outs, touts):
        assert maxdiff(a, b) < TOL
    assert feat.feature_info.reduction() == [16, 16] and feat.feature_info.channels() == [64, 64]
    default = naflex.create_model('naflexvit_tiny_test', features_only=True, out_indices=1)
    assert len(default(x)) == 1


def test_reset_classifier_keeps_the_model_mode():
    model = naflex.create_model('naflexvit_tiny_test').eval()
    model.reset_classifier(7)
    assert not model.head.training and model.head.out_features == 7
    model.train().reset_classifier(3)
    assert model.head.training


def test_bad_inputs_give_clear_errors():
    model = naflex.create_model('naflexvit_tiny_test')
    with pytest.raises(ValueError, match='multiple of the patch size'):
        model(torch.randn(1, 3, 100, 96))
    with pytest.raises(ValueError, match='backend'):
        model.set_attn_backend('nope')
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(10, 'mean')
    with pytest.raises(ValueError, match='class_token'):
        model.reset_classifier(10, 'token')


@torch.no_grad()
def test_compile_fullgraph_packed_no_graph_breaks():
    """No host syncs in the packed forward: dynamo traces it whole and the compiled model agrees."""
    model = naflex.create_model('naflexvit_tiny_test').eval()
    _, packed = make_batches([(3, 5), (4, 4), (2, 7)])
    for backend in ('sdpa_dense', 'flex', 'auto'):
        model.set_attn_backend(backend)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(packed)
        assert explained.graph_break_count == 0, (backend, explained.break_reasons)
        assert explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # inductor, default backend ('auto' -> sdpa_padded on CPU)
    assert maxdiff(compiled(packed), model(packed)) < TOL


@torch.no_grad()
def test_autocast_bf16_cpu_close_to_fp32():
    """Mixed precision runs the packed path (pos embed stays fp32) and stays close to fp32 logits."""
    ours, _ = pair('naflexvit_tiny_test_map')
    _, packed = make_batches(GRIDS[:3])
    ref = ours(packed)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = ours(packed)
    assert out.dtype == torch.bfloat16
    assert maxdiff(out.float(), ref) < 0.1 * ref.abs().max().item()


@torch.no_grad()
def test_model_card_usage_with_timm_transforms(tmp_path):
    """The model card's snippet with naflex.create_model in place of timm.create_model (tiny variant)."""
    from PIL import Image
    from safetensors.torch import save_file
    ref = randomize_(timm_twin('naflexvit_tiny_test')).eval()
    save_file(ref.state_dict(), str(tmp_path / 'model.safetensors'))
    model = naflex.create_model('naflexvit_tiny_test', pretrained=str(tmp_path / 'model.safetensors')).eval()
    img = Image.fromarray(torch.randint(0, 256, (300, 500, 3), dtype=torch.uint8).numpy())
    data_config = timm.data.resolve_model_data_config(model)
    transforms = timm.data.create_transform(**data_config, is_training=False)
    x = transforms(img).unsqueeze(0)
    logits = model(x)
    assert logits.shape == (1, 1000)
    assert maxdiff(logits, ref(x)) < TOL
    assert maxdiff(logits.softmax(-1).topk(5).values, ref(x).softmax(-1).topk(5).values) < TOL
    tokens = model.forward_features(x)
    assert tokens.shape == (1, 580, 64)
    assert model.forward_head(tokens, pre_logits=True).shape == (1, 64)
    assert naflex.create_model('naflexvit_tiny_test', num_classes=0)(x).shape == (1, 64)
    feats = naflex.create_model('naflexvit_tiny_test', features_only=True, out_indices=2)(x)
    assert [f.shape for f in feats] == [(1, 64, 24, 24)] * 2


@pytest.mark.slow
@torch.no_grad()
def test_compile_dynamic_one_graph_for_all_packings():
    """With dynamic shapes, batches with different token counts / image counts reuse one graph."""
    from torch._dynamo.utils import counters
    model = naflex.create_model('naflexvit_tiny_test_map').eval()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend='aot_eager')
    for grids in ([(3, 5), (4, 4), (2, 7)], [(6, 5), (4, 4)], [(9, 9), (1, 3), (2, 2), (5, 5)]):
        _, packed = make_batches(grids)
        assert maxdiff(compiled(packed), model(packed)) < TOL
    assert counters['stats']['unique_graphs'] == 1
