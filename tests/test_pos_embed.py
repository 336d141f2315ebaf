"""Per-token position embeddings (naflex.model.pos_embed) against F.interpolate / timm's per-size resize.

NaFlex (SigLIP 2, arXiv:2502.14786) resizes a learned 16x16 table to each image's grid; NaViT
(arXiv:2307.06304) adds factorized and aspect-preserving variants; RADIO (arXiv:2412.07679) a 128x128 table
resized without anti-aliasing, with or without align_corners. Our closed-form per-token weights must
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
@pytest.mark.parametrize('align_corners', [False, True])
@pytest.mark.parametrize('in_len', [16, 7, 128])
def test_axis_weights_equal_interpolate_rows(mode, antialias, align_corners, in_len):
    # float64 reference: float32 source indices near 128 are ~1e-5 apart
    atol = 2e-5 if in_len == 128 else 5e-6
    for out in SIZES:
        eye = torch.eye(in_len, dtype=torch.float64)[None, None]
        # resize along one axis only; the other keeps its size, so it is exactly the identity
        ref = F.interpolate(eye, size=(out, in_len), mode=mode, antialias=antialias, align_corners=align_corners)[0, 0]
        got = axis_weights(torch.arange(out), torch.full((out,), out), in_len, mode, antialias, align_corners)
        torch.testing.assert_close(got.double(), ref, atol=atol, rtol=0,
                                   msg=f'{mode} aa={antialias} ac={align_corners} {in_len}->{out}')


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


@pytest.mark.parametrize('mode', ['bilinear', 'bicubic'])
@pytest.mark.parametrize('align_corners', [False, True])
def test_plain_kernel_taps_on_a_large_table(mode, align_corners):
    """RADIO's rule: a 128x128 table resized without anti-aliasing to a square of the larger side (align_corners
    either way), cropped top-left; the gathered taps equal F.interpolate in float32 for every grid of a batch,
    including one larger than the table and the table's own size."""
    torch.manual_seed(0)
    table = torch.randn(1, 128, 128, 16)
    grids = [(32, 32), (5, 7), (18, 20), (2, 26), (40, 1), (1, 1), (128, 128), (130, 3)]
    coord = torch.cat([grid_coords(h, w) for h, w in grids])
    grid = torch.cat([torch.tensor([[h, w]]).expand(h * w, 2) for h, w in grids])
    got = learned_pos_embed(table, coord, grid, mode, False, True, align_corners=align_corners)
    ref = []
    for h, w in grids:
        side = max(h, w)
        pe = F.interpolate(table.permute(0, 3, 1, 2), size=(side, side), mode=mode, antialias=False,
                           align_corners=align_corners)
        ref.append(pe[:, :, :h, :w].flatten(2).transpose(1, 2)[0])
    # float32 source indices near 128 differ from PyTorch's in the last bit (bilinear with align_corners: exact)
    torch.testing.assert_close(got, torch.cat(ref), atol=3e-5, rtol=0)
    # the dense weights (what the anti-aliased path multiplies) agree with the gathered taps
    wy = axis_weights(coord[:, 0], grid.amax(1), 128, mode, False, align_corners)
    wx = axis_weights(coord[:, 1], grid.amax(1), 128, mode, False, align_corners)
    dense = (wy[:, :, None] * wx[:, None, :]).flatten(1) @ table.reshape(-1, 16)
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=0)


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


@pytest.mark.parametrize('antialias', [True, False])
def test_pos_embed_gradients_reach_table(antialias):
    """Both paths (dense matmul, gathered taps) give the table the gradient of F.interpolate's."""
    table = torch.randn(1, 16, 16, 4, requires_grad=True)
    coord = grid_coords(20, 9)
    out = learned_pos_embed(table, coord, torch.tensor([[20, 9]]).expand(180, 2), 'bilinear', antialias)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    ref_table = table.detach().clone().requires_grad_(True)
    ref = F.interpolate(ref_table.permute(0, 3, 1, 2), size=(20, 9), mode='bilinear', antialias=antialias,
                        align_corners=False).flatten(2).transpose(1, 2)[0]
    (ref * upstream).sum().backward()
    torch.testing.assert_close(table.grad, ref_table.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize('antialias', [True, False])
def test_pos_embed_compiles_without_graph_breaks(antialias):
    table = torch.randn(1, 16, 16, 8)
    fn = lambda c, g: learned_pos_embed(table, c, g, 'bicubic', antialias, True)  # noqa: E731
    coord = grid_coords(5, 7)
    grid = torch.tensor([[5, 7]]).expand(35, 2)
    explained = torch._dynamo.explain(fn)(coord, grid)
    assert explained.graph_break_count == 0
