"""JAX / Flax ``.npz`` checkpoints (big_vision's SigLIP 2 NaFlex layout, the original ViT layout) against timm 1.0.31.

timm reads these into a NaFlexViT through ``model.load_pretrained`` (its vision_transformer ``_load_weights``). The
tests write .npz files in each layout (from a model's weights, or random arrays), load the same file into timm's
model and ours starting from the same initial weights, and compare every tensor: what timm loads, converted the
same way, and what it leaves alone. No real checkpoint is needed (none is small enough to ship).
"""
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import naflex
from naflex.model.big_vision import load_npz

from test_model import randomize_, timm_twin

SIGLIP = dict(depth=2, embed_dim=64, num_heads=4)


def _heads(w: torch.Tensor, num_heads: int) -> np.ndarray:
    """PyTorch [out, in] projection to Flax's [in, heads, head_dim] kernel."""
    return w.T.reshape(w.shape[1], num_heads, -1).numpy()


def big_vision_npz(model, path, prefix='params/img/'):
    """``model``'s weights as a big_vision SigLIP 2 NaFlex checkpoint: Dense patch kernel over (h, w, c) patches,
    an (H, W, C) position table, blocks stacked along a leading axis (scanned), a MAP head."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    d, h = model.embed_dim, model.blocks[0].attn.num_heads
    w = {'embedding/kernel': sd['embeds.proj.weight'].T, 'embedding/bias': sd['embeds.proj.bias'],
         'pos_embedding': sd['embeds.pos_embed'][0],
         'Transformer/encoder_norm/scale': sd['norm.weight'], 'Transformer/encoder_norm/bias': sd['norm.bias']}
    blocks = {}
    for i in range(len(model.blocks)):
        b, blk = f'blocks.{i}.', {}
        att = 'MultiHeadDotProductAttention_0/'
        q, k, v = sd[b + 'attn.qkv.weight'].chunk(3)
        qb, kb, vb = sd[b + 'attn.qkv.bias'].chunk(3)
        for name, kern, bias in (('query', q, qb), ('key', k, kb), ('value', v, vb)):
            blk[f'{att}{name}/kernel'] = _heads(kern, h)
            blk[f'{att}{name}/bias'] = bias.reshape(h, -1).numpy()
        blk[f'{att}out/kernel'] = sd[b + 'attn.proj.weight'].T.reshape(h, -1, d).numpy()
        blk[f'{att}out/bias'] = sd[b + 'attn.proj.bias']
        for ln, norm in (('LayerNorm_0', 'norm1'), ('LayerNorm_1', 'norm2')):
            blk[f'{ln}/scale'], blk[f'{ln}/bias'] = sd[f'{b}{norm}.weight'], sd[f'{b}{norm}.bias']
        for j in range(2):
            blk[f'MlpBlock_0/Dense_{j}/kernel'] = sd[f'{b}mlp.fc{j + 1}.weight'].T
            blk[f'MlpBlock_0/Dense_{j}/bias'] = sd[f'{b}mlp.fc{j + 1}.bias']
        for key, value in blk.items():
            blocks.setdefault(key, []).append(np.asarray(value))
    w.update({f'Transformer/encoderblock/{k}': np.stack(v) for k, v in blocks.items()})
    att = 'MAPHead_0/MultiHeadDotProductAttention_0/'
    kw, vw = sd['attn_pool.kv.weight'].chunk(2)
    kbias, vbias = sd['attn_pool.kv.bias'].chunk(2)
    w.update({'MAPHead_0/probe': sd['attn_pool.latent'], f'{att}query/kernel': _heads(sd['attn_pool.q.weight'], h),
              f'{att}query/bias': sd['attn_pool.q.bias'].reshape(h, -1), f'{att}key/kernel': _heads(kw, h),
              f'{att}key/bias': kbias.reshape(h, -1), f'{att}value/kernel': _heads(vw, h),
              f'{att}value/bias': vbias.reshape(h, -1),
              f'{att}out/kernel': sd['attn_pool.proj.weight'].T.reshape(h, -1, d),
              f'{att}out/bias': sd['attn_pool.proj.bias'],
              'MAPHead_0/LayerNorm_0/scale': sd['attn_pool.norm.weight'],
              'MAPHead_0/LayerNorm_0/bias': sd['attn_pool.norm.bias']})
    for j in range(2):
        w[f'MAPHead_0/MlpBlock_0/Dense_{j}/kernel'] = sd[f'attn_pool.mlp.fc{j + 1}.weight'].T
        w[f'MAPHead_0/MlpBlock_0/Dense_{j}/bias'] = sd[f'attn_pool.mlp.fc{j + 1}.bias']
    np.savez(path, **{prefix + k: np.asarray(v, dtype=np.float32) for k, v in w.items()})
    return path


def vit_npz(path, depth=2, d=64, heads=4, patch=8, grid=7, num_classes=1000, seed=0):
    """Random arrays in the original ViT release's layout: an HWIO patch convolution (``patch`` px, resampled by the
    loader), a class token, a flattened (1, 1 + grid^2, D) position table whose first row is the class token's, one
    key group per block (``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3``), a classifier."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    w = {'embedding/kernel': r(patch, patch, 3, d), 'embedding/bias': r(d), 'cls': r(1, 1, d),
         'Transformer/posembed_input/pos_embedding': r(1, 1 + grid * grid, d),
         'Transformer/encoder_norm/scale': 1 + r(d), 'Transformer/encoder_norm/bias': r(d),
         'head/kernel': r(d, num_classes), 'head/bias': r(num_classes)}
    for i in range(depth):
        b = f'Transformer/encoderblock_{i}/'
        for n in ('query', 'key', 'value'):
            w[f'{b}MultiHeadDotProductAttention_1/{n}/kernel'] = r(d, heads, d // heads)
            w[f'{b}MultiHeadDotProductAttention_1/{n}/bias'] = r(heads, d // heads)
        w[f'{b}MultiHeadDotProductAttention_1/out/kernel'] = r(heads, d // heads, d)
        w[f'{b}MultiHeadDotProductAttention_1/out/bias'] = r(d)
        for ln in ('LayerNorm_0', 'LayerNorm_2'):
            w[f'{b}{ln}/scale'], w[f'{b}{ln}/bias'] = 1 + r(d), r(d)
        w[f'{b}MlpBlock_3/Dense_0/kernel'], w[f'{b}MlpBlock_3/Dense_0/bias'] = r(d, 4 * d), r(4 * d)
        w[f'{b}MlpBlock_3/Dense_1/kernel'], w[f'{b}MlpBlock_3/Dense_1/bias'] = r(4 * d, d), r(d)
    np.savez(path, **w)
    return path


def _same_start(name, **kwargs):
    """(ours, timm) with the same initial weights, so what a loader leaves alone compares too."""
    ref = randomize_(timm_twin(name, **kwargs)).eval()
    ours = naflex.create_model(name, **kwargs).eval()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _assert_same_state(ours, ref, atol=1e-6):
    theirs = ref.state_dict()
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, theirs[k], atol=atol, rtol=0, msg=k)


def test_big_vision_siglip2_npz_loads_as_timm(tmp_path):
    """SigLIP 2 NaFlex layout (prefix params/img/, scanned blocks, MAP head) into the SigLIP variant: every tensor
    equals timm's after the same file, through model.load_pretrained, timm's load_checkpoint and create_model."""
    source = randomize_(timm.create_model('naflexvit_base_patch16_siglip', **SIGLIP), seed=1)
    path = big_vision_npz(source, tmp_path / 'siglip2.npz')
    ours, ref = _same_start('naflexvit_base_patch16_siglip', **SIGLIP)
    ref.load_pretrained(str(path))
    ours.load_pretrained(str(path))
    _assert_same_state(ours, ref)
    _assert_same_state(ours, source)  # and the round trip is exact: everything in this layout is loaded
    again, _ = _same_start('naflexvit_base_patch16_siglip', **SIGLIP)
    timm.models.load_checkpoint(again, str(path))  # timm's loader hands .npz files to load_pretrained
    _assert_same_state(again, ref)
    for kwargs in (dict(pretrained=str(path)), dict(checkpoint_path=str(path)),
                   dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path), custom_load=True))):
        built = naflex.create_model('naflexvit_base_patch16_siglip', **SIGLIP, **kwargs)
        _assert_same_state(built, ref)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


def test_original_vit_npz_loads_as_timm(tmp_path):
    """Original ViT layout: per-block keys, HWIO 8x8 patch kernel resampled to 16x16, a 7x7 table with the class
    token's row in front (added to the class token; the table resized), a classifier; registers and layer scale
    stay as they were, as in timm."""
    path = vit_npz(tmp_path / 'vit.npz')
    ours, ref = _same_start('naflexvit_tiny_test_token')
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    ref.load_pretrained(str(path))
    left = load_npz(ours, path)
    _assert_same_state(ours, ref, atol=1e-5)
    assert set(left) == {'embeds.reg_token', 'blocks.0.ls1.gamma', 'blocks.0.ls2.gamma', 'blocks.1.ls1.gamma',
                         'blocks.1.ls2.gamma'}
    assert all(torch.equal(ours.state_dict()[k], start[k]) for k in left)
    other = naflex.create_model('naflexvit_tiny_test_token', num_classes=10, checkpoint_path=str(path))
    assert other.head.out_features == 10  # another class count: the classifier is left alone, as in timm


def test_npz_errors_are_one_line(tmp_path):
    model = naflex.create_model('naflexvit_tiny_test_token')
    np.savez(tmp_path / 'other.npz', foo=np.zeros(3))
    with pytest.raises(ValueError, match='holds no ViT patch embedding'):
        load_npz(model, tmp_path / 'other.npz')
    (tmp_path / 'broken.npz').write_bytes(b'not a zip')
    with pytest.raises(ValueError, match="could not read .*broken.npz' as a JAX/Flax .npz checkpoint"):
        load_npz(model, tmp_path / 'broken.npz')
    with pytest.raises(FileNotFoundError, match='weights file not found'):
        load_npz(model, tmp_path / 'missing.npz')
    vit = vit_npz(tmp_path / 'vit.npz', d=32, heads=2)
    with pytest.raises(ValueError, match=r"vit.npz' does not fit the model: \['embeds.proj.weight: file \(32, 768\) "
                                         r"vs model \(64, 768\)', .*\(\+26 more\)$"):
        load_npz(model, vit)


def test_validate_and_train_read_npz_checkpoints(tmp_path, demo_dataset, capsys):
    """validate.py --checkpoint X.npz scores the model it loads into (the classifier must fit the dataset's
    classes); train.py --initial-checkpoint X.npz starts from it."""
    import train
    import validate
    from naflex.model.big_vision import read_npz_state_dict

    path = str(vit_npz(tmp_path / 'vit.npz', num_classes=4))
    common = ['--data-dir', str(demo_dataset), '-j', '0', '--naflex-max-seq-len', '36']
    rows = validate.main([*common, '--model', 'naflexvit_tiny_test_token', '--checkpoint', path])
    model = naflex.create_model('naflexvit_tiny_test_token', num_classes=4, checkpoint_path=path)
    save_file(model.state_dict(), str(tmp_path / 'same.safetensors'))
    same = validate.main([*common, '--model', 'naflexvit_tiny_test_token', '--checkpoint',
                          str(tmp_path / 'same.safetensors')])
    assert rows[0]['checkpoint'] == path and rows[0]['top1'] == same[0]['top1']
    assert rows[0]['loss'] == pytest.approx(same[0]['loss'], abs=1e-3)  # registers differ by their 1e-6 init
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a 1000-class .npz for a 4-class dataset: no classifier to score with
        validate.main([*common, '--model', 'naflexvit_tiny_test_token', '--checkpoint',
                       str(vit_npz(tmp_path / 'vit1000.npz'))])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith('vit1000.npz holds no 4-class classifier (a .npz classifier loads only '
                                             'when its class count is the model\'s; pass --num-classes N)'), err

    train.main(['--data-dir', str(demo_dataset), '--model', 'naflexvit_tiny_test_token', '--initial-checkpoint', path,
                '--device', 'cpu', '-b', '8', '--epochs', '1', '--warmup-epochs', '0', '--lr', '1e-12',
                '--weight-decay', '0', '--opt', 'adamw', '--naflex-train-seq-lens', '32', '--val-split', '', '-j', '0',
                '--output', str(tmp_path), '--experiment', 'npz'])
    trained = torch.load(tmp_path / 'npz' / 'last.pth', map_location='cpu', weights_only=True)['state_dict']
    for k, v in read_npz_state_dict(path, model).items():
        torch.testing.assert_close(trained[k], v, atol=1e-6, rtol=0, msg=k)
