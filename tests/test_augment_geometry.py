"""Sequence-fit geometry vs timm 1.0.31: eval grid/pixels (ResizeToSequence) and train RRC parameters."""
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from augment.geometry import fit_grid_to_seq, sample_rrc
from loaders.packing import patchify_hwc
from loaders.pipeline import eval_sample

LENS = (128, 256, 576, 784, 1024)
SIZES = [(1, 1), (20, 10000), (10000, 20), (224, 224), (375, 500), (500, 375), (3000, 2000), (16, 16),
         (15, 17), (7, 3), (80, 2955), (333, 1291), (481, 640)]


def test_eval_grid_matches_timm():
    from timm.data.naflex_transforms import get_image_size_for_seq
    rng = random.Random(0)
    sizes = SIZES + [(rng.randint(1, 2000), rng.randint(1, 2000)) for _ in range(150)]
    for L in LENS:
        for P in (16, 14, 32):
            for h, w in sizes:
                _, (th, tw) = get_image_size_for_seq((h, w), P, L)
                gh, gw = fit_grid_to_seq(h, w, P, L)
                assert (gh * P, gw * P) == (th, tw), (h, w, L, P)
                assert gh * gw <= L


@pytest.mark.parametrize('L', LENS)
def test_eval_pixels_match_timm(tmp_path, L):
    from timm.data import create_transform
    tf = create_transform(is_training=False, naflex=True, patch_size=16, max_seq_len=L, interpolation='bicubic',
                          use_prefetcher=True, patchify=True)
    y, x = np.mgrid[0:300, 0:410]
    arr = np.stack([x % 256, y % 256, (x * y) % 256], -1).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / 'a.png')
    ref = tf(Image.open(tmp_path / 'a.png').convert('RGB'))
    ours = patchify_hwc(eval_sample(str(tmp_path / 'a.png'), L, 16), 16)
    assert torch.equal(ours, ref['patches'].to(torch.uint8))


def test_rrc_params_match_timm_given_same_random_stream():
    from timm.data.naflex_transforms import RandomResizedCropToSequence
    img = torch.zeros(3, 1, 1)
    for seed in range(200):
        h, w = random.Random(seed).choice(SIZES)
        img = torch.zeros(3, h, w)
        random.seed(seed)
        (top, left, ch, cw), (th, tw), _ = RandomResizedCropToSequence.get_params(
            img, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), patch_h=16, patch_w=16, max_seq_len=256)
        c = sample_rrc(h, w, random.Random(seed), patch_size=16, max_seq_len=256)
        assert (c.top, c.left, c.height, c.width) == (top, left, ch, cw)
        assert (c.grid_h * 16, c.grid_w * 16) == (th, tw)


def test_grid_where_timms_binary_search_stops_short():
    """At ratio r = 23*16/1724 a 1799x1724 image has grid (ceil(1799 r / 16), 23) = (25, 23), 575 <= 576 patches: the
    largest grid timm's rule allows. timm's float search (eps 1e-5) stops within eps below r and returns 24x23."""
    from fractions import Fraction

    from timm.data.naflex_transforms import get_image_size_for_seq
    r = Fraction(23 * 16, 1724)
    assert (math.ceil(1799 * r / 16), math.ceil(1724 * r / 16)) == (25, 23)
    assert fit_grid_to_seq(1799, 1724, 16, 576) == (25, 23)
    assert get_image_size_for_seq((1799, 1724), 16, 576)[1] == (24 * 16, 23 * 16)
