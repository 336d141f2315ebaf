"""Per-token position embeddings (naflex.model.pos_embed) against F.interpolate / timm's per-size resize.

NaFlex (SigLIP 2, arXiv:2502.14786) resizes a learned 16x16 table to each image's grid; NaViT
(arXiv:2307.06304) adds factorized and aspect-preserving variants. Our closed-form per-token weights must
reproduce PyTorch's kernels for every size, up- and down-sampling.
"""
import pytest
import torch
import torch.nn.functional as F

from naflex.model.batch import grid_coords
from naflex.model.pos_embed import axis_weights, factorized_pos_embed, learned_pos_embed

SIZES = list(range(1, 41)) + [47, 64, 97, 128, 255]


@pytest.mark.parametrize('mode,antialias', [('bicubic', True), ('bilinear', True), ('bicubic', False),
                                            ('bilinear', False)])
@pytest.mark.parametrize('in_len', [16, 7])
def test_axis_weights_equal_interpolate_rows(mode, antialias, in_len):
    for out in SIZES:
        eye = torch.eye(in_len, dtype=torch.float64)[None, None]
        # resize along one axis only; the other keeps its size, so it is exactly the identity
        ref = F.interpolate(eye, size=(out, in_len), mode=mode, antialias=antialias, align_corners=False)[0, 0]
        got = axis_weights(torch.arange(out), torch.full((out,), out), in_len, mode, antialias)
        torch.testing.assert_close(got.double(), ref, atol=5e-6, rtol=0, msg=f'{mode} aa={antialias} {in_len}->{out}')


def test_linear_1d_weights_equal_interpolate():
    for out in SIZES:
        eye = torch.eye(16, dtype=torch.float64)[None]
        ref = F.interpolate(eye, size=out, mode='linear', align_corners=False)[0].T
        got = axis_weights(torch.arange(out), torch.full((out,), out), 16, 'linear', antialias=False)
        torch.testing.assert_close(got.double(), ref, atol=5e-6, rtol=0)


def _timm_learned(table, h, w, mode, ar_preserving):
    """timm's NaFlex rule: F.interpolate the [1, C, 16, 16] table (to (L, L) if ar-preserving), crop, flatten."""
    size = (max(h, w),) * 2 if ar_preserving else (h, w)
    pe = F.interpolate(table.permute(0, 3, 1, 2), size=size, mode=mode, antialias=True, align_corners=False)
    return pe[:, :, :h, :w].flatten(2).transpose(1, 2)[0]


@pytest.mark.parametrize('mode', ['bicubic', 'bilinear'])
@pytest.mark.parametrize('ar_preserving', [False, True])
def test_learned_pos_embed_mixed_batch(mode, ar_preserving):
    """One call for a whole packed batch of different grids equals per-image F.interpolate."""
    torch.manual_seed(0)
    table = torch.randn(1, 16, 16, 32)
    grids = [(16, 16), (5, 7), (18, 20), (2, 26), (40, 1), (1, 1), (24, 32)]
    coord = torch.cat([grid_coords(h, w) for h, w in grids])
    grid = torch.cat([torch.tensor([[h, w]]).expand(h * w, 2) for h, w in grids])
    got = learned_pos_embed(table, coord, grid, mode, True, ar_preserving)
    ref = torch.cat([_timm_learned(table, h, w, mode, ar_preserving) for h, w in grids])
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize('ar_preserving', [False, True])
def test_factorized_pos_embed(ar_preserving):
    torch.manual_seed(0)
    ty, tx = torch.randn(1, 16, 8), torch.randn(1, 16, 8)
    for h, w in [(16, 16), (5, 7), (18, 20), (2, 26), (33, 3)]:
        ly, lx = (max(h, w),) * 2 if ar_preserving else (h, w)
        py = F.interpolate(ty.permute(0, 2, 1), size=ly, mode='linear', align_corners=False)[0].T[:h]
        px = F.interpolate(tx.permute(0, 2, 1), size=lx, mode='linear', align_corners=False)[0].T[:w]
        ref = (py[:, None] + px[None]).reshape(h * w, -1)
        coord = grid_coords(h, w)
        got = factorized_pos_embed(ty, tx, coord, torch.tensor([[h, w]]).expand(h * w, 2), ar_preserving)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)


def test_pos_embed_gradients_reach_table():
    table = torch.randn(1, 16, 16, 4, requires_grad=True)
    coord = grid_coords(20, 9)
    out = learned_pos_embed(table, coord, torch.tensor([[20, 9]]).expand(180, 2))
    out.sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_pos_embed_compiles_without_graph_breaks():
    table = torch.randn(1, 16, 16, 8)
    fn = lambda c, g: learned_pos_embed(table, c, g, 'bicubic', True, True)  # noqa: E731
    coord = grid_coords(5, 7)
    grid = torch.tensor([[5, 7]]).expand(35, 2)
    explained = torch._dynamo.explain(fn)(coord, grid)
    assert explained.graph_break_count == 0
