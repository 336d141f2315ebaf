"""The C-RADIO backbones (RADIO, arXiv:2412.07679; C-RADIOv4, arXiv:2601.17237) against timm 1.0.31.

timm registers six of them (``naflexvit_{base,large,huge,giant}_patch16_radio_v3``,
``naflexvit_{so400m,huge}_patch16_radio_v4``) with ``.c_radio`` weights: a class token pooled by
``global_pool='token'``, registers, no final norm, a non-integer MLP ratio (v4 so400m), and a 128x128 position
table resized bilinearly without anti-aliasing to a square of the larger grid side, with ``align_corners`` per
checkpoint. Checked here: each architecture sized down equals timm's in every input layout; each at full size has
timm's parameters (meta device) and settings; the base one at full size gives timm's logits; each tag loads by name
from a Hugging Face cache (offline, weights made from timm's model), as timm loads it; NVIDIA's own key layout loads
as timm's ``checkpoint_filter_fn`` converts it; the packed forward compiles as one graph.
"""
import json

import pytest
import timm
import torch
from safetensors.torch import save_file

import naflex
from naflex.model.weights import read_state_dict

from test_hub import fill_hub_cache, run_offline
from test_model import assert_batches_match, assert_images_match, make_batches, maxdiff, randomize_
from test_model_full import _pair as full_size_pair

RADIO = ['naflexvit_base_patch16_radio_v3', 'naflexvit_large_patch16_radio_v3', 'naflexvit_huge_patch16_radio_v3',
         'naflexvit_giant_patch16_radio_v3', 'naflexvit_so400m_patch16_radio_v4', 'naflexvit_huge_patch16_radio_v4']
SMALL = dict(depth=2, embed_dim=64, num_heads=4)
# within the 128x128 table, one square, one wider than tall, one taller, one single patch
GRIDS = [(18, 4), (5, 7), (3, 20), (32, 32), (1, 1)]
IMAGES = [(2, 3, 64, 96), (1, 3, 512, 512), (1, 3, 16, 16)]


def small_pair(name, seed=0, **kwargs):
    """(ours, timm) sized down, sharing random weights, eval mode."""
    kwargs = {**SMALL, **kwargs}
    ref = randomize_(timm.create_model(name, **kwargs), seed).eval()
    ours = naflex.create_model(name, **kwargs).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def test_names_tags_and_pretrained_cfgs_equal_timms():
    """Every NaFlexViT architecture and tag of timm 1.0.31 is registered, each tag's pretrained_cfg equal to timm's
    (C-RADIO: CLIP mean / std, 512 px, no classifier, NVIDIA's licence)."""
    assert naflex.list_models('*radio*') == sorted(RADIO) == timm.list_models('naflexvit*radio*')
    assert set(timm.list_models('naflexvit*')) <= set(naflex.list_models())
    assert naflex.list_models(pretrained=True) == timm.list_pretrained('naflexvit*')
    for name in timm.list_pretrained('naflexvit*'):
        with torch.device('meta'):
            ours = naflex.create_model(name)
        theirs = timm.models.get_pretrained_cfg(name).to_dict()
        assert list(ours.pretrained_cfg.items()) == list(theirs.items()), name


@pytest.mark.parametrize('name', RADIO)
def test_full_size_structure_and_settings_equal_timms(name):
    with torch.device('meta'):
        ref = timm.create_model(name)
        ours = naflex.create_model(name)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    e, te = ours.embeds, ref.embeds
    assert tuple(e.pos_embed.shape[1:3]) == (128, 128)
    assert (e.pos_embed_interp_mode, e.pos_embed_antialias, e.pos_embed_ar_preserving, e.pos_embed_align_corners) == (
        te.pos_embed_interp_mode, te.pos_embed_antialias, te.pos_embed_ar_preserving, te.pos_embed_align_corners)
    assert (ours.global_pool, ours.num_prefix_tokens, ours.num_classes) == (
        ref.global_pool, ref.num_prefix_tokens, ref.num_classes)
    assert isinstance(ours.norm, torch.nn.Identity) and isinstance(ref.norm, torch.nn.Identity)  # final_norm=False
    assert ours.blocks[0].mlp.fc1.out_features == ref.blocks[0].mlp.fc1.out_features  # 4304 for so400m


@pytest.mark.parametrize('name', RADIO)
@torch.no_grad()
def test_small_radio_equals_timm_in_every_layout(name):
    """Logits and forward_features to 1e-4 on images (one at the 512 px default), timm's padded dict and packed."""
    ours, ref = small_pair(name, num_classes=10)
    assert_images_match(ours, ref, IMAGES)
    assert_batches_match(ours, ref, GRIDS)
    x = torch.randn(1, 3, 128, 64)
    assert maxdiff(ours.forward_features(x), ref.forward_features(x)) < 1e-4
    padded, packed = make_batches(GRIDS)
    valid = padded['patch_valid']
    theirs = ref.forward_features(padded['patches'], padded['patch_coord'], valid)
    theirs = (theirs['patches'] if isinstance(theirs, dict) else theirs)[:, ours.num_prefix_tokens:][valid]
    mine = ours.forward_features(packed)
    assert maxdiff(mine['tokens'][mine['patch_pos']], theirs) < 1e-4


@pytest.mark.slow
@torch.no_grad()
def test_full_size_base_logits_equal_timm():
    ours, ref = full_size_pair('naflexvit_base_patch16_radio_v3', num_classes=10)
    assert_images_match(ours, ref, [(1, 3, 64, 96)])
    assert_batches_match(ours, ref, [(5, 7), (3, 9)], check_padded=False)


def test_packed_radio_compiles_as_one_graph():
    model = naflex.create_model('naflexvit_so400m_patch16_radio_v4', depth=1, embed_dim=32, num_heads=2).eval()
    _, packed = make_batches([(5, 7), (3, 9)])
    explained = torch._dynamo.explain(model)(packed)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def nvidia_layout(state: dict) -> dict:
    """Our (= timm's) RADIO weights in NVIDIA's own layout: a bias-free (C, p, p) patch projection, a flattened
    position table, class and register tokens as one per-teacher summary table, 'grandma' layer scales, plus
    tensors a converter must drop (input conditioner, adaptor heads)."""
    w = state['embeds.proj.weight']
    d, p = w.shape[0], int((w.shape[1] // 3) ** 0.5)
    gen = 'radio_model.model.patch_generator.'
    out = {gen + 'embedder.weight': w.reshape(d, p, p, 3).permute(0, 3, 1, 2).reshape(d, -1),
           gen + 'pos_embed': state['embeds.pos_embed'].reshape(1, -1, d),
           gen + 'cls_token.token': torch.cat([state['embeds.cls_token'][0], state['embeds.reg_token'][0]]),
           'radio_model.input_conditioner.norm_mean': torch.zeros(3, 1, 1),
           'radio_model.adaptors.clip.head.weight': torch.zeros(4, d)}
    out.update({f'radio_model.model.{k.replace(".gamma", ".grandma")}': v for k, v in state.items()
                if k.startswith('blocks.')})
    return {k: v.contiguous() for k, v in out.items()}


def test_nvidia_layout_loads_as_timms_filter_converts_it(tmp_path):
    _, ref = small_pair('naflexvit_base_patch16_radio_v3')  # v3-B has layer scale: 'grandma' keys
    with torch.no_grad():
        ref.embeds.proj.bias.zero_()  # NVIDIA's projection has no bias
    nvidia = nvidia_layout(ref.state_dict())
    converted = timm.models.naflexvit.checkpoint_filter_fn(dict(nvidia), ref)
    save_file(nvidia, str(tmp_path / 'model.safetensors'))
    ours = read_state_dict(tmp_path / 'model.safetensors')
    assert ours.keys() == converted.keys()
    for k, v in converted.items():
        assert torch.equal(ours[k], v), k
    model = naflex.create_model('naflexvit_base_patch16_radio_v3', pretrained=str(tmp_path / 'model.safetensors'),
                                **SMALL).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert maxdiff(model(x), ref(x)) < 1e-4
    # a classifier on the backbone: the weights have none, so it keeps its fresh initialization (as timm)
    head = naflex.create_model('naflexvit_base_patch16_radio_v3', pretrained=str(tmp_path / 'model.safetensors'),
                               num_classes=5, **SMALL)
    assert head.head.out_features == 5 and torch.equal(head.embeds.pos_embed, model.embeds.pos_embed)


# Offline in one interpreter: each tag by name (ours and timm's loaders reading the same cache), then train.py with
# timm's hf-hub: name of one of them (a backbone: the classifier for the dataset's 4 classes starts fresh).
HUB_SCENARIO = '''
    import naflex, timm, torch, train
    plan = json.loads(sys.argv[1])
    out = {}
    for name in plan['names']:
        ours = naflex.create_model(name, pretrained=True, **plan['small']).eval()
        ref = timm.create_model(name, pretrained=True, **plan['small']).eval()
        x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (ours(x) - ref(x)).abs().max().item()
        same = all(torch.equal(ours.state_dict()[k], v) for k, v in ref.state_dict().items())
        out[name] = [diff, same, ours.pretrained_cfg['hf_hub_id'], list(naflex.data_config(ours)['mean'])]
    with contextlib.redirect_stderr(io.StringIO()):
        train.main(plan['train'])
    print(json.dumps(out))
'''


@pytest.mark.slow
def test_each_tag_loads_by_name_from_the_hub_cache(tmp_path, demo_dataset):
    cache = tmp_path / 'hf_cache'
    published = {}
    for i, name in enumerate(RADIO):
        _, ref = small_pair(name, seed=i)
        state = published[name] = ref.state_dict()
        if name == 'naflexvit_huge_patch16_radio_v4':  # one repository in NVIDIA's layout: both convert it
            with torch.no_grad():
                ref.embeds.proj.bias.zero_()
            state = nvidia_layout(ref.state_dict())
        fill_hub_cache(cache, f'timm/{name}.c_radio', state)
    hub_name = 'hf-hub:timm/naflexvit_base_patch16_radio_v3.c_radio'
    train_args = ['--data-dir', str(demo_dataset), '-j', '0', '--model', hub_name, '--pretrained', '--model-kwargs',
                  *[f'{k}={v}' for k, v in SMALL.items()], '--device', 'cpu', '-b', '8', '--epochs', '1',
                  '--warmup-epochs', '0', '--lr', '1e-12', '--weight-decay', '0', '--opt', 'adamw',
                  '--naflex-train-seq-lens', '32', '--val-split', '', '--output', str(tmp_path), '--experiment', 'r']
    plan = dict(names=[f'{n}.c_radio' for n in RADIO], small=SMALL, train=train_args)
    run = run_offline(cache, HUB_SCENARIO, json.dumps(plan))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for name in RADIO:
        diff, same, repo, mean = results[f'{name}.c_radio']
        assert same and diff < 1e-4, name
        assert repo == f'timm/{name}.c_radio' and mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert 'loaded weights from hf-hub:timm/naflexvit_base_patch16_radio_v3.c_radio' in run.stdout
    trained = torch.load(tmp_path / 'r' / 'last.pth', map_location='cpu', weights_only=True)['state_dict']
    assert trained['head.weight'].shape == (4, 64)  # a fresh classifier on the backbone
    for k, v in published['naflexvit_base_patch16_radio_v3'].items():
        torch.testing.assert_close(trained[k], v, atol=1e-6, rtol=0, msg=k)


def test_training_step_on_fake_cuda_makes_no_host_sync(monkeypatch):
    """The gathered position taps (F.embedding_bag) on the training path of a GPU: varlen attention, bf16, every
    tensor on the device, no host sync (fake CUDA tensors, see tests/fake_cuda.py)."""
    from test_fake_cuda import check_varlen_contract, fake_step
    r = fake_step('naflexvit_base_patch16_radio_v3', 'auto', 'bf16', monkeypatch, **SMALL)
    r['audit'].assert_clean()
    assert r['audit'].ops('embedding_bag')
    check_varlen_contract(r['audit'], r['batches'], torch.bfloat16, r['model'].num_prefix_tokens)
