"""Patch dropout (``patch_drop_rate``) against timm 1.0.31's NaFlexVit: outputs with timm's RNG draws on padded
inputs, the packed layout's invariants, packed == padded for the same kept tokens, gradients, compilation."""
import pytest
import torch
import torch.nn.functional as F

import naflex
from naflex.model import naflexvit
from naflex.model.patch_drop import drop_packed, packed_max_kept, packed_num_kept
from test_model import GRIDS, TINY, make_batches, maxdiff, pair

TOL = 1e-4
P = 0.5


def timm_keep(seed: int, b: int, n: int, p: float = P) -> torch.Tensor:
    """The kept slots timm's PatchDropoutWithIndices draws first after ``manual_seed(seed)`` (its own code)."""
    from timm.layers.patch_dropout import patch_dropout_forward
    torch.manual_seed(seed)
    _, keep = patch_dropout_forward(torch.zeros(b, n, 1), p, 0, ordered=False, training=True)
    return keep


def seeded(model, x, seed):
    torch.manual_seed(seed)
    return model(x)


def same_kept_tokens(padded, packed, keep_index):
    """timm's padded dict widened by K padding slots per row, and [B, K] slot indices that keep exactly the tokens
    ``keep_index`` (packed positions) names, each row filled up to K with the new padding slots."""
    cu = packed['cu_seqlens'].long()
    seg = torch.searchsorted(cu[1:], keep_index, right=True)
    b, n = padded['patch_valid'].shape
    per_image = [keep_index[seg == i] - cu[i] for i in range(b)]
    k = max(len(x) for x in per_image)
    keep = torch.stack([torch.cat([x, torch.arange(n, n + k - len(x))]) for x in per_image])
    wide = dict(patches=F.pad(padded['patches'], (0, 0, 0, k)), patch_coord=F.pad(padded['patch_coord'], (0, 0, 0, k)),
                patch_valid=F.pad(padded['patch_valid'], (0, k)))
    return wide, keep


class FixedDrop(torch.nn.Module):
    """timm's patch_drop module with its draw replaced by given indices."""

    def __init__(self, keep, num_prefix):
        super().__init__()
        self.keep, self.num_prefix = keep, num_prefix

    def forward(self, x):
        pre, tok = x[:, :self.num_prefix], x[:, self.num_prefix:]
        tok = tok.gather(1, self.keep[..., None].expand(-1, -1, tok.shape[-1]))
        return torch.cat([pre, tok], dim=1), self.keep


# ------------------------------------------------------------------------------------------- against timm
@pytest.mark.parametrize('name', TINY)
@torch.no_grad()
def test_train_mode_matches_timm_with_the_same_draws(name):
    """Train mode, same seed: timm's and our logits agree on images and padded dicts (the same slots are dropped,
    patch_valid is gathered and masks attention and pooling); eval mode keeps every token, as timm."""
    ours, ref = pair(name, patch_drop_rate=P)
    padded, _ = make_batches(GRIDS)
    image = torch.randn(2, 3, 96, 160)
    full = ours(padded)
    ours.train(), ref.train()
    for x in (padded, image):
        for seed in (0, 1):
            out = seeded(ours, x, seed)
            assert maxdiff(out, seeded(ref, x, seed)) < TOL, (name, seed)
    assert maxdiff(seeded(ours, padded, 0), full) > 1e-3  # tokens were dropped
    ours.eval(), ref.eval()
    assert maxdiff(ours(padded), full) == 0 and maxdiff(ref(padded), full) < TOL


@torch.no_grad()
def test_padded_keeps_timms_slots_and_gathers_patch_valid():
    """The kept count is timm's max(1, int(N * (1 - p))) of the N slots (padding included), the indices timm's,
    and forward_features' patch_valid is the input's, gathered, as timm's forward_intermediates reports it."""
    ours, ref = pair('naflexvit_tiny_test_map', patch_drop_rate=P)
    ours.train(), ref.train()
    padded, _ = make_batches(GRIDS)
    b, n = padded['patch_valid'].shape
    keep = timm_keep(5, b, n)
    assert keep.shape == (b, max(1, int(n * (1 - P))))
    torch.manual_seed(5)
    feats = ours.forward_features(padded)
    assert torch.equal(feats['patch_valid'], padded['patch_valid'].gather(1, keep))
    assert feats['patches'].shape[1] == ours.num_prefix_tokens + keep.shape[1]
    torch.manual_seed(5)
    got = ours.forward_intermediates(padded, output_fmt='NLC', output_dict=True)
    torch.manual_seed(5)
    want = ref.forward_intermediates(padded, output_fmt='NLC', output_dict=True)
    assert torch.equal(got['patch_valid'], want['patch_valid'])
    for a, w in zip(got['image_intermediates'], want['image_intermediates']):
        v = got['patch_valid']
        assert maxdiff(a[v], w[v]) < TOL
    with pytest.raises(ValueError, match='output_dict'):
        ours.forward_intermediates(padded, output_fmt='NLC')
    with pytest.raises(ValueError, match='NCHW'):
        ours.forward_intermediates(torch.randn(1, 3, 64, 64))


@torch.no_grad()
def test_rate_zero_and_eval_change_nothing():
    """patch_drop_rate=0 in train mode, and any rate in eval mode, give the model without dropout, token for token;
    and no RNG is drawn for it."""
    base = naflex.create_model('naflexvit_tiny_test_map').train()
    zero = naflex.create_model('naflexvit_tiny_test_map', patch_drop_rate=0.0).train()
    some = naflex.create_model('naflexvit_tiny_test_map', patch_drop_rate=0.7).eval()
    zero.load_state_dict(base.state_dict())
    some.load_state_dict(base.state_dict())
    padded, packed = make_batches(GRIDS)
    for x in (padded, packed, torch.randn(2, 3, 64, 80)):
        state = torch.get_rng_state()
        assert torch.equal(zero(x), base(x)) and torch.equal(some(x), base(x))
        assert torch.equal(torch.get_rng_state(), state)
    assert 'keep_index' not in some.forward_features(packed)


def test_rate_is_validated():
    with pytest.raises(ValueError, match='patch_drop_rate'):
        naflex.create_model('naflexvit_tiny_test', patch_drop_rate=1.0)


# ------------------------------------------------------------------------------------------------- packed
@pytest.mark.parametrize('p', [0.1, 0.5, 0.9])
def test_drop_packed_counts_per_image(p):
    """Every image keeps int(len * (1 - p)) .. that + 2 tokens, at least one, at most len, only its own, in order;
    the total is a function of (T, B) alone; a new draw keeps other tokens."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        lens = torch.randint(1, 40, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g)
        cu = F.pad(lens.cumsum(0), (1, 0))
        seg = torch.repeat_interleave(torch.arange(len(lens)), lens)
        keep, kept = drop_packed(cu, seg, p)
        t, b = int(cu[-1]), len(lens)
        assert keep.shape[0] == packed_num_kept(t, b, p) == int(kept.sum())
        assert torch.equal(keep, keep.sort().values) and len(keep.unique()) == len(keep)
        assert torch.equal(torch.bincount(seg[keep], minlength=b), kept)
        lo = (lens * (1 - p)).long().clamp(min=1)
        assert ((kept >= lo) & (kept <= lo + 2) & (kept <= lens)).all(), (lens, kept)
        assert int(kept.max()) <= packed_max_kept(int(lens.max()), p)
    lens = torch.tensor([50, 60])
    cu, seg = F.pad(lens.cumsum(0), (1, 0)), torch.repeat_interleave(torch.arange(2), lens)
    assert not torch.equal(drop_packed(cu, seg, 0.5)[0], drop_packed(cu, seg, 0.5)[0])


@pytest.mark.parametrize('name', TINY)
@torch.no_grad()
def test_packed_equals_padded_and_timm_for_the_same_kept_tokens(name, monkeypatch):
    """A packed batch under patch dropout gives the logits of our and timm's padded dict dropping the same tokens:
    cu_seqlens, segment ids, max_seqlen, prefix tokens and pooling follow the kept tokens, per image."""
    ours, ref = pair(name, patch_drop_rate=P)
    padded, packed = make_batches(GRIDS)
    ours.train()
    torch.manual_seed(0)
    feats = ours.forward_features(packed)
    logits = ours.forward_head(feats)
    keep = feats['keep_index']
    lens = packed['seq_lens'].long()
    assert torch.equal(feats['seq_lens'], torch.bincount(torch.searchsorted(packed['cu_seqlens'][1:].long(), keep,
                                                                            right=True), minlength=len(lens)))
    assert torch.equal(feats['cu_seqlens'], F.pad((feats['seq_lens'] + ours.num_prefix_tokens).cumsum(0), (1, 0)))
    wide, keep_slots = same_kept_tokens(padded, packed, keep)
    monkeypatch.setattr(naflexvit, 'padded_keep_indices', lambda b, n, p, device: keep_slots)
    assert maxdiff(logits, ours(wide)) < TOL
    ref.patch_drop = FixedDrop(keep_slots, ref.num_prefix_tokens)
    assert maxdiff(logits, ref.train()(wide)) < TOL
    for backend in ('sdpa_dense', 'sdpa_padded', 'flex'):
        ours.train().set_attn_backend(backend)
        torch.manual_seed(0)
        assert maxdiff(ours(packed), logits) < TOL, backend


def test_gradients_flow_to_kept_tokens_only():
    """Backward through both layouts: every parameter gets a finite gradient, kept input patches a nonzero one,
    dropped patches exactly zero."""
    model = naflex.create_model('naflexvit_tiny_test_map', patch_drop_rate=P).train()
    padded, packed = make_batches(GRIDS[:3])
    packed['patches'].requires_grad_(True)
    feats = model.forward_features(packed)
    model.forward_head(feats).square().sum().backward()
    for name, prm in model.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all(), name
    touched = packed['patches'].grad.abs().sum(1) > 0
    kept = torch.zeros_like(touched)
    kept[feats['keep_index']] = True
    assert torch.equal(touched, kept) and 0 < int(kept.sum()) < len(kept)
    model.zero_grad()
    padded['patches'].requires_grad_(True)
    model(padded).square().sum().backward()
    assert all(torch.isfinite(prm.grad).all() for prm in model.parameters())
    assert (padded['patches'].grad[padded['patch_valid']].abs().sum(1) == 0).any()  # dropped valid patches


@pytest.mark.parametrize('pool', ['avg', 'map'])
def test_image_without_any_kept_patch_stays_finite(pool):
    """Without prefix tokens timm's draw over padded slots can drop all of a small image's patches; its key mask
    then keeps every key (timm's additive mask is finite there too), so no NaN reaches the loss or a gradient."""
    model = naflex.create_model('naflexvit_tiny_test_map', patch_drop_rate=0.9, reg_tokens=0,
                                global_pool=pool).train()
    padded, _ = make_batches([(1, 1), (12, 12)])
    b, n = padded['patch_valid'].shape
    seed = next(s for s in range(100) if not timm_keep(s, b, n, 0.9)[0].eq(0).any())  # image 0's patch dropped
    torch.manual_seed(seed)
    out = model(padded)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(prm.grad).all() for prm in model.parameters())


@torch.no_grad()
def test_packed_patch_drop_compiles_as_one_dynamic_graph():
    """No host sync: the kept count is a function of the shapes, so dynamo traces the training forward whole and
    one dynamic graph serves packs of other sizes."""
    from torch._dynamo.utils import counters
    model = naflex.create_model('naflexvit_tiny_test_map', patch_drop_rate=P).train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(make_batches([(3, 5), (4, 4), (2, 7)])[1])
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model.forward_features, fullgraph=True, dynamic=True, backend='aot_eager')
    for grids in ([(3, 5), (4, 4), (2, 7)], [(6, 5), (4, 4)], [(9, 9), (1, 3), (2, 2), (5, 5)]):
        _, packed = make_batches(grids)
        feats = compiled(packed)
        t, b = int(packed['cu_seqlens'][-1]), len(grids)
        assert feats['keep_index'].shape[0] == packed_num_kept(t, b, P)
        assert int(feats['cu_seqlens'][-1]) == packed_num_kept(t, b, P) + b * model.num_prefix_tokens
    assert counters['stats']['unique_graphs'] == 1
    torch._dynamo.reset()
