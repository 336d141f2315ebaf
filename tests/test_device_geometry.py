"""The device-side geometric RandAugment ops (augment.device_geometry) against the per-image CPU path, and free of
host syncs.

One ``affine`` call resamples a packed batch of images of different sizes, each with its own op (Rotate, ShearX/Y,
TranslateX/Y, absolute or relative), argument, filter (bilinear / bicubic) and fill colour, and an apply mask.
Every applied image must equal what augment.randaugment.OPS gives for it on the PIL image within ``TOLERANCE``
levels (0: the device code repeats Pillow's Geometry.c arithmetic), every other image must come out unchanged, and
the applied images must change. Images: generated ones (test_device_ops.generated_batch) always, caltech101 photos
when ``shared_data`` is present. The ops also equal timm's own (timm.data.auto_augment). On fake CUDA tensors the
op runs with no host sync, no host tensor and the same sequence of tensor ops for 3 images as for 9; on a GPU
(``-m cuda``) it gives the CPU's pixels without syncing.
"""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

from augment import device_geometry as G
from augment import device_ops as D
from augment.randaugment import LEVEL_TO_ARG, OPS, OpContext, op_translate
from fake_cuda import StepAudit, fake_cuda
from loaders.packing import pack
from test_device_ops import apply_mask, caltech_batch, generated_batch, generated_image, unpack

GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel', 'TranslateX', 'TranslateY')
TOLERANCE = 0  # levels, for every op and filter (see the module docstring of augment.device_geometry)
MODES = {'bilinear': InterpolationMode.BILINEAR, 'bicubic': InterpolationMode.BICUBIC}


def draw_arg(name, rng, img):
    """An argument as RandAugment draws it (any magnitude), or one of the values with Pillow special cases."""
    if name == 'Rotate' and rng.random() < 0.3:
        return rng.choice([0.0, -0.0, 90.0, 180.0, 270.0, -90.0, 360.0])
    if name.startswith('Shear') and rng.random() < 0.3:  # source positions exactly on the image's far edge
        return rng.choice([1.0, -1.0])
    if name in ('TranslateX', 'TranslateY'):  # absolute pixels (timm's non-relative translate), past the edge too
        side = img.shape[1] if name == 'TranslateX' else img.shape[0]
        return rng.choice([rng.uniform(-side, side), 2.5, -0.5, float(side + 3)])
    return LEVEL_TO_ARG[name](rng.uniform(0, 10), rng)


def cpu_op(name, img, arg, ctx):
    if name == 'TranslateX':
        return op_translate(img, arg, 0.0, ctx)
    if name == 'TranslateY':
        return op_translate(img, 0.0, arg, ctx)
    return OPS[name](img, arg, ctx)


def run_against_cpu(imgs, patch_size, seed, names=GEOMETRIC, filters=G.FILTERS):
    """One affine call for the batch (op, argument, filter and fill drawn per image); returns the largest difference
    from the CPU path over the applied images and how many of them changed. Images outside the mask are checked
    bit for bit."""
    rng = random.Random(seed)
    mask = apply_mask(len(imgs), rng)
    ops = [names[(i + seed) % len(names)] for i in range(len(imgs))]
    args = [draw_arg(n, rng, x) for n, x in zip(ops, imgs)]
    interps = [rng.choice(filters) for _ in imgs]
    fills = [tuple(rng.randrange(256) for _ in range(3)) for _ in imgs]
    matrices = [G.op_matrix(n, a, x.shape[1], x.shape[0]) if m else None
                for n, a, x, m in zip(ops, args, imgs, mask)]
    batch = pack(imgs, patch_size)
    out = G.affine(batch['patches'], D.PackedLayout.from_batch(batch), *G.stack_affine(matrices, interps, fills),
                   filters=filters)
    assert out.dtype == torch.uint8 and out.shape == batch['patches'].shape
    worst, changed = 0, 0
    for i, img in enumerate(imgs):
        got = unpack(out, batch, i)
        if not mask[i]:
            assert torch.equal(got, img), (i, 'an image outside the apply mask changed')
            continue
        ref = np.asarray(cpu_op(ops[i], Image.fromarray(img.numpy()), args[i], OpContext(fills[i], MODES[interps[i]])))
        diff = np.abs(got.numpy().astype(np.int32) - ref.astype(np.int32))
        assert diff.max() <= TOLERANCE, (ops[i], args[i], interps[i], tuple(img.shape), int(diff.max()))
        worst = max(worst, int(diff.max()))
        changed += int(not torch.equal(got, img))
    return worst, changed


# ------------------------------------------------------------------------------------------ equality with CPU
@pytest.mark.parametrize('patch_size', [16, 4, 2])
def test_ops_equal_cpu_path_on_generated_images(patch_size):
    """Mixed grids (one-token, one-row, one-column images) and every op in one batch, several draws."""
    changed = 0
    for seed in range(4):
        # 2-pixel patches (the 4-pixel images): nearly every tap lies in another token
        imgs = generated_batch(max(patch_size, 4), 9, seed=seed)
        _, n = run_against_cpu(imgs, patch_size, seed)
        changed += n
    assert changed > 0, 'the ops left every applied image unchanged'


@pytest.mark.parametrize('name', GEOMETRIC)
def test_each_op_equals_cpu_path(name):
    for seed in range(3):
        worst, changed = run_against_cpu(generated_batch(16, 6, seed=seed + 10), 16, seed, names=(name,))
        assert worst <= TOLERANCE and changed > 0, (name, seed)


@pytest.mark.shared_data
def test_ops_equal_cpu_path_on_photos(shared_data):
    imgs = caltech_batch(shared_data, num_images=8)
    for seed in range(2):
        worst, changed = run_against_cpu(imgs, 16, seed)
        assert worst <= TOLERANCE and changed > 0


def test_right_angles_equal_pillows_transposes():
    """Pillow rotates by 90/180/270 degrees with a transpose (square images for 90/270), not by resampling."""
    imgs = [torch.from_numpy(generated_image(h, w, 'photo', h)) for h, w in ((32, 32), (16, 48), (48, 32))]
    batch = pack(imgs, 16)
    layout = D.PackedLayout.from_batch(batch)
    for angle in (90.0, 180.0, 270.0, 0.0):
        params = G.stack_affine([G.rotate_matrix(angle, x.shape[1], x.shape[0]) for x in imgs], ['bicubic'] * 3,
                                [(5, 6, 7)] * 3)
        out = G.affine(batch['patches'], layout, *params)
        for i, img in enumerate(imgs):
            ref = Image.fromarray(img.numpy()).rotate(angle, Image.Resampling.BICUBIC, fillcolor=(5, 6, 7))
            assert torch.equal(unpack(out, batch, i), torch.from_numpy(np.array(ref))), (angle, i)


@pytest.mark.parametrize('filter_name', sorted(MODES))
def test_ops_equal_timms(filter_name):
    """timm 1.0.31's own op functions (timm.data.auto_augment, PIL): Rotate and Shear equal, and TranslateX/YRel
    with ``whole_pixels=False`` (timm resamples at the sub-pixel offset, where the CPU path shifts whole pixels)."""
    from timm.data import auto_augment as timm_aa
    imgs = generated_batch(4, 9, seed=4)
    rng = random.Random(2)
    resample = {'bilinear': Image.Resampling.BILINEAR, 'bicubic': Image.Resampling.BICUBIC}[filter_name]
    cases = [('Rotate', timm_aa.rotate), ('ShearX', timm_aa.shear_x), ('ShearY', timm_aa.shear_y),
             ('TranslateXRel', timm_aa.translate_x_rel), ('TranslateYRel', timm_aa.translate_y_rel)]
    ops = [cases[i % len(cases)] for i in range(len(imgs))]
    args = [LEVEL_TO_ARG[name](rng.uniform(1, 10), rng) for name, _ in ops]
    matrices = [G.op_matrix(name, a, x.shape[1], x.shape[0], whole_pixels=False)
                for (name, _), a, x in zip(ops, args, imgs)]
    assert any(m[2] % 1 or m[5] % 1 for m in matrices), 'the test needs sub-pixel shifts'
    batch = pack(imgs, 4)
    out = G.affine(batch['patches'], D.PackedLayout.from_batch(batch),
                   *G.stack_affine(matrices, [filter_name] * len(imgs), [(128, 128, 128)] * len(imgs)))
    for i, ((name, fn), img) in enumerate(zip(ops, imgs)):
        ref = fn(Image.fromarray(img.numpy()), args[i], fillcolor=(128, 128, 128), resample=resample)
        assert torch.equal(unpack(out, batch, i), torch.from_numpy(np.array(ref))), (name, args[i])


def test_bilinear_only_reads_four_taps_and_gives_the_same_pixels():
    imgs = generated_batch(4, 6, seed=2)
    worst, _ = run_against_cpu(imgs, 4, 5, filters=('bilinear',))
    assert worst == 0
    batch = pack(imgs, 4)
    layout = D.PackedLayout.from_batch(batch)
    params = G.stack_affine([G.rotate_matrix(17.0, x.shape[1], x.shape[0]) for x in imgs], ['bilinear'] * 6,
                            [(1, 2, 3)] * 6)
    both = G.affine(batch['patches'], layout, *params)
    assert torch.equal(G.affine(batch['patches'], layout, *params, filters=('bilinear',)), both)
    with StepAudit() as audit:
        G.affine(batch['patches'], layout, *params, filters=('bilinear',))
    with StepAudit() as audit_both:
        G.affine(batch['patches'], layout, *params)

    def taps(a):  # gathers from the pixels, not the per-token parameters
        return [c for c in a.ops('index_select') if c.args[0][0][0] == batch['patches'].numel() // 3]
    assert len(taps(audit)) == 4 and len(taps(audit_both)) == 16


def test_host_helpers_reject_what_they_cannot_do():
    with pytest.raises(ValueError, match='bilinear'):
        G.stack_affine([None], ['nearest'], [(0, 0, 0)])
    with pytest.raises(ValueError, match='not a geometric op'):
        G.op_matrix('Solarize', 128, 10, 10)
    with pytest.raises(ValueError, match='filters'):
        G.affine(torch.zeros(1, 48, dtype=torch.uint8), None, None, None, None, None, filters=('nearest',))
    assert G.translate_matrix(2.5, -0.5) == (1.0, 0.0, 2.0, 0.0, 1.0, -0.0)  # Python's round: half to even


# ------------------------------------------------------------------------------------------ no host sync (fake CUDA)
def _inputs(imgs, patch_size=4):
    rng = random.Random(1)
    mats = [G.op_matrix(GEOMETRIC[i % len(GEOMETRIC)], 0.2, x.shape[1], x.shape[0]) for i, x in enumerate(imgs)]
    mats[1] = None
    params = G.stack_affine(mats, [rng.choice(G.FILTERS) for _ in imgs], [(128, 128, 128)] * len(imgs))
    return pack(imgs, patch_size), list(params)


def _run(batch, params):
    return G.affine(batch['patches'], D.PackedLayout.from_batch(batch), *params)


def _audit(imgs):
    batch, params = _inputs(imgs)
    with fake_cuda() as mode:
        dev = {k: v.to('cuda') if torch.is_tensor(v) else v for k, v in batch.items()}
        params = [p.to('cuda') for p in params]
        mode.allow_non_fake_inputs = False  # a host tensor reached inside the step raises
        audit = StepAudit()
        with audit:
            out = _run(dev, params)
        return audit, out, batch['patches'].shape


def test_affine_has_no_host_sync_on_fake_cuda():
    audit, out, shape = _audit(generated_batch(4, 3))
    audit.assert_clean(allowed_syncs=0)
    assert not audit.syncs and not audit.h2d_copies, (audit.syncs, audit.h2d_copies)
    assert out.device.type == 'cuda' and out.shape == shape and out.dtype == torch.uint8
    audit_large, _, _ = _audit(generated_batch(4, 9, seed=1))
    assert [c.op for c in audit.calls] == [c.op for c in audit_large.calls], 'the ops depend on the batch size'
    assert audit.ops('index_select'), 'nothing was gathered'


@pytest.mark.cuda
def test_affine_on_cuda_equals_cpu_without_syncing():
    batch, params = _inputs(generated_batch(16) + generated_batch(16, seed=1), patch_size=16)
    expected = _run(batch, params)
    dev = {k: v.to('cuda') if torch.is_tensor(v) else v for k, v in batch.items()}
    dev_params = [p.to('cuda') for p in params]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        out = _run(dev, dev_params)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(out.cpu(), expected)
