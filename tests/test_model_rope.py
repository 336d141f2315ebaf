"""RoPE and timm's other NaFlexVitCfg options (EVA block, scale norms, grouped-query attention) against timm 1.0.31.

Tiny configurations (depth 2, width 64), the same weights in both: logits equal timm's to 1e-4 (fp32 CPU) on image
tensors and padded dicts, the packed layout equals timm's padded dict, state dicts load strictly both ways, and the
train-time RoPE coordinate augmentation gives timm's logits for the same seed. RoPE: RoFormer (arXiv:2104.09864).
"""
import pytest
import torch

import naflex
from naflex.model.attention import available_backends
from test_model import TOL, make_batches, maxdiff, randomize_, timm_twin

GRIDS = [(5, 7), (4, 4), (6, 3), (2, 9)]  # distinct sizes, both aspect ratios
MROPE = dict(rope_type='mrope', rope_mrope_section=(2, 3, 3))
CONFIGS = {
    'axial': dict(rope_type='axial'),
    'axial_xy_ref_offset': dict(rope_type='axial', rope_grid_indexing='xy', rope_ref_feat_shape=(8, 12),
                                rope_grid_offset=0.5, rope_temperature=100.0),
    'axial_half': dict(rope_type='axial', rope_rotate_half=True),
    'mixed': dict(rope_type='mixed', rope_temperature=10.0),
    'mixed_xy': dict(rope_type='mixed', rope_temperature=10.0, rope_grid_indexing='xy'),
    'dinov3': dict(rope_type='dinov3', rope_temperature=100.0),
    'dinov3_half_offset': dict(rope_type='dinov3', rope_rotate_half=True, rope_grid_offset=0.25),
    'mrope': MROPE,
    'eva_unfused_gated': dict(rope_type='axial', attn_type='eva', qkv_fused=False, attn_gated=True),
    'eva_no_qkv_bias': dict(attn_type='eva', qkv_bias=False, qk_norm=True),
    'gqa_per_block': dict(rope_type='dinov3', qkv_fused=False, num_kv_heads=(2, 1)),
    'swiglu_packed': dict(swiglu_mlp=True, init_values=0.1),
    'swiglu_aligned_scale_norms': dict(rope_type='axial', swiglu_mlp=True, swiglu_align_to=48, scale_mlp_norm=True,
                                       scale_attn_inner_norm=True, init_values=0.1, attn_only_layer_scale=True),
    'eva_mlp_scale_norm': dict(attn_type='rope', scale_mlp_norm=True, act_layer='gelu_tanh'),
    'standard_scale_norms': dict(scale_mlp_norm=True, scale_attn_inner_norm=True),
    'key_only_mask': dict(rope_type='axial', use_key_only_attn_mask=True),
}
AUG = dict(rope_shift_coords=1.5, rope_jitter_coords=1.3, rope_rescale_coords=2.0)


def pair(name='naflexvit_tiny_test', seed=0, train=False, **kw):
    """(ours, timm) with identical random weights (ours loads timm's state dict strictly)."""
    ref = randomize_(timm_twin(name, **kw), seed).train(train)
    ours = naflex.create_model(name, **kw).train(train)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize('name', ['naflexvit_tiny_test', 'naflexvit_tiny_test_token'])
@pytest.mark.parametrize('config', sorted(CONFIGS))
@torch.no_grad()
def test_options_match_timm(config, name):
    """Images, padded dict, packed dict: timm's logits; parameters under timm's names, loadable both ways."""
    ours, ref = pair(name, **CONFIGS[config])
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 64)
    assert maxdiff(ours(x), ref(x)) < TOL
    padded, packed = make_batches(GRIDS)
    ref_out = ref(padded)
    assert maxdiff(ours(padded), ref_out) < TOL
    assert maxdiff(ours(packed), ref_out) < TOL
    assert torch.equal(ours(packed), ours(packed))  # eval is deterministic


def test_rope_changes_the_model_and_mixed_freqs_are_learned():
    """RoPE makes attention depend on positions (a model without it gives other logits for the same weights), and
    'mixed' RoPE has one learned frequency tensor per block and head that gets a gradient and no weight decay."""
    base = randomize_(naflex.create_model('naflexvit_tiny_test', attn_type='rope')).eval()  # same block, no RoPE
    rope = naflex.create_model('naflexvit_tiny_test', rope_type='axial').eval()
    rope.load_state_dict(base.state_dict())
    _, packed = make_batches(GRIDS)
    with torch.no_grad():
        assert maxdiff(rope(packed), base(packed)) > 1e-3
    mixed = naflex.create_model('naflexvit_tiny_test', rope_type='mixed', rope_temperature=10.0)
    assert mixed.rope.freqs.shape == (2, 2, 4, 8)  # [axis, depth, heads, head_dim / 2]
    assert 'rope.freqs' in mixed.no_weight_decay()
    mixed(packed).sum().backward()
    assert mixed.rope.freqs.grad is not None and mixed.rope.freqs.grad[:, 1].abs().sum() > 0


@pytest.mark.parametrize('rope_type', ['axial', 'mixed', 'dinov3', 'mrope'])
@torch.no_grad()
def test_coordinate_augmentation_draws_like_timm(rope_type):
    """Training with shift / jitter / rescale: the same seed gives timm's logits on image tensors (one draw), on
    padded dicts and packed dicts (one draw per distinct grid size; sizes repeated too), also with patch dropout on
    padded dicts of distinct sizes (the RNG stream stays aligned); evaluation does not augment."""
    kw = dict(MROPE if rope_type == 'mrope' else dict(rope_type=rope_type), **AUG)
    if rope_type == 'mixed':
        kw['rope_temperature'] = 10.0
    ours, ref = pair(train=True, **kw)
    for grids in (GRIDS, [(5, 7), (4, 4), (5, 7), (4, 4)]):
        padded, packed = make_batches(grids)
        torch.manual_seed(3)
        ref_out = ref(padded)
        for inputs in (padded, packed):
            torch.manual_seed(3)
            assert maxdiff(ours(inputs), ref_out) < TOL
        ours.eval()
        assert maxdiff(ours(packed), ref_out) > 1e-3  # the augmentation did something
        ours.train()
    x = torch.randn(2, 3, 96, 64)
    torch.manual_seed(4)
    ref_out = ref(x)
    torch.manual_seed(4)
    assert maxdiff(ours(x), ref_out) < TOL
    ours, ref = pair(train=True, patch_drop_rate=0.3, **kw)
    padded, _ = make_batches(GRIDS)
    torch.manual_seed(5)
    ref_out = ref(padded)
    torch.manual_seed(5)
    assert maxdiff(ours(padded), ref_out) < TOL


@pytest.mark.parametrize('rope_type', ['axial', 'mixed'])
@torch.no_grad()
def test_packed_patch_dropout_rotates_the_kept_tokens_by_their_own_positions(rope_type):
    """Under packed patch dropout each kept token keeps its RoPE position: the training forward equals the
    evaluation forward of a pack made of the kept patches only (same coordinates and grid sizes)."""
    model = naflex.create_model('naflexvit_tiny_test', rope_type=rope_type, rope_temperature=10.0,
                                patch_drop_rate=0.4, global_pool='avg')
    randomize_(model)
    _, packed = make_batches(GRIDS)
    model.train()
    out = model.forward_intermediates(packed, output_dict=True, indices=1, output_fmt='NLC')
    keep = out['keep_index']
    assert keep.shape[0] < packed['patches'].shape[0]
    seg = torch.searchsorted(packed['cu_seqlens'][1:].long(), keep, right=True)
    lens = torch.bincount(seg, minlength=len(GRIDS))
    kept = dict(patches=packed['patches'][keep], patch_coord=packed['patch_coord'][keep],
                seq_lens=lens.int(), grid_sizes=packed['grid_sizes'], max_seqlen=int(lens.max()), patch_size=16)
    model.eval()
    expected = model.forward_features(kept)['tokens']
    assert maxdiff(out['image_features']['tokens'], expected) < TOL


@pytest.mark.parametrize('backend', available_backends(torch.device('cpu')))
@torch.no_grad()
def test_every_attention_backend_with_rope(backend):
    """sdpa_dense, sdpa_padded, flex (and varlen on CUDA) give timm's padded logits with per-token RoPE."""
    ours, ref = pair(rope_type='mixed', rope_temperature=10.0, reg_tokens=2, qkv_fused=False)
    ours.set_attn_backend(backend)
    padded, packed = make_batches(GRIDS)
    assert maxdiff(ours(packed), ref(padded)) < TOL


def test_grad_checkpointing_with_per_block_rope_same_grads():
    model = naflex.create_model('naflexvit_tiny_test', rope_type='mixed', rope_temperature=10.0)
    _, packed = make_batches(GRIDS[:2])
    model(packed).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(packed).square().sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6), n


@torch.no_grad()
def test_dynamic_img_pad_matches_timm():
    ours, ref = pair(rope_type='axial', dynamic_img_pad=True)
    x = torch.randn(2, 3, 90, 70)  # not multiples of 16
    assert maxdiff(ours(x), ref(x)) < TOL
    strict = naflex.create_model('naflexvit_tiny_test')
    with pytest.raises(ValueError, match='multiple of the patch size'):
        strict(x)


@pytest.mark.parametrize('kwargs, message', [
    (dict(rope_type='spiral'), 'invalid rope_type'),
    (dict(rope_type='mixed', rope_rotate_half=True), 'rope_rotate_half=False'),
    (dict(rope_type='mrope'), 'rope_mrope_section'),
    (dict(rope_type='mrope', rope_mrope_section=(2, 3, 3), rope_grid_indexing='xy'), "'ij' only"),
    (dict(rope_type='axial', rope_grid_indexing='yx'), 'rope_grid_indexing'),
    (dict(rope_type='axial', rope_jitter_coords=0.5), 'rope_jitter_coords must be'),
    (dict(rope_type='axial', rope_shift_coords=-1), 'rope_shift_coords must be'),
    (dict(rope_type='axial', num_heads=32), 'divisible by 4'),
    (dict(num_kv_heads=2), 'qkv_fused=False'),
    (dict(num_kv_heads=3, qkv_fused=False, rope_type='axial'), 'divide num_heads'),
    (dict(num_kv_heads=(2, 2, 2), qkv_fused=False, rope_type='axial'), 'one entry per block'),
    (dict(rope_type='mixed', num_kv_heads=2, qkv_fused=False), 'num_kv_heads=None'),
    (dict(attn_type='flash'), 'invalid attn_type'),
    (dict(embed_proj_type='conv'), 'embed_proj_type'),
    (dict(norm_layer='rmsnorm'), 'norm_layer'),
    (dict(weight_init='jax'), 'weight_init'),
    (dict(pos_embed_use_grid_sample=True), 'pos_embed_use_grid_sample'),
    (dict(patchify_channels_last=False), 'patchify_channels_last'),
    (dict(rope_ref_feat_shape=(8,)), 'rope_ref_feat_shape'),
    (dict(num_kv_heads='2'), 'num_kv_heads'),
])
def test_bad_options_give_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        naflex.create_model('naflexvit_tiny_test', **kwargs)
    assert '\n' not in str(err.value)


def test_switches_timm_has_are_accepted():
    """Every NaFlexVitCfg field of timm 1.0.31 is a field here (attn_backend is ours). The patch interpolator
    switch sets timm's capability flag and prewarm contract; resampling itself works either way. timm's
    ``model(patches, patch_coord=, patch_valid=)`` call gives the padded dict's logits."""
    from dataclasses import fields
    from timm.models.naflexvit import NaFlexVitCfg as TimmCfg
    ours = {f.name for f in fields(naflex.NaFlexVitCfg)}
    missing = {f.name for f in fields(TimmCfg)} - ours - {'pos_embed_align_corners'}
    assert not missing
    fixed = naflex.create_model('naflexvit_tiny_test').eval()
    assert not fixed.supports_patch_interpolation
    with pytest.raises(RuntimeError, match='not supported'):
        fixed.prewarm_patch_interpolator([(8, 8)])
    variable = naflex.create_model('naflexvit_tiny_test', enable_patch_interpolator=True)
    assert variable.supports_patch_interpolation
    variable.prewarm_patch_interpolator([(8, 8), 12])
    padded, _ = make_batches(GRIDS[:2], p=8)
    assert fixed(dict(padded, patch_size=8)).shape == (2, 1000)
    with torch.no_grad():
        args_out = fixed(padded['patches'].reshape(2, -1, 8, 8, 3), patch_coord=padded['patch_coord'],
                         patch_valid=padded['patch_valid'])
        assert maxdiff(args_out, fixed(dict(padded, patch_size=8))) < TOL
    with pytest.raises(ValueError, match='patch_valid is required'):
        fixed(padded['patches'], patch_coord=padded['patch_coord'])


@pytest.mark.slow
@torch.no_grad()
def test_compile_packed_rope_one_graph_no_recompiles():
    """The packed forward with per-block RoPE and grouped-query attention traces whole (no graph break) and, with
    dynamic shapes, one graph serves packs of other token and image counts."""
    from torch._dynamo.utils import counters
    model = naflex.create_model('naflexvit_tiny_test', rope_type='dinov3', qkv_fused=False, num_kv_heads=2,
                                attn_backend='sdpa_padded').eval()
    _, packed = make_batches(GRIDS[:3])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(packed)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend='aot_eager')
    for grids in (GRIDS[:3], [(6, 5), (4, 4)], [(9, 9), (1, 3), (2, 2), (5, 5)]):
        _, packed = make_batches(grids)
        assert maxdiff(compiled(packed), model(packed)) < TOL
    assert counters['stats']['unique_graphs'] == 1


@torch.no_grad()
def test_intermediates_and_fx_trace_with_rope():
    """forward_intermediates with per-block RoPE gives timm's blocks (images NCHW, padded dict at valid tokens), and
    the image forward still traces with torch.fx."""
    ours, ref = pair(rope_type='mixed', rope_temperature=10.0)
    x = torch.randn(2, 3, 64, 96)
    for a, b in zip(ours.forward_intermediates(x)[1], ref.forward_intermediates(x)[1]):
        assert a.shape == b.shape and maxdiff(a, b) < TOL
    padded, _ = make_batches(GRIDS)
    valid = padded['patch_valid']
    ours_blocks = ours.forward_intermediates(padded, output_fmt='NLC', intermediates_only=True)
    ref_blocks = ref.forward_intermediates(padded, output_fmt='NLC', intermediates_only=True)
    for a, b in zip(ours_blocks, ref_blocks):
        assert maxdiff(a[valid], b[valid]) < TOL
    traced = torch.fx.symbolic_trace(ours)
    assert maxdiff(traced(x), ref(x)) < TOL


@torch.no_grad()
def test_timm_patch_arguments_in_forward_features():
    """timm's ``forward_features(patches, patch_coord=, patch_valid=)`` equals the padded dict's features."""
    model = naflex.create_model('naflexvit_tiny_test', rope_type='axial').eval()
    padded, _ = make_batches(GRIDS[:2])
    by_args = model.forward_features(padded['patches'], patch_coord=padded['patch_coord'],
                                     patch_valid=padded['patch_valid'])
    by_dict = model.forward_features(padded)
    assert torch.equal(by_args['patch_valid'], by_dict['patch_valid'])
    assert maxdiff(by_args['patches'], by_dict['patches']) < TOL
