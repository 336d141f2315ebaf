"""The device-side photometric ops (augment.device_ops) against the per-image CPU path, and free of host syncs.

Each op runs once on a packed batch of images of different sizes, with a per-image apply mask and per-image
parameters. Every applied image must equal what the CPU path gives for it (augment.randaugment.OPS and
augment.photometric on the PIL image) within ``TOLERANCE`` levels, which is 0 for every op: the device code repeats
Pillow's integer and float arithmetic step by step (see the module's docstring). Every other image must come out
unchanged, and at least one applied image must change (an op that does nothing fails). Images: generated ones
(smooth shading, shapes, noise, flat and two-level images, saturated colours) always, natural caltech101 photos when
``shared_data`` is present. On fake CUDA tensors (tests/fake_cuda.py) every op runs with no host sync, no host tensor,
no host-to-device copy, and the same sequence of tensor ops for a batch of 3 images as for one of 9. On a GPU
(``-m cuda``), each op gives the CPU's pixels without synchronising. The benchmark script runs on a tiny batch.
"""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from augment import device_ops as D
from augment.photometric import color_jitter, random_grayscale, sample_color_jitter
from augment.randaugment import OPS, OpContext
from fake_cuda import StepAudit, fake_cuda
from loaders import prefetch
from loaders.packing import pack
from repo_scripts import load_script

CTX = OpContext((128, 128, 128), InterpolationMode.BILINEAR)


def _enhance_factor(rng):  # RandAugment's range (0.1..1.9), jitter's (0..2), and the blend's special values
    return rng.choice([0.0, 0.1, 1.0, 1.9, 2.0, rng.uniform(0.0, 2.0), rng.uniform(0.1, 1.9), rng.uniform(0.5, 1.5)])


# name -> (device op, CPU reference on a PIL image, parameter draw or None, parameter dtype)
SPECS = {
    'brightness': (D.brightness, lambda im, a: OPS['Brightness'](im, a, CTX), _enhance_factor, torch.float64),
    'contrast': (D.contrast, lambda im, a: OPS['Contrast'](im, a, CTX), _enhance_factor, torch.float64),
    'saturation': (D.saturation, lambda im, a: OPS['Color'](im, a, CTX), _enhance_factor, torch.float64),
    'sharpness': (D.sharpness, lambda im, a: OPS['Sharpness'](im, a, CTX), _enhance_factor, torch.float64),
    'posterize': (D.posterize, lambda im, a: OPS['Posterize'](im, a, CTX), lambda r: r.randint(0, 8), torch.int64),
    'solarize': (D.solarize, lambda im, a: OPS['Solarize'](im, a, CTX),
                 lambda r: r.choice([0, 1, 128, 255, 256, r.randint(0, 256)]), torch.int64),
    'solarize_add': (D.solarize_add, lambda im, a: OPS['SolarizeAdd'](im, a, CTX), lambda r: r.randint(0, 110),
                     torch.int64),
    'invert': (D.invert, lambda im, a: OPS['Invert'](im, a, CTX), None, None),
    'equalize': (D.equalize, lambda im, a: OPS['Equalize'](im, a, CTX), None, None),
    'autocontrast': (D.autocontrast, lambda im, a: OPS['AutoContrast'](im, a, CTX), None, None),
    'grayscale': (D.grayscale, lambda im, a: random_grayscale(im, 1.0, random.Random(0)), None, None),
    'hue': (D.hue, lambda im, a: F.adjust_hue(im, a), lambda r: r.choice([-0.5, 0.5, r.uniform(-0.5, 0.5)]),
            torch.float64),
    'hflip': (D.hflip, lambda im, a: F.horizontal_flip(im), None, None),
    'vflip': (D.vflip, lambda im, a: F.vertical_flip(im), None, None),
}
# Levels an applied image may differ from the CPU path by, per op (all exact: see the module docstring).
TOLERANCE = {name: 0 for name in SPECS}
TOLERANCE['color_jitter'] = 0


# ------------------------------------------------------------------------------------------------------ images
def generated_image(h, w, kind, seed):
    """uint8 [h, w, 3]: 'photo' = shading + soft shapes + noise; 'flat'; 'two' levels; 'vivid' saturated colours
    with clipped highlights; 'dim' = a narrow range of levels."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if kind == 'flat':
        return np.full((h, w, 3), g.integers(0, 256, 3), dtype=np.uint8)
    if kind == 'two':
        return np.where(((xx + yy) % 3 == 0)[..., None], g.integers(0, 256, 3), g.integers(0, 256, 3)).astype(np.uint8)
    img = np.zeros((h, w, 3))
    img += g.uniform(0, 160, 3) + g.uniform(-1, 1, 3) * (xx[..., None] / max(w, 1) * 90)
    img += g.uniform(-1, 1, 3) * (yy[..., None] / max(h, 1) * 90)
    for _ in range(4):
        cy, cx, r = g.uniform(0, h), g.uniform(0, w), g.uniform(2, max(h, w) / 2 + 2)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * g.uniform(-120, 160, 3)
    img += g.normal(0, 6, img.shape)
    if kind == 'vivid':
        img = (img - img.mean()) * 2.5 + 128
    if kind == 'dim':
        img = 90 + (img - img.min()) / max(np.ptp(img), 1) * 25
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# (h, w) patch grids: a one-token image, one-row and one-column images, both aspects
GRIDS = {16: [(3, 5), (1, 1), (4, 3), (1, 6), (5, 1), (2, 2)], 4: [(4, 7), (1, 1), (9, 2), (1, 5), (3, 3), (6, 1)]}
KINDS = ['photo', 'vivid', 'photo', 'flat', 'dim', 'two', 'photo', 'vivid', 'photo']


def generated_batch(patch_size, num_images=6, seed=0):
    grids = (GRIDS[patch_size] * 2)[:num_images]
    return [torch.from_numpy(generated_image(h * patch_size, w * patch_size, KINDS[i], seed * 100 + i))
            for i, (h, w) in enumerate(grids)]


def caltech_batch(root, patch_size=16, num_images=5):
    """Natural photos (one per class, some grey JPEGs among them) cropped to whole patches at native size."""
    classes = sorted(p for p in (root / 'train').iterdir() if p.is_dir())
    out = []
    for cls in classes[::max(1, len(classes) // num_images)][:num_images]:
        with Image.open(sorted(cls.glob('*.jpg'))[0]) as im:
            arr = np.asarray(im.convert('RGB'))
        h, w = (min(s, 12 * patch_size) // patch_size * patch_size for s in arr.shape[:2])
        top, left = (arr.shape[0] - h) // 2, (arr.shape[1] - w) // 2
        out.append(torch.from_numpy(np.array(arr[top:top + h, left:left + w])))
    return out


def unpack(patches, batch, i):
    """Image i of a packed batch as uint8 [H, W, 3] (loaders.packing's P-P-C layout undone)."""
    P, (gh, gw) = batch['patch_size'], batch['grid_sizes'][i].tolist()
    cu = batch['cu_seqlens']
    tokens = patches[cu[i]:cu[i + 1]].view(gh, gw, P, P, 3)
    return tokens.permute(0, 2, 1, 3, 4).reshape(gh * P, gw * P, 3)


def apply_mask(n, rng):
    """At least one image applied (the first) and one left alone (the second)."""
    return [True, False] + [rng.random() < 0.7 for _ in range(n - 2)]


# ------------------------------------------------------------------------------------------ equality with CPU
def run_op_against_cpu(name, imgs, patch_size, seed=0):
    """Applies op ``name`` to the packed ``imgs``; returns the largest difference from the CPU path over the applied
    images and the number of applied images it changed. Images it must leave alone are checked bit for bit."""
    op, reference, draw, dtype = SPECS[name]
    rng = random.Random(seed)
    batch = pack(imgs, patch_size)
    apply = apply_mask(len(imgs), rng)
    params = [draw(rng) for _ in imgs] if draw is not None else None
    layout = D.PackedLayout.from_batch(batch)
    args = (batch['patches'], layout, torch.tensor(apply))
    out = op(*args, torch.tensor(params, dtype=dtype)) if params is not None else op(*args)
    assert out.dtype == torch.uint8 and out.shape == batch['patches'].shape
    worst, changed = 0, 0
    for i, img in enumerate(imgs):
        got = unpack(out, batch, i)
        if not apply[i]:
            assert torch.equal(got, img), (name, i, 'an image outside the apply mask changed')
            continue
        ref = np.asarray(reference(Image.fromarray(img.numpy()), params[i] if params else None))
        diff = np.abs(got.numpy().astype(np.int32) - ref.astype(np.int32))
        worst = max(worst, int(diff.max()))
        changed += int(not torch.equal(got, img))
    return worst, changed


@pytest.mark.parametrize('patch_size', [16, 4])
@pytest.mark.parametrize('name', sorted(SPECS))
def test_op_equals_cpu_path_on_generated_images(name, patch_size):
    for seed in range(2):
        worst, changed = run_op_against_cpu(name, generated_batch(patch_size, seed=seed), patch_size, seed)
        assert worst <= TOLERANCE[name], (name, patch_size, seed, worst)
        assert changed > 0, (name, 'the op left every applied image unchanged')


@pytest.mark.shared_data
@pytest.mark.parametrize('name', sorted(SPECS))
def test_op_equals_cpu_path_on_photos(name, shared_data):
    worst, changed = run_op_against_cpu(name, caltech_batch(shared_data), 16, seed=3)
    assert worst <= TOLERANCE[name], (name, worst)
    assert changed > 0, (name, 'the op left every applied image unchanged')


def test_sharpness_uses_the_neighbouring_tokens():
    """A 2-pixel patch grid: nearly every filtered pixel reads a neighbouring token, so a ring taken from the wrong
    token (or the token's own border) shows."""
    imgs = [torch.from_numpy(generated_image(2 * h, 2 * w, 'photo', 7 + h)) for h, w in ((6, 9), (3, 2), (5, 5))]
    worst, changed = run_op_against_cpu('sharpness', imgs, 2, seed=1)
    assert worst == 0 and changed > 0


@pytest.mark.parametrize('strength', [(0.4, 0.4, 0.4, 0.0), (0.4, 0.4, 0.4, 0.2), (0.0, 0.8, 0.0, 0.5)])
@pytest.mark.parametrize('photos', [False, pytest.param(True, marks=pytest.mark.shared_data)])
def test_color_jitter_equals_cpu_path(strength, photos, request):
    """The device gets the draws of augment.photometric.sample_color_jitter (the RNG stream color_jitter uses) and
    reproduces color_jitter per image, the per-image order included."""
    imgs = caltech_batch(request.getfixturevalue('shared_data')) if photos else generated_batch(16)
    batch = pack(imgs, 16)
    mask = apply_mask(len(imgs), random.Random(5))
    draws = [sample_color_jitter(strength, random.Random(i)) if m else None for i, m in enumerate(mask)]
    assert len({tuple(d[0]) for d in draws if d}) > 1, 'the test needs images with different orders'
    apply, order, factor, active = D.stack_color_jitter(draws)
    out = D.color_jitter(batch['patches'], D.PackedLayout.from_batch(batch), apply, order, factor, active,
                         with_hue=strength[3] > 0)
    changed = 0
    for i, img in enumerate(imgs):
        got = unpack(out, batch, i)
        if not mask[i]:
            assert torch.equal(got, img)
            continue
        ref = np.asarray(color_jitter(Image.fromarray(img.numpy()), strength, random.Random(i)))
        assert np.abs(got.numpy().astype(np.int32) - ref).max() <= TOLERANCE['color_jitter'], (i, draws[i])
        changed += int(not torch.equal(got, img))
    assert changed > 0


def test_normalize_is_the_prefetchers():
    """loaders.DevicePrefetcher normalises with this very function; values are (p / 255 - mean) / std."""
    assert prefetch.normalize_patches is D.normalize_patches
    p = torch.arange(256, dtype=torch.uint8).repeat(3).view(1, -1)[:, :768]
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    out = D.normalize_patches(p, mean, std)
    ref = (p.view(-1, 3).double() / 255 - mean.double()) / std.double()
    assert torch.allclose(out.view(-1, 3).double(), ref, atol=1e-5)


# ------------------------------------------------------------------------------------------ no host sync (fake CUDA)
def _device_call(name, imgs, patch_size=4):
    """Host inputs for op ``name``: (batch, params) with per-image tensors as the loader would send them."""
    n = len(imgs)
    batch = pack(imgs, patch_size)
    apply = torch.tensor(apply_mask(n, random.Random(0)))
    if name == 'color_jitter':
        draws = [sample_color_jitter((0.4, 0.4, 0.4, 0.1), random.Random(i)) for i in range(n)]
        return batch, list(D.stack_color_jitter(draws))
    if name == 'normalize':
        return batch, [torch.full((3,), 0.5), torch.full((3,), 0.5)]
    _, _, draw, dtype = SPECS[name]
    params = [torch.tensor([draw(random.Random(i)) for i in range(n)], dtype=dtype)] if draw else []
    return batch, [apply] + params


def _to(batch, params, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}, [p.to(device) for p in params]


def _run(name, batch, params):
    """Op ``name`` on a batch already on its device, the layout included (what a step runs)."""
    if name == 'normalize':
        return D.normalize_patches(batch['patches'], *params, torch.bfloat16)
    layout = D.PackedLayout.from_batch(batch)
    op = D.color_jitter if name == 'color_jitter' else SPECS[name][0]
    return op(batch['patches'], layout, *params)


def _audit_op(name, imgs):
    """Runs op ``name`` (and the layout it needs) on fake CUDA tensors; returns the audit and the output."""
    batch, params = _device_call(name, imgs)
    with fake_cuda() as mode:
        dev, params = _to(batch, params, 'cuda')
        mode.allow_non_fake_inputs = False  # a host tensor reached inside the step raises
        audit = StepAudit()
        with audit:
            out = _run(name, dev, params)
        return audit, out, batch['patches'].shape


@pytest.mark.parametrize('name', sorted(SPECS) + ['color_jitter', 'normalize'])
def test_op_has_no_host_sync_on_fake_cuda(name):
    small, large = generated_batch(4, 3), generated_batch(4, 9, seed=1)
    audit, out, shape = _audit_op(name, small)
    audit.assert_clean(allowed_syncs=0)
    assert not audit.syncs and not audit.h2d_copies, (audit.syncs, audit.h2d_copies)
    assert out.device.type == 'cuda' and out.shape == shape
    assert out.dtype == (torch.bfloat16 if name == 'normalize' else torch.uint8)
    audit_large, _, _ = _audit_op(name, large)
    assert [c.op for c in audit.calls] == [c.op for c in audit_large.calls], 'the ops depend on the batch size'
    assert audit.calls, 'nothing was recorded'


def test_the_audit_sees_a_host_sync():
    """The check above fails for an op that reads a device value on the host (what the ops must not do)."""
    imgs = generated_batch(4, 3)
    batch = pack(imgs, 4)
    with fake_cuda():
        dev = {k: v.to('cuda') if torch.is_tensor(v) else v for k, v in batch.items()}
        audit = StepAudit()
        with audit:
            layout = D.PackedLayout.from_batch(dev)
            int(layout.grid_B2[0, 0])
    assert audit.syncs


@pytest.mark.cuda
@pytest.mark.parametrize('name', sorted(SPECS) + ['color_jitter', 'normalize'])
def test_op_on_cuda_equals_cpu_without_syncing(name):
    """On a GPU: the same pixels as on the CPU (so as the PIL path), and no synchronisation (torch's sync debug
    mode raises on one)."""
    batch, params = _device_call(name, generated_batch(16) + generated_batch(16, seed=1), patch_size=16)
    expected = _run(name, batch, params)
    dev, dev_params = _to(batch, params, 'cuda')
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        out = _run(name, dev, dev_params)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(out.cpu(), expected)


# ------------------------------------------------------------------------------------------------- benchmark
def test_benchmark_script_runs_every_op(capsys):
    bench = load_script('scripts/bench/bench_device_ops.py')
    rows = bench.main(['--images', '3', '--tokens', '4', '--patch-size', '4', '--repeats', '1', '--device', 'cpu'])
    out = capsys.readouterr().out
    assert {r['op'] for r in rows} == set(bench.OPS) and all(r['ms'] > 0 for r in rows)
    for name in bench.OPS:
        assert name in out
