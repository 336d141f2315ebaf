"""Full-size NaFlexViT variants against timm 1.0.31 with random weights (pretrained=None).

The three model-card variants (NaFlex, SigLIP 2 arXiv:2502.14786; par / parfac from NaViT arXiv:2307.06304)
are checked at full size on image tensors (384x384 and non-square), timm's padded dict with mixed grids,
and our packed batch. The other registered variants are checked at full width with fewer blocks (their
distinguishing features: MAP head, so150m2 / so400m widths, gelu_tanh, bilinear position embedding).
"""
import pytest
import torch

import naflex

from test_model import assert_batches_match, assert_images_match, timm_twin

CARD = ['naflexvit_base_patch16_gap', 'naflexvit_base_patch16_par_gap', 'naflexvit_base_patch16_parfac_gap']
OTHERS = ['naflexvit_base_patch16_map', 'naflexvit_so150m2_patch16_reg1_gap', 'naflexvit_so150m2_patch16_reg1_map',
          'naflexvit_base_patch16_siglip', 'naflexvit_so400m_patch16_siglip']
# taller / wider than the 16x16 table (upsampling on each axis), smaller on both (downsampling); kept small
# so that a full-size forward stays cheap on 2 cores (the tiny tests cover more grids)
GRIDS = [(18, 4), (5, 7), (3, 20)]


def _random_state(model: torch.nn.Module, std: float = 0.02, seed: int = 0):
    """Random weights for every tensor (norm scales around 1), cheaper than running two full inits."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in model.state_dict().items():
        noise = torch.randn(v.shape, generator=g) * std
        state[k] = noise + 1.0 if ('norm' in k and k.endswith('weight')) else noise
    return state


def _pair(name, **overrides):
    """(ours, timm) full-size models sharing random weights. Both are built on the meta device (skipping two
    ~86M-parameter inits on 2 cores), materialised, then loaded strictly."""
    with torch.device('meta'):
        ref = timm_twin(name, **overrides)
        ours = naflex.create_model(name, pretrained=None, **overrides)
    ref, ours = ref.to_empty(device='cpu').eval(), ours.to_empty(device='cpu').eval()
    state = _random_state(ref)
    ref.load_state_dict(state, strict=True)
    ours.load_state_dict(state, strict=True)
    return ours, ref


@pytest.mark.slow
@pytest.mark.parametrize('name', CARD)
@torch.no_grad()
def test_card_variant_full_size_matches_timm(name):
    ours, ref = _pair(name)
    assert ref.num_classes == 1000
    assert_images_match(ours, ref, [(1, 3, 384, 384), (1, 3, 64, 288)])
    # our padded path is checked against timm in test_model.py (and below at full width)
    assert_batches_match(ours, ref, GRIDS, check_padded=False)


@pytest.mark.slow
@pytest.mark.parametrize('name', OTHERS)
@torch.no_grad()
def test_other_variants_full_width_match_timm(name):
    ours, ref = _pair(name, depth=2, num_classes=10)
    assert_images_match(ours, ref, [(1, 3, 160, 224)])
    assert_batches_match(ours, ref, GRIDS)
