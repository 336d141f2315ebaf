"""FlexiViT patch-size resampling (arXiv:2212.08013) of the NaFlex linear patch embedding.

The PI-resize maps the base kernel w to w' = w @ pinv(R) so that an upsampled patch embeds like the original
(<R x, w'> = <x, w>); ours factorises pinv(R) per axis and must equal timm's ``resample_patch_embed``.
"""
import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_patch_embed

import naflex
from naflex.model.patch_embed import resample_patch_weight

from test_model import make_batches


@pytest.mark.parametrize('new', [(8, 8), (12, 12), (24, 24), (32, 32), (10, 20)])
def test_resample_equals_timm(new):
    torch.manual_seed(0)
    w_lin = torch.randn(32, 16 * 16 * 3)  # [D, P*P*C], P-P-C order
    ours = resample_patch_weight(w_lin, (16, 16), new)
    w_conv = w_lin.reshape(32, 16, 16, 3).permute(0, 3, 1, 2)  # [D, C, P, P]
    ref = resample_patch_embed(w_conv, list(new)).permute(0, 2, 3, 1).reshape(32, -1)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize('new', [16, 24, 32])
def test_upsampled_patch_embeds_like_original(new):
    """The defining FlexiViT property for new >= base size."""
    torch.manual_seed(0)
    w = torch.randn(8, 16 * 16 * 3, dtype=torch.float64)
    w_new = resample_patch_weight(w, (16, 16), (new, new))
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    x_up = F.interpolate(x, size=(new, new), mode='bicubic', antialias=True, align_corners=False)
    flat = lambda t: t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)  # noqa: E731  P-P-C
    torch.testing.assert_close(flat(x_up) @ w_new.T, flat(x) @ w.T, atol=1e-8, rtol=1e-8)


def test_variable_patch_size_grads_and_compile():
    model = naflex.create_model('naflexvit_tiny_test')
    _, packed = make_batches([(5, 4), (3, 7)], p=8)
    model(packed).sum().backward()
    assert model.embeds.proj.weight.grad.abs().sum() > 0
    model.eval()
    model.prewarm_patch_sizes([8])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(packed)
    assert explained.graph_break_count == 0, explained.break_reasons
