"""``forward_intermediates`` and ``prune_intermediate_layers`` against timm 1.0.31's on the same weights.

Every argument combination is called on our model and on timm's NaFlexVit holding the same random weights, and
the results must have the same structure (tuple / list / dict, keys, pairs with prefix tokens) and values to 1e-4:
for image tensors everything; for timm's padded NaFlex dict the valid (non-padding) tokens, which are all a
consumer may read; for our packed dict, the padded results of timm gathered at the valid tokens.
"""
import pytest
import torch
from timm.models._features import feature_take_indices as timm_take_indices

from naflex.model.features import feature_take_indices

from test_model import GRIDS, TOL, make_batches, maxdiff, pair

NAMES = ['naflexvit_tiny_test', 'naflexvit_tiny_test_token', 'naflexvit_tiny_test_map']  # registers / class token
CALLS = [
    dict(), dict(indices=1), dict(indices=[0, -1]), dict(indices=[0], stop_early=True), dict(norm=True),
    dict(output_fmt='NLC', norm=True), dict(return_prefix_tokens=True), dict(intermediates_only=True, indices=(1,)),
    dict(output_dict=True, return_prefix_tokens=True, output_fmt='NLC'),
    dict(output_dict=True, intermediates_only=True),
]


def assert_same(ours, theirs, where=''):
    """Same structure, tensors within TOL."""
    assert type(ours) is type(theirs), (where, type(ours), type(theirs))
    if isinstance(ours, torch.Tensor):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, where
        assert torch.equal(ours, theirs) if ours.dtype == torch.bool else maxdiff(ours, theirs) < TOL, where
    elif isinstance(ours, dict):
        assert ours.keys() == theirs.keys(), where
        for k in ours:
            assert_same(ours[k], theirs[k], f'{where}.{k}')
    else:
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f'{where}[{i}]')


def test_take_indices_like_timm():
    for n in (1, 2, 12):
        for indices in (None, 1, n, [0], [-1], [0, -1], (n - 1, 0), range(n)):
            assert feature_take_indices(n, indices) == timm_take_indices(n, indices), (n, indices)
    for n, bad in ((2, 0), (2, 3), (2, [2]), (2, [-3])):
        with pytest.raises(AssertionError):
            timm_take_indices(n, bad)
        with pytest.raises(ValueError, match='out of range'):
            feature_take_indices(n, bad)


@pytest.mark.parametrize('name', NAMES)
@torch.no_grad()
def test_image_tensor_like_timm(name):
    ours, ref = pair(name)
    x = torch.randn(2, 3, 80, 112)
    for kwargs in CALLS:
        assert_same(ours.forward_intermediates(x, **kwargs), ref.forward_intermediates(x, **kwargs), str(kwargs))
    with pytest.raises(ValueError, match='output_fmt'):
        ours.forward_intermediates(x, output_fmt='NHWC')


def _valid_rows(result, valid, num_prefix):
    """A padded-dict result with padding rows removed: intermediates [B, N, D] and final features
    [B, prefix + N, D] become lists of per-image [n_i, D] / [prefix + n_i, D]."""
    with_prefix = torch.cat([valid.new_ones(valid.shape[0], num_prefix), valid], dim=1)
    if isinstance(result, dict):
        out = dict(result)
        out['image_intermediates'] = _valid_rows(result['image_intermediates'], valid, num_prefix)
        if 'image_features' in out:
            out['image_features'] = [f[m] for f, m in zip(result['image_features'], with_prefix)]
        return out
    if isinstance(result, tuple):
        return [f[m] for f, m in zip(result[0], with_prefix)], _valid_rows(result[1], valid, num_prefix)
    return [[y[m] for y, m in zip(item, valid)] if isinstance(item, torch.Tensor) else
            (_valid_rows([item[0]], valid, num_prefix)[0], item[1]) for item in result]


@pytest.mark.parametrize('name', NAMES)
@torch.no_grad()
def test_padded_dict_like_timm(name):
    ours, ref = pair(name)
    padded, _ = make_batches(GRIDS[:3])
    npre = ours.num_prefix_tokens
    for kwargs in CALLS:
        kwargs = dict(kwargs, output_fmt='NLC')
        a, b = ours.forward_intermediates(padded, **kwargs), ref.forward_intermediates(padded, **kwargs)
        assert_same(_valid_rows(a, padded['patch_valid'], npre), _valid_rows(b, padded['patch_valid'], npre),
                    str(kwargs))
    for model in (ours, ref):  # one spatial map cannot fit every image's grid
        with pytest.raises(ValueError, match='NLC'):
            model.forward_intermediates(padded)


@pytest.mark.parametrize('name', NAMES)
@torch.no_grad()
def test_packed_dict_equals_timms_padded_at_the_valid_tokens(name):
    ours, ref = pair(name)
    padded, packed = make_batches(GRIDS[:3])
    valid = padded['patch_valid']
    final, inter = ours.forward_intermediates(packed, indices=[0, 1], output_fmt='NLC', return_prefix_tokens=True)
    ref_final, ref_inter = ref.forward_intermediates(padded, indices=[0, 1], output_fmt='NLC',
                                                     return_prefix_tokens=True)
    assert len(inter) == len(ref_inter) == 2
    for (y, prefix), (ref_y, ref_prefix) in zip(inter, ref_inter):
        assert y.shape == (int(packed['seq_lens'].sum()), ours.embed_dim)  # the input's patch order
        assert maxdiff(y, ref_y[valid]) < TOL
        assert maxdiff(prefix, ref_prefix) < TOL
    # the final features are forward_features' packed output: forward_head takes them
    assert maxdiff(ours.forward_head(final), ref.forward_head(ref_final, patch_valid=valid)) < TOL
    out = ours.forward_intermediates(packed, output_fmt='NLC', output_dict=True, intermediates_only=True, norm=True)
    ref_out = ref.forward_intermediates(padded, output_fmt='NLC', output_dict=True, intermediates_only=True, norm=True)
    assert set(out) == set(ref_out) - {'patch_valid'}  # packed tokens have no padding to mark
    for y, ref_y in zip(out['image_intermediates'], ref_out['image_intermediates']):
        assert maxdiff(y, ref_y[valid]) < TOL


@pytest.mark.parametrize('indices, prune_norm, prune_head', [
    (1, False, True), ([0], True, True), ([-1], False, False), ((0, 1), True, False)])
@torch.no_grad()
def test_prune_intermediate_layers_like_timm(indices, prune_norm, prune_head):
    ours, ref = pair('naflexvit_tiny_test_map')
    assert ours.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head) == \
        ref.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert (ours.global_pool, ours.num_classes) == (ref.global_pool, ref.num_classes)
    x = torch.randn(2, 3, 64, 48)
    take = list(range(len(ours.blocks)))
    assert_same(ours.forward_intermediates(x, take), ref.forward_intermediates(x, take))
    assert_same(ours(x), ref(x))  # prune_head: no pooling, the normed tokens come out
