"""Device-side MixUp / CutMix and random erasing (augment.device_mix) against the CPU path, and free of host syncs.

MixUp / CutMix: the CPU path (augment.mixup.mix_variable_size on PIL images, as the loader runs it) mixes a batch of
images of different sizes; the test records what it drew (the pairing order, lambda, each CutMix box) through its
own ``random.Random`` and hands those draws to the device op. Pixels and soft targets must equal the CPU's exactly,
and an image without a partner (odd batch) must come out unchanged.
Random erasing: the CPU path (augment.erasing.RandomErasing) erases a stand-in image that records the rectangles it
writes; the device erases those rectangles. 'const' must equal the CPU's pixels; 'rand' and 'pixel' draw their
normal values from torch's generator on the device, so outside the rectangles the pixels are unchanged, every
erased token is the rectangles' union exactly, and the fill's distribution matches the CPU fill's.
On fake CUDA tensors (tests/fake_cuda.py) the ops run with no host sync, no host tensor and the same sequence of
tensor ops for 3 images as for 9; on a GPU (``-m cuda``) they give the CPU's pixels without syncing.
"""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from augment import device_mix as M
from augment import mixup
from augment.device_ops import PackedLayout
from augment.erasing import RandomErasing
from augment.mixup import MixupConfig, mix_variable_size, smooth_one_hot
from fake_cuda import StepAudit, fake_cuda
from loaders.packing import pack
from repo_scripts import load_script
from test_device_ops import caltech_batch, generated_image, unpack

NUM_CLASSES = 10
KINDS = ['photo', 'vivid', 'flat', 'dim', 'two', 'photo', 'vivid']


def sized_batch(P, n, seed):
    """``n`` images of random patch grids (both aspects, one-patch images), so overlaps are cut on both axes."""
    rng = random.Random(seed)
    grids = [(rng.randint(1, 6), rng.randint(1, 6)) for _ in range(n)]
    grids[0] = (1, 1)
    return [torch.from_numpy(generated_image(gh * P, gw * P, KINDS[i % len(KINDS)], seed * 50 + i))
            for i, (gh, gw) in enumerate(grids)]


# ------------------------------------------------------------------------------------------ MixUp / CutMix
class RecordingRandom(random.Random):
    """The CPU path's RNG, keeping lambda and every randint (the CutMix box positions, with their ranges)."""

    def __init__(self, seed):
        super().__init__(seed)
        self.ints, self.betas = [], []

    def randint(self, a, b):
        value = super().randint(a, b)
        self.ints.append((value, b))
        return value

    def betavariate(self, alpha, beta):
        value = super().betavariate(alpha, beta)
        self.betas.append(value)
        return value


def cpu_mix(imgs, targets, cfg, seed, monkeypatch):
    """mix_variable_size on PIL images; returns its output and its draws as augment.device_mix.stack_mix takes
    them: (partners, cutmix, lam, boxes)."""
    orders = []

    def recording_pair(sizes, rng, local_shuffle=4):
        orders.append(pair_by_aspect(sizes, rng, local_shuffle))
        return orders[-1]

    pair_by_aspect = mixup.pair_by_aspect
    monkeypatch.setattr(mixup, 'pair_by_aspect', recording_pair)
    rng = RecordingRandom(seed)
    pil = [Image.fromarray(x.numpy()) for x in imgs]
    out, soft, own, partners = mix_variable_size(pil, targets, cfg, rng)
    monkeypatch.undo()
    lam = min(1.0, max(0.0, rng.betas[0])) if rng.betas else 1.0
    cutmix = bool(rng.ints)
    boxes = [None] * len(imgs)
    if cutmix:  # per pair (a, b): randint for y then x of a, then of b; the range's end is overlap - box side
        (order,) = orders
        draws = iter(rng.ints)
        for a, b in zip(order[0::2], order[1::2]):
            oh = min(imgs[a].shape[0], imgs[b].shape[0])
            ow = min(imgs[a].shape[1], imgs[b].shape[1])
            for i in (a, b):
                (y, y_end), (x, x_end) = next(draws), next(draws)
                boxes[i] = (y, x, oh - y_end, ow - x_end)
    return [torch.from_numpy(np.array(o)) for o in out], soft, own, (partners, cutmix, lam, boxes)


def device_mix(imgs, targets, cfg, draws, P):
    batch = pack(imgs, P)
    layout = PackedLayout.from_batch(batch)
    params = M.stack_mix(*draws)
    out = M.mix(batch['patches'], layout, *params)
    base = smooth_one_hot(targets, cfg.num_classes, cfg.smoothing)
    return batch, out, M.mix_targets(base, layout, *params), M.own_fraction(layout, *params)


MODES = {'mixup': dict(mixup_alpha=0.8, cutmix_alpha=0.0), 'cutmix': dict(mixup_alpha=0.0, cutmix_alpha=1.0),
         'switch': dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)}


def assert_mix_equals_cpu(imgs, P, mode, seed, monkeypatch):
    cfg = MixupConfig(num_classes=NUM_CLASSES, smoothing=0.1, **MODES[mode])
    targets = [random.Random(seed).randrange(NUM_CLASSES) for _ in imgs]
    targets = [(t + i) % NUM_CLASSES for i, t in enumerate(targets)]
    ref, soft, own, draws = cpu_mix(imgs, targets, cfg, seed, monkeypatch)
    batch, out, soft_dev, own_dev = device_mix(imgs, targets, cfg, draws, P)
    changed = 0
    for i, img in enumerate(imgs):
        got = unpack(out, batch, i)
        assert torch.equal(got, ref[i]), (mode, seed, i, tuple(img.shape), draws[0][i], draws[3][i],
                                          int((got.int() - ref[i].int()).abs().max()))
        changed += int(not torch.equal(got, img))
    assert torch.equal(soft_dev, soft), (soft_dev - soft).abs().max()
    assert own_dev.tolist() == own
    return draws, changed


@pytest.mark.parametrize('mode', sorted(MODES))
@pytest.mark.parametrize('patch_size', [16, 4])
def test_mix_equals_cpu_path_on_generated_images(mode, patch_size, monkeypatch):
    changed, kinds = 0, set()
    for seed in range(6):
        n = 7 if seed % 2 else 8  # odd batches leave one image unmixed
        draws, c = assert_mix_equals_cpu(sized_batch(patch_size, n, seed), patch_size, mode, seed, monkeypatch)
        changed += c
        kinds.add(draws[1])
        if n % 2:
            assert draws[0].count(None) == 1
    assert changed > 0
    assert len(kinds) == (2 if mode == 'switch' else 1)


@pytest.mark.shared_data
@pytest.mark.parametrize('mode', ['mixup', 'cutmix'])
def test_mix_equals_cpu_path_on_photos(mode, shared_data, monkeypatch):
    _, changed = assert_mix_equals_cpu(caltech_batch(shared_data, num_images=7), 16, mode, 3, monkeypatch)
    assert changed > 0


@pytest.mark.parametrize('lam', [0.0, 1.0, 0.3])
def test_mixup_blend_ends_and_truncation(lam):
    """lam 0 copies the partner's overlap, lam 1 keeps the image; in between Pillow truncates: 0.3 * 255 + 0.7 * 0
    is 76.5 in float32 and becomes 76, not 77."""
    imgs = [torch.full((8, 12, 3), 255, dtype=torch.uint8), torch.zeros(4, 16, 3, dtype=torch.uint8)]
    batch = pack(imgs, 4)
    out = M.mix(batch['patches'], PackedLayout.from_batch(batch), *M.stack_mix([1, 0], False, lam, [None, None]))
    first = unpack(out, batch, 0)
    overlap = first[2:6, :]  # overlap 4 x 12: rows 2..5 of the first image, all its columns
    expected = {0.0: 0, 1.0: 255, 0.3: 76}[lam]
    assert bool((overlap == expected).all()) and bool((first[:2] == 255).all()) and bool((first[6:] == 255).all())
    second = unpack(out, batch, 1)
    assert bool((second[:, 2:14] == {0.0: 255, 1.0: 0, 0.3: 178}[lam]).all())  # 255 - 0.3 * 255 = 178.5
    assert bool((second[:, :2] == 0).all()) and bool((second[:, 14:] == 0).all())


# ------------------------------------------------------------------------------------------------ erasing
class RecordingImage:
    """Stands in for the uint8 image RandomErasing writes to: keeps each rectangle (top, left, height, width)."""

    def __init__(self, shape):
        self.shape = shape
        self.boxes = []

    def __setitem__(self, key, value):
        ys, xs = key
        self.boxes.append((ys.start, xs.start, ys.stop - ys.start, xs.stop - xs.start))


def cpu_erase(imgs, mode, max_count, P, seed):
    """(erased images, rectangles per image in patches) of the CPU path, the same draws for both."""
    eraser = RandomErasing(prob=0.8, mode=mode, max_count=max_count)
    out, boxes = [], []
    for i, img in enumerate(imgs):
        recorder = RecordingImage(tuple(img.shape))
        eraser(recorder, random.Random(seed * 100 + i), patch_size=P)
        boxes.append([(t // P, left // P, h // P, w // P) for t, left, h, w in recorder.boxes])
        out.append(eraser(img.clone(), random.Random(seed * 100 + i), patch_size=P))
    return out, boxes


def device_erase(imgs, boxes, mode, max_count, P, seed=0):
    batch = pack(imgs, P)
    gen = torch.Generator().manual_seed(seed)
    half = torch.full((3,), 0.5)
    out = M.erase(batch['patches'], PackedLayout.from_batch(batch), M.stack_erase_boxes(boxes, max_count), mode,
                  half, half, gen)
    return batch, out


def erased_mask(img, image_boxes, P):
    mask = torch.zeros(img.shape[:2], dtype=torch.bool)
    for t, left, h, w in image_boxes:
        mask[t * P:(t + h) * P, left * P:(left + w) * P] = True
    return mask


@pytest.mark.parametrize('mode', ['const', 'rand', 'pixel'])
@pytest.mark.parametrize('patch_size', [16, 4])
def test_erase_rectangles_equal_cpu_path(mode, patch_size):
    imgs = sized_batch(patch_size, 12, 7) + [torch.from_numpy(generated_image(8 * patch_size, 8 * patch_size,
                                                                            'photo', 1))] * 4
    ref, boxes = cpu_erase(imgs, mode, 3, patch_size, seed=1)
    assert sum(len(b) > 1 for b in boxes) > 0 and sum(not b for b in boxes) > 0, 'several rectangles, and none'
    batch, out = device_erase(imgs, boxes, mode, 3, patch_size)
    for i, img in enumerate(imgs):
        got, mask = unpack(out, batch, i), erased_mask(img, boxes[i], patch_size)
        assert torch.equal(got[~mask], img[~mask]), (i, 'a pixel outside the rectangles changed')
        if mode == 'const':
            assert torch.equal(got, ref[i]) and bool((got[mask] == 128).all())
        if mode == 'rand':  # each rectangle's visible part one colour (later rectangles cover earlier ones)
            shown = torch.zeros(img.shape[:2], dtype=torch.long) - 1
            for k, (t, left, h, w) in enumerate(boxes[i]):
                shown[t * patch_size:(t + h) * patch_size, left * patch_size:(left + w) * patch_size] = k
            for k in range(len(boxes[i])):
                colours = got[shown == k]
                assert len(colours) == 0 or bool((colours == colours[0]).all()), (i, k)


def test_erase_fill_distribution_matches_cpu():
    """'pixel': the per-pixel fill has the CPU fill's distribution (mean, spread, mass clipped at 0 and 255);
    'rand': one colour per rectangle, differing between rectangles and channels, centred on the mean colour."""
    P = 16
    imgs = [torch.zeros(8 * P, 8 * P, 3, dtype=torch.uint8)] * 16
    boxes = [[(0, 0, 8, 8)]] * 16
    batch, out = device_erase(imgs, boxes, 'pixel', 1, P)
    dev = out.double().view(-1)
    cpu = RandomErasing(mode='pixel')._fill((4096, 48, 3), torch.Generator().manual_seed(1)).double().reshape(-1)
    assert abs(dev.mean() - cpu.mean()) < 1.0 and abs(dev.std() - cpu.std()) < 1.0, (dev.mean(), cpu.mean())
    for level in (0, 255):
        assert abs(float((dev == level).double().mean() - (cpu == level).double().mean())) < 0.01
    boxes = [[(0, 0, 2, 2), (2, 2, 2, 2), (4, 4, 2, 2)]] * 16  # 48 rectangles x 3 channels
    batch, out = device_erase(imgs, boxes, 'rand', 3, P)
    colours = torch.stack([unpack(out, batch, i)[[0, 40, 70], [0, 40, 70]] for i in range(16)]).double()
    assert len(set(colours.view(-1).tolist())) > 30
    assert abs(float(colours.mean()) - 127.5) < 25  # 144 values of sd ~110
    _, again = device_erase(imgs, boxes, 'rand', 3, P, seed=0)
    _, other = device_erase(imgs, boxes, 'rand', 3, P, seed=1)
    assert torch.equal(again, out) and not torch.equal(other, out), 'the generator decides the fill'


def test_host_helpers_reject_bad_input():
    with pytest.raises(ValueError, match='max_count'):
        M.stack_erase_boxes([[(0, 0, 1, 1)] * 2], 1)
    batch = pack([torch.zeros(4, 4, 3, dtype=torch.uint8)], 4)
    with pytest.raises(ValueError, match='remode'):
        M.erase(batch['patches'], PackedLayout.from_batch(batch), torch.zeros(1, 1, 4, dtype=torch.int64), 'noise',
                torch.zeros(3), torch.ones(3))


# ------------------------------------------------------------------------------------------ no host sync (fake CUDA)
def _inputs(n):
    imgs = sized_batch(4, n, 3)
    partners = [i ^ 1 if (i ^ 1) < n else None for i in range(n)]
    boxes = [(0, 0, 2, 3)] * n
    base = smooth_one_hot([i % NUM_CLASSES for i in range(n)], NUM_CLASSES, 0.1)
    erase_boxes = M.stack_erase_boxes([[(0, 0, 1, 1), (0, 0, 1, 2)][:i % 3] for i in range(n)], 2)
    return pack(imgs, 4), [*M.stack_mix(partners, True, 0.6, boxes)], base, erase_boxes


def _run(name, batch, params, base, erase_boxes):
    layout = PackedLayout.from_batch(batch)
    x = batch['patches']
    if name == 'mix':
        return M.mix(x, layout, *params)
    if name == 'mix_targets':
        return M.mix_targets(base, layout, *params)
    half = torch.full((3,), 0.5, device=x.device)
    return M.erase(x, layout, erase_boxes, name.split('_')[1], half, half)


def _audit(name, n):
    batch, params, base, erase_boxes = _inputs(n)
    with fake_cuda() as mode:
        dev = {k: v.to('cuda') if torch.is_tensor(v) else v for k, v in batch.items()}
        params, base, erase_boxes = [p.to('cuda') for p in params], base.to('cuda'), erase_boxes.to('cuda')
        mode.allow_non_fake_inputs = False  # a host tensor reached inside the step raises
        audit = StepAudit()
        with audit:
            out = _run(name, dev, params, base, erase_boxes)
        return audit, out


OPS = ['mix', 'mix_targets', 'erase_pixel', 'erase_rand', 'erase_const']


@pytest.mark.parametrize('name', OPS)
def test_op_has_no_host_sync_on_fake_cuda(name):
    audit, out = _audit(name, 3)
    audit.assert_clean(allowed_syncs=0)
    assert not audit.syncs and not audit.h2d_copies, (audit.syncs, audit.h2d_copies)
    assert out.device.type == 'cuda'
    audit_large, _ = _audit(name, 9)
    assert [c.op for c in audit.calls] == [c.op for c in audit_large.calls], 'the ops depend on the batch size'


@pytest.mark.cuda
@pytest.mark.parametrize('name', ['mix', 'mix_targets', 'erase_const'])
def test_op_on_cuda_equals_cpu_without_syncing(name):
    batch, params, base, erase_boxes = _inputs(9)
    expected = _run(name, batch, params, base, erase_boxes)
    dev = {k: v.to('cuda') if torch.is_tensor(v) else v for k, v in batch.items()}
    dev_params = [p.to('cuda') for p in params]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        out = _run(name, dev, dev_params, base.to('cuda'), erase_boxes.to('cuda'))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(out.cpu(), expected)


# ------------------------------------------------------------------------------------------------- benchmark
def test_benchmark_script_runs_every_op(capsys):
    """scripts/bench/bench_device_geometry_mix.py (geometric ops, mixing, erasing) on a tiny batch, PIL rows too."""
    bench = load_script('scripts/bench/bench_device_geometry_mix.py')
    rows = bench.main(['--images', '4', '--tokens', '4', '--patch-size', '4', '--repeats', '1', '--device', 'cpu',
                       '--pil'])
    out = capsys.readouterr().out
    assert [r['op'] for r in rows] == list(bench.OPS) and all(r['ms'] > 0 for r in rows)
    assert all('pil_best_ms' in r for r in rows if r['op'] != 'mix_targets')
    for name in bench.OPS:
        assert name in out


@pytest.mark.cuda
@pytest.mark.parametrize('mode', ['pixel', 'rand'])
def test_random_erasing_on_cuda_without_syncing(mode):
    """The fill drawn from a CUDA generator: no synchronisation, the same rectangles as on the CPU, and the same
    pixels outside them."""
    batch, _, _, erase_boxes = _inputs(9)
    half = torch.full((3,), 0.5)
    layout = PackedLayout.from_batch(batch)
    on_cpu = M.erase(batch['patches'], layout, erase_boxes, mode, half, half, torch.Generator().manual_seed(0))
    dev = {k: v.to('cuda') if torch.is_tensor(v) else v for k, v in batch.items()}
    gen = torch.Generator(device='cuda').manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        out = M.erase(dev['patches'], PackedLayout.from_batch(dev), erase_boxes.to('cuda'), mode, half.to('cuda'),
                      half.to('cuda'), gen)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    kept = (on_cpu == batch['patches']).all(1)  # tokens outside every rectangle
    assert torch.equal(out.cpu()[kept], batch['patches'][kept]) and not bool(kept.all())
    assert not torch.equal(out.cpu()[~kept], batch['patches'][~kept])
