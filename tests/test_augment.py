"""Augmentations: RandAugment ops never raise, spec parsing, jitter/grayscale/erasing, MixUp/CutMix targets."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from augment import AugConfig, ImageAugment, MixupConfig, RandAugment, RandomErasing, mix_variable_size
from augment.photometric import color_jitter, sample_color_jitter
from augment.randaugment import (LEVEL_TO_ARG, OPS, OpContext, RAND_INCREASING_OPS, RAND_OPS, apply_op,
                                 parse_rand_augment)
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

ALL_OPS = sorted(OPS)
# magnitudes 0..10 by 0.5, plus what mstd noise with a large mmax can reach
LEVELS = [i / 2 for i in range(21)] + [13.7, 20, 30, 100]


def _imgs(h, w, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr), torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize('name', ALL_OPS)
def test_every_op_every_magnitude_never_raises(name):
    rng = random.Random(0)
    for h, w in ((1, 1), (2, 3), (1, 40), (33, 17)):
        pil, ten = _imgs(h, w)
        for interp in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC):
            ctx = OpContext((128, 128, 128), interp)
            for level in LEVELS:
                out = apply_op(name, pil, level, rng, ctx)
                assert isinstance(out, Image.Image) and out.size == (w, h) and out.mode == 'RGB'
                out_t = apply_op(name, ten, level, rng, ctx)
                assert out_t.shape == ten.shape and out_t.dtype == torch.uint8


def test_op_sets_are_timms():
    from timm.data import auto_augment as aa
    assert RAND_OPS == aa._RAND_TRANSFORMS and RAND_INCREASING_OPS == aa._RAND_INCREASING_TRANSFORMS
    for name in ALL_OPS:
        assert name in aa.LEVEL_TO_ARG


@pytest.mark.parametrize('name', [n for n in sorted(LEVEL_TO_ARG) if LEVEL_TO_ARG[n] is not None])
def test_magnitude_mapping_matches_timm(name):
    from timm.data import auto_augment as aa
    centre = 1.0 if name.endswith('Increasing') and not name.startswith(('Posterize', 'Solarize')) else 0.0
    for level in LEVELS[:21]:  # the random sign is drawn differently: compare distance from the neutral value
        ours = abs(LEVEL_TO_ARG[name](level, random.Random(1)) - centre)
        theirs = abs(aa.LEVEL_TO_ARG[name](level, {'translate_const': 100})[0] - centre)
        assert ours == pytest.approx(theirs), (name, level)


def test_posterize_zero_bits_and_solarize_256():
    pil, ten = _imgs(8, 8)
    ctx = OpContext((128,) * 3, InterpolationMode.BILINEAR)
    assert np.asarray(apply_op('PosterizeIncreasing', pil, 10, random.Random(0), ctx)).max() == 0
    assert apply_op('PosterizeIncreasing', ten, 10, random.Random(0), ctx).max() == 0
    assert np.array_equal(np.asarray(apply_op('Solarize', pil, 10, random.Random(0), ctx)), np.asarray(pil))
    assert torch.equal(apply_op('Solarize', ten, 10, random.Random(0), ctx), ten)


def test_pil_and_tensor_ops_agree_on_pointwise_ops():
    pil, ten = _imgs(16, 16)
    ctx = OpContext((128,) * 3, InterpolationMode.BILINEAR)
    for name in ('Invert', 'Posterize', 'Solarize', 'SolarizeAdd', 'Equalize', 'AutoContrast'):
        a = torch.from_numpy(np.array(apply_op(name, pil, 5, random.Random(0), ctx))).permute(2, 0, 1)
        b = apply_op(name, ten, 5, random.Random(0), ctx)
        assert (a.int() - b.int()).abs().max() <= 1, name


def test_parse_spec():
    s = parse_rand_augment('rand-m8-inc1-mstd1.0')
    assert s.magnitude == 8 and s.magnitude_std == 1.0 and s.num_layers == 2 and s.prob == 0.5
    assert s.ops == RAND_INCREASING_OPS
    s = parse_rand_augment('rand-m9-n3-mstd101-mmax20-p0.7-tweights')
    assert s.num_layers == 3 and s.magnitude_std == float('inf') and s.magnitude_max == 20 and s.prob == 0.7
    assert s.weights is not None and abs(sum(s.weights) - 1) < 1e-9
    with pytest.raises(ValueError):
        parse_rand_augment('rand-q3')
    with pytest.raises(ValueError):
        parse_rand_augment('augmix-m3')


def test_mstd_extremes_never_raise():
    rng = random.Random(0)
    pil, _ = _imgs(24, 40)
    for spec in ('rand-m8-inc1-mstd1.0', 'rand-m10-mstd100-mmax30', 'rand-m30-mmax30-inc1-n4-p1.0',
                 'rand-m0-mstd200', 'rand-m9-mstd0.5-inc1-t3a', 'rand-m9-mstd0.5-tweights', 'rand-m7-t3aw-n3'):
        ra = RandAugment(spec)
        for _ in range(60):
            out = ra(pil, rng)
            assert out.size == pil.size


def test_jitter_only_without_aa_and_grayscale():
    assert ImageAugment(AugConfig(aa='rand-m9', color_jitter=0.4)).jitter is None
    assert ImageAugment(AugConfig(aa=None, color_jitter=0.4)).jitter == (0.4, 0.4, 0.4, 0.0)
    aug = ImageAugment(AugConfig(hflip=0, color_jitter=0, grayscale_prob=1.0))
    pil, _ = _imgs(10, 12)
    out = np.asarray(aug(pil, random.Random(0)))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    flip = ImageAugment(AugConfig(hflip=1.0, color_jitter=0))
    assert np.array_equal(np.asarray(flip(pil, random.Random(0))), np.asarray(pil)[:, ::-1])


def test_vflip_flips_rows_after_hflip():
    pil, ten = _imgs(10, 12)
    arr = np.asarray(pil)
    vflip = ImageAugment(AugConfig(hflip=0, vflip=1.0, color_jitter=0))
    assert np.array_equal(np.asarray(vflip(pil, random.Random(0))), arr[::-1])
    assert torch.equal(vflip(ten, random.Random(0)), ten.flip(-2))  # uint8 CHW tensors too
    both = ImageAugment(AugConfig(hflip=1.0, vflip=1.0, color_jitter=0))
    assert np.array_equal(np.asarray(both(pil, random.Random(0))), arr[::-1, ::-1])
    never = ImageAugment(AugConfig(hflip=0, vflip=0.0, color_jitter=0))
    assert np.array_equal(np.asarray(never(pil, random.Random(0))), arr)
    half = ImageAugment(AugConfig(hflip=0, vflip=0.5, color_jitter=0))
    rng = random.Random(0)
    flipped = sum(np.array_equal(np.asarray(half(pil, rng)), arr[::-1]) for _ in range(400))
    assert 150 < flipped < 250


# Specs AugConfig.validate accepts, at their edges: every one must run on any image without raising.
EDGE_SPECS = ['rand-m0', 'rand-m30', 'rand-m10-mmax0', 'rand-n0', 'rand-n10', 'rand-p0', 'rand-p1.5', 'rand-mstd101',
              'rand-t3a', 'rand-tweights', 'rand-t3aw', 'rand-m9-n3-mstd0.5-inc1', 'rand', 'rand--m5', 'rand-inc7',
              'rand-m8-t3a-mstd200']


@pytest.mark.parametrize('interpolation', ['random', 'lanczos', 'nearest'])
def test_every_accepted_aa_spec_runs_on_any_image(interpolation):
    for spec in EDGE_SPECS:
        cfg = AugConfig(aa=spec, interpolation=interpolation, vflip=0.5, grayscale_prob=0.5)
        cfg.validate()
        aug, rng = ImageAugment(cfg), random.Random(0)
        for h, w in ((1, 1), (1, 7), (7, 1), (33, 5)):
            pil, _ = _imgs(h, w)
            for _ in range(10):
                out = aug(pil, rng)
                assert out.size == (w, h) and out.mode == 'RGB', spec


@pytest.mark.parametrize('spec', ['v0', 'original', 'augmix-m5', '3a', 'rand-m8x', 'rand-n-1', 'rand-tfoo',
                                  'rand-zz3', 'rand_m9', 'rand-mstd-1'])
def test_unsupported_aa_specs_are_rejected_by_the_config_check(spec):
    with pytest.raises(ValueError, match="supported: RandAugment specs"):
        AugConfig(aa=spec).validate()


@pytest.mark.parametrize('mode', ['const', 'rand', 'pixel'])
def test_random_erasing_uint8_patch_aligned(mode):
    img = torch.full((40, 32, 3), 7, dtype=torch.uint8)
    er = RandomErasing(1.0, mode, 3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    for seed in range(10):
        out = er(img.clone(), random.Random(seed), patch_size=8)
        changed = (out != 7).any(-1)
        assert out.dtype == torch.uint8 and 0 < changed.float().mean() < 1
        # whole patches only: every 8x8 patch is untouched or (almost surely) all changed
        per_patch = changed.view(5, 8, 4, 8).permute(0, 2, 1, 3).reshape(20, 64).float().mean(1)
        assert ((per_patch == 0) | (per_patch > 0.9)).all()
        if mode == 'const':
            assert (out[changed] == 128).all()
    assert torch.equal(RandomErasing(0.0)(img.clone(), random.Random(0), 8), img)


def _const_img(h, w, v):
    return torch.full((h, w, 3), v, dtype=torch.uint8)


@pytest.mark.parametrize('as_pil', [False, True])
@pytest.mark.parametrize('kind', ['cutmix', 'mixup'])
def test_mixup_targets_match_pixels(kind, as_pil):
    cfg = MixupConfig(num_classes=5, mixup_alpha=0.8 if kind == 'mixup' else 0,
                      cutmix_alpha=1.0 if kind == 'cutmix' else 0, smoothing=0.0)
    sizes = [(32, 48), (48, 32), (16, 64), (40, 40), (24, 24), (64, 16), (8, 8)]
    vals = [0, 200, 40, 120, 80, 160, 240]
    imgs = [_const_img(h, w, v) for (h, w), v in zip(sizes, vals)]
    targets = [0, 1, 2, 3, 4, 0, 1]
    for seed in range(20):
        inputs = [Image.fromarray(x.numpy()) for x in imgs] if as_pil else imgs
        out, soft, own, partner = mix_variable_size(inputs, targets, cfg, random.Random(seed), inplace=as_pil)
        if as_pil:
            out = [torch.from_numpy(np.array(x)) for x in out]
        torch.testing.assert_close(soft.sum(1), torch.ones(len(imgs)))
        assert sum(p is None for p in partner) == 1  # odd batch: one unmixed
        for i, j in enumerate(partner):
            x = out[i].float()[..., 0]
            if j is None:
                assert torch.equal(out[i], imgs[i])
                continue
            vi, vj = vals[i], vals[j]
            if kind == 'cutmix':
                frac_j = (x == vj).float().mean().item()
                tol = 1e-6
            else:  # pixel value = own*vi + other*vj on average over the image, up to uint8 quantisation
                frac_j = ((x.mean().item() - vi) / (vj - vi))  # (tensors round: 0.5 level; PIL truncates: 1)
                tol = (1.0 if as_pil else 0.5) / abs(vj - vi) + 1e-4
            assert frac_j == pytest.approx(1 - own[i], abs=tol), (seed, i)
            expected = torch.zeros(5)
            expected[targets[i]] += own[i]
            expected[targets[j]] += 1 - own[i]
            torch.testing.assert_close(soft[i], expected)


def test_mixup_local_shuffle_changes_pairs():
    cfg = MixupConfig(num_classes=2, cutmix_alpha=1.0, mixup_alpha=0)
    imgs = [_const_img(16, 16 + i, i) for i in range(16)]
    pairings = set()
    for seed in range(10):
        _, _, _, partner = mix_variable_size(imgs, [0] * 16, cfg, random.Random(seed))
        pairings.add(tuple(partner))
    assert len(pairings) > 1


def test_mixup_smoothing_and_prob_zero():
    cfg = MixupConfig(num_classes=4, prob=0.0, smoothing=0.1)
    imgs = [_const_img(8, 8, 1), _const_img(8, 8, 2)]
    out, soft, own, _ = mix_variable_size(imgs, [1, 3], cfg, random.Random(0))
    assert out[0] is imgs[0] and own == [1.0, 1.0]
    torch.testing.assert_close(soft[0], torch.tensor([0.025, 0.925, 0.025, 0.025]))


@pytest.mark.parametrize('dx,dy', [(7, 0), (-5, 0), (0, 9), (0, -3), (40, 0), (0, -33)])
def test_translate_matches_timm_for_whole_pixels(dx, dy):
    from augment.randaugment import op_translate
    pil, _ = _imgs(30, 40)
    ctx = OpContext((128, 128, 128), InterpolationMode.BILINEAR)
    ref = pil.transform(pil.size, Image.AFFINE, (1, 0, dx, 0, 1, dy), resample=Image.NEAREST, fillcolor=(128,) * 3)
    assert np.array_equal(np.asarray(op_translate(pil, dx, dy, ctx)), np.asarray(ref))


def test_mixup_off_epoch():
    cfg = MixupConfig(num_classes=3, off_epoch=2, smoothing=0.0)
    imgs = [_const_img(8, 8, 1), _const_img(8, 8, 2)]
    _, soft, own, _ = mix_variable_size(imgs, [0, 1], cfg, random.Random(0), epoch=2)
    assert own == [1.0, 1.0] and torch.equal(soft, torch.eye(3)[:2])
    _, _, own, _ = mix_variable_size(imgs, [0, 1], cfg, random.Random(0), epoch=1)
    assert own[0] < 1.0


def _photo(shared_data=None):
    """A real caltech101 photo when the shared data is there, else a smooth generated scene (edges + gradients)."""
    if shared_data is not None:
        path = sorted((shared_data / 'train').glob('*/*.jpg'))[0]
        return Image.open(path).convert('RGB')
    y, x = np.mgrid[0:120, 0:170]
    arr = np.stack([x * 1.5 % 256, y * 2 % 256, ((x // 20 + y // 20) % 2) * 200 + 30], -1).astype(np.uint8)
    return Image.fromarray(arr)


GEOMETRY_LEVELS = (1, 3, 5, 8, 10)


def _check_geometry_ops_match_timm(img):
    """Rotate and ShearX/Y equal timm's PIL ops pixel for pixel at every tested magnitude, sign and filter;
    the uint8-tensor versions agree with them up to resampling (mean |diff| < 1.5 grey levels, bilinear)."""
    from timm.data import auto_augment as aa
    fill = (128, 128, 128)
    tensor = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    timm_ops = {'ShearX': aa.shear_x, 'ShearY': aa.shear_y, 'Rotate': aa.rotate}
    for name, timm_op in timm_ops.items():
        for level in GEOMETRY_LEVELS:
            for sign in (1, -1):
                arg = sign * abs(LEVEL_TO_ARG[name](level, random.Random(0)))
                for interp, resample in ((InterpolationMode.BILINEAR, Image.BILINEAR),
                                         (InterpolationMode.BICUBIC, Image.BICUBIC)):
                    ref = np.asarray(timm_op(img, arg, fillcolor=fill, resample=resample))
                    ours = np.asarray(OPS[name](img, arg, OpContext(fill, interp)))
                    assert np.array_equal(ours, ref), (name, level, sign, interp)
                ours_t = OPS[name](tensor, arg, OpContext(fill, InterpolationMode.BILINEAR))
                ref = np.asarray(timm_op(img, arg, fillcolor=fill, resample=Image.BILINEAR)).astype(float)
                diff = np.abs(ours_t.permute(1, 2, 0).numpy().astype(float) - ref).mean()
                assert diff < 1.5, (name, level, sign, diff)


def test_geometry_ops_match_timm():
    _check_geometry_ops_match_timm(_photo())


def test_geometry_ops_match_timm_on_a_real_photo(shared_data):
    _check_geometry_ops_match_timm(_photo(shared_data))


def test_vflip_is_applied_after_hflip(demo_dataset):
    """--vflip p flips vertically with probability p, after the horizontal flip (timm's transform order), in the
    real train pipeline: with vflip 1 the sample is the vflip-0 sample upside down (same crop draws)."""
    from loaders.dataset import ImageFolderDataset
    from loaders.pipeline import TrainSampleBuilder
    from naflex.train.cli import build_parser, config_from_args
    p = build_parser()
    assert config_from_args(p.parse_args(['--vflip', '1']), p).aug.vflip == 1.0
    pil, _ = _imgs(10, 12)
    both = ImageAugment(AugConfig(hflip=1.0, vflip=1.0, color_jitter=0))(pil, random.Random(0))
    assert np.array_equal(np.asarray(both), np.asarray(pil)[::-1, ::-1])
    ds = ImageFolderDataset(demo_dataset, 'train')
    plain, flipped = (TrainSampleBuilder(AugConfig(hflip=0.0, vflip=v, color_jitter=0)) for v in (0.0, 1.0))
    for i in range(6):
        ref = plain(ds.path(i), 32, 8, random.Random(i))
        assert torch.equal(flipped(ds.path(i), 32, 8, random.Random(i)), ref.flip(0))


def test_rotate_shear_resampling_follows_timm():
    """timm's RandAugment gets the train interpolation: 'random' draws bilinear or bicubic per op; a fixed name is
    used as it is. AugConfig.ra_interpolation overrides it (e.g. 'bilinear', the cheaper filter)."""
    bl, bc = InterpolationMode.BILINEAR, InterpolationMode.BICUBIC
    ra = lambda **kw: ImageAugment(AugConfig(aa='rand-m9', **kw)).rand_augment.interps  # noqa: E731
    assert ra() == (bl, bc) and ra(interpolation='bicubic') == (bc,) and ra(interpolation='bilinear') == (bl,)
    assert ra(ra_interpolation='bilinear') == (bl,)


def test_color_jitter_split_keeps_its_stream():
    """color_jitter is now sample_color_jitter (the draws, which the device path reuses) + apply_color_jitter: same
    images and same RNG state afterwards as the code before the split, which drew each factor just before its
    adjustment."""
    def former(img, strength, rng):
        b, c, s, h = strength
        order = [0, 1, 2, 3]
        rng.shuffle(order)
        for i in order:
            if i == 0 and b > 0:
                img = TF.adjust_brightness(img, rng.uniform(max(0.0, 1 - b), 1 + b))
            elif i == 1 and c > 0:
                img = TF.adjust_contrast(img, rng.uniform(max(0.0, 1 - c), 1 + c))
            elif i == 2 and s > 0:
                img = TF.adjust_saturation(img, rng.uniform(max(0.0, 1 - s), 1 + s))
            elif i == 3 and h > 0:
                img = TF.adjust_hue(img, rng.uniform(-min(h, 0.5), min(h, 0.5)))
        return img

    img = _imgs(24, 16)[0]
    for seed in range(12):
        strength = (0.4, 0.0 if seed % 3 == 0 else 0.3, 0.4, 0.1 * (seed % 2))
        r1, r2 = random.Random(seed), random.Random(seed)
        assert np.array_equal(np.asarray(color_jitter(img, strength, r1)), np.asarray(former(img, strength, r2)))
        assert r1.getstate() == r2.getstate()
        order, factors = sample_color_jitter(strength, random.Random(seed))
        assert sorted(order) == [0, 1, 2, 3] and [f is not None for f in factors] == [v > 0 for v in strength]
