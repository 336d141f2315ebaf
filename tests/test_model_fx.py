"""torch.fx tracing of the image-tensor forward, as timm's feature-extraction tools use it.

``torch.fx.symbolic_trace`` records one graph for every image size: the patch-size check is a recorded call
(``fx.wrap``), so the traced module still refuses a bad size; position-embedding sizes are numbers, not symbols.
Compared with timm 1.0.31 on the same weights: ``timm.models.create_feature_extractor`` and
``features_only=True, feature_cls='fx'`` (timm's FeatureGraphNet). The packed forward is unchanged: test_model.py
compiles it whole.
"""
import pytest
import timm
import torch
from timm.models import create_feature_extractor

import naflex

from test_model import TOL, maxdiff, pair, randomize_

SIZES = [(2, 3, 64, 96), (1, 3, 128, 32)]  # one graph for both


@pytest.mark.parametrize('name, overrides', [
    ('naflexvit_tiny_test', {}), ('naflexvit_tiny_test_parfac', {}), ('naflexvit_tiny_test_map', {}),
    ('naflexvit_tiny_test_token', {}), ('naflexvit_tiny_test_par', dict(pos_embed_antialias=False)),
    ('naflexvit_tiny_test', dict(pos_embed_interp_mode='bilinear', pos_embed_antialias=False)),
])
@torch.no_grad()
def test_symbolic_trace_gives_timms_logits_at_any_size(name, overrides):
    ours, ref = pair(name, **overrides)
    traced = torch.fx.symbolic_trace(ours)
    for shape in SIZES:
        x = torch.randn(*shape)
        assert maxdiff(traced(x), ref(x)) < TOL, shape
    with pytest.raises(ValueError, match='image size 100x96 is not a multiple of the patch size 16'):
        traced(torch.randn(1, 3, 100, 96))


@torch.no_grad()
def test_create_feature_extractor_like_timm():
    ours, ref = pair('naflexvit_tiny_test')
    nodes = {'blocks.0': 'b0', 'blocks.1': 'b1', 'norm': 'final'}
    extract, ref_extract = create_feature_extractor(ours, return_nodes=nodes), create_feature_extractor(ref, nodes)
    for shape in SIZES:
        x = torch.randn(*shape)
        out, ref_out = extract(x), ref_extract(x)
        assert out.keys() == ref_out.keys() == set(nodes.values())
        for k in out:
            assert maxdiff(out[k], ref_out[k]) < TOL, (shape, k)


@torch.no_grad()
def test_features_only_fx_is_timms_feature_graph_net():
    kwargs = dict(embed_dim=64, depth=2, num_heads=4, features_only=True, feature_cls='fx', out_indices=(0, -1))
    ours = naflex.create_model('naflexvit_base_patch16_gap', **kwargs)
    theirs = randomize_(timm.create_model('naflexvit_base_patch16_gap', **kwargs), seed=9)
    assert type(ours) is type(theirs) and type(ours).__name__ == 'FeatureGraphNet'
    assert ours.pretrained_cfg == theirs.pretrained_cfg and ours.default_cfg == theirs.default_cfg
    assert (ours._traits, ours.in_chans) == (theirs._traits, theirs.in_chans)
    ours.load_state_dict(theirs.state_dict())  # keys graph_module.*, strict
    x = torch.randn(2, 3, 48, 80)
    outs, touts = ours(x), theirs(x)
    assert len(outs) == len(touts) == 2
    for a, b in zip(outs, touts):
        assert a.shape == b.shape and maxdiff(a, b) < TOL


def test_image_forward_compiles_without_graph_breaks():
    """The fx-friendly check stays a plain Python check for dynamo."""
    model = naflex.create_model('naflexvit_tiny_test').eval()
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(torch.randn(1, 3, 64, 96))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
