"""Parameter grouping equals timm's, the torch NAdamW tracks timm's NAdamW, clipping and EMA behave as timm's."""
import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from timm.optim.nadamw import NAdamW
from timm.utils.model_ema import ModelEmaV3

from naflex.train.config import OptimConfig
from naflex.train.optim import ModelEma, clip_gradients, create_optimizer, param_groups


def _vit():
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', depth=2, embed_dim=32, num_heads=2, img_size=32, num_classes=5)


def _as_sets(groups):
    return sorted((frozenset(id(p) for p in g['params']), g['weight_decay'], round(g.get('lr_scale', 1.0), 12))
                  for g in groups)


@pytest.mark.parametrize('layer_decay', [None, 0.75])
def test_groups_match_timm(layer_decay):
    model = _vit()
    ours = param_groups(model, 0.1, layer_decay)
    ref = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.1, layer_decay=layer_decay).param_groups
    assert _as_sets(ours) == _as_sets(ref)
    no_wd = {id(p) for g in ours if g['weight_decay'] == 0 for p in g['params']}
    assert id(model.pos_embed) in no_wd and id(model.cls_token) in no_wd and id(model.blocks[0].norm1.weight) in no_wd
    assert id(model.blocks[0].attn.qkv.weight) not in no_wd


def _args(**kw):
    return OptimConfig(**dict(dict(opt='nadamw', lr=1e-2, weight_decay=0.1, momentum=0.9), **kw))


def test_nadamw_tracks_timm():
    """torch NAdam(decoupled wd, constant mu=beta1) vs timm NAdamW: identical weight decay and second moment,
    first-moment bias correction 1/(1-b1^(t+1)) vs 1/(1-b1^t) -> close after a few steps. Tolerance: 2% of
    the parameter travel over 200 steps."""
    torch.manual_seed(0)
    target = torch.randn(64)
    w0 = torch.randn(64)
    ours_p, ref_p = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    model = torch.nn.Linear(1, 1)
    model.weight = ours_p
    ours = create_optimizer(model, _args())
    assert isinstance(ours, torch.optim.NAdam) and ours.defaults['decoupled_weight_decay']
    ours = torch.optim.NAdam([ours_p], lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, momentum_decay=1e6)
    ref = NAdamW([ref_p], lr=1e-2, weight_decay=0.1)
    for _ in range(200):
        for p, o in ((ours_p, ours), (ref_p, ref)):
            o.zero_grad()
            ((p - target) ** 2).sum().backward()
            o.step()
    travel = (ref_p.detach() - w0).norm()
    assert (ours_p.detach() - ref_p.detach()).norm() < 0.02 * travel


def test_optimizer_kinds():
    model = _vit()
    sgd = create_optimizer(model, _args(opt='sgd'))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults['nesterov'] and sgd.defaults['momentum'] == 0.9
    mom = create_optimizer(model, _args(opt='momentum'))
    assert not mom.defaults['nesterov']
    adamw = create_optimizer(model, _args(opt='adamw', eps=1e-6, betas=(0.9, 0.95)))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults['betas'] == (0.9, 0.95)
    assert adamw.defaults['eps'] == 1e-6
    with pytest.raises(ValueError, match='valid: nadamw'):
        create_optimizer(model, _args(opt='lamb'))


def test_clip_norm_and_value():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    norm = clip_gradients([p], 1.0, 'norm')
    assert norm.item() == pytest.approx(5.0) and p.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    p.grad = torch.tensor([3.0, -4.0, 0.5, 0.0])
    clip_gradients([p], 1.0, 'value')
    assert p.grad.tolist() == [1.0, -1.0, 0.5, 0.0]


@pytest.mark.parametrize('warmup', [False, True])
def test_ema_matches_timm(warmup):
    model = _vit()
    ours, ref = ModelEma(model, decay=0.9, warmup=warmup), ModelEmaV3(model, decay=0.9, use_warmup=warmup)
    for step in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update(model, step), ref.update(model, step)
    for (k, a), b in zip(ours.module.state_dict().items(), ref.module.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
