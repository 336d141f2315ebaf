"""``--device-aug``: the worker side (loaders.device_worker) draws with the CPU path's code and streams, the device side
(loaders.device_step) turns bytes + draws into the CPU path's packed batch.

- the draws: the CPU path's pixels are ``ImageAugment.apply`` of ``TrainSampleBuilder.draw``'s values, and the device
  step's parameter tensors hold the same values;
- the pixels: where no source is reduced (small images), the device step equals the CPU step bit for bit, RandAugment's
  colour ops, flips, jitter (hue included) and grayscale applied; on natural photos (caltech101), where the device's
  2x2 box reduction stands in for Pillow's JPEG draft, token counts and grids are identical and the pixels agree within
  the stated tolerance, per-channel mean/std within 1 %;
- the device step runs on fake CUDA tensors with no host sync, no host tensor, no host-to-device copy, and the same
  ops whatever the batch size;
- train.py --device-aug trains end to end and resumes exactly; configurations with no device version are one line.
"""
import dataclasses
import io
import random
from pathlib import Path

import pytest
import torch

from PIL import Image

import train
from augment import AugConfig, MixupConfig
from augment.randaugment import RAND_OPS
from fake_cuda import StepAudit, fake_cuda
from loaders.decode import _draft_size, decode_resized, open_image, pil_to_hwc
from loaders.device_step import DEVICE_RA_OPS, DeviceAugmenter, augment_step, join_decoded, unsupported
from loaders.device_worker import RA_OP_INDEX, reduction
from loaders.factory import open_dataset
from loaders.packing import pack
from loaders.schedule import SeqLenSchedule
from loaders.train_loader import StepDataset

COLOUR_OPS = [name for name in RAND_OPS if name in DEVICE_RA_OPS]
P = 16


def step_datasets(root, aug, *, seq_lens=(32, 64), batch=4, seed=0, mixup=None, colour_only=False):
    """(CPU path, device path) StepDatasets over ``root/train`` with the same schedule; RandAugment limited to the
    ops the device has when ``colour_only``."""
    ds = open_dataset(root, 'train')
    schedule = SeqLenSchedule(len(ds), seq_lens, batch * max(seq_lens), seed=seed, patch_sizes=[P])
    pair = [StepDataset(ds, schedule, aug, mixup, packing=True, seed=seed, device_aug=d) for d in (False, True)]
    for step_ds in pair:
        ra = step_ds.builder.augment.rand_augment
        if ra is not None and colour_only:
            ra.spec.ops = list(COLOUR_OPS)
    return pair


def run_device(inputs):
    return DeviceAugmenter('cpu')(inputs)


AUG_RA = AugConfig(aa='rand-m9-n3-mstd0.5', vflip=0.3, grayscale_prob=0.2)
AUG_JITTER = AugConfig(color_jitter=(0.4, 0.4, 0.4, 0.2), vflip=0.3, grayscale_prob=0.2)
# The model card's augmentations, plus erasing with a fill whose values do not depend on a random generator.
AUG_CARD = AugConfig(aa='rand-m8-inc1-mstd1.0', grayscale_prob=0.1, reprob=0.3, remode='const', recount=2)
CARD_MIX = MixupConfig(num_classes=4, mixup_alpha=0.8, cutmix_alpha=1.0)


@pytest.mark.parametrize('aug', [AUG_RA, AUG_JITTER], ids=['randaugment', 'jitter'])
def test_both_paths_use_the_same_draws(demo_dataset, aug):
    cpu, dev = step_datasets(demo_dataset, aug)
    step = cpu.schedule.step(0, 1)
    inputs, _ = cpu[(0, 1)]
    host, _ = dev[(0, 1)]
    t = host['device_aug']
    images, draws = [], []
    for idx in step.indices.tolist():
        rng = random.Random(f'sample/0/0/{idx}')
        opened = open_image(cpu.dataset.path(idx))
        d = cpu.builder.draw(opened[1], opened[2], step.seq_len, P, rng)
        img = decode_resized(cpu.dataset.path(idx), d.box, d.out_hw, d.interpolation, opened=opened)
        images.append(pil_to_hwc(cpu.builder.augment.apply(img, d.image)))
        draws.append(d)
    assert torch.equal(inputs['patches'], pack(images, P)['patches'])  # the CPU path applies exactly these draws
    assert t['grid'].tolist() == [list(d.grid) for d in draws]
    assert t['bicubic'].tolist() == [d.interpolation == 'bicubic' for d in draws]
    for key in ('hflip', 'vflip', 'grayscale'):
        assert t[key].tolist() == [getattr(d.image, key) for d in draws], key
    for i, d in enumerate(draws):
        ops = [(op.name, op.arg) for op in d.image.ra]
        got = [(name, arg) for name, arg in zip(t['ra_op'][i].tolist(), t['ra_arg'][i].tolist()) if name >= 0]
        assert got == [(RA_OP_INDEX[name], float(arg) if arg is not None else 0.0) for name, arg in ops]
        assert bool(t['jitter_apply'][i]) == (d.image.jitter is not None)
        if d.image.jitter is not None:
            assert t['jitter_order'][i].tolist() == list(d.image.jitter[0])
    assert any(d.image.ra or d.image.jitter for d in draws), 'nothing was drawn'


@pytest.mark.parametrize('aug, mixup, colour_only', [
    (AUG_RA, None, True), (AUG_JITTER, None, True), (AugConfig(no_aug=True), None, True), (AUG_CARD, CARD_MIX, False),
], ids=['randaugment-colour', 'jitter', 'no-aug', 'card'])
def test_device_step_equals_the_cpu_step_without_reduction(demo_dataset, aug, mixup, colour_only):
    """Demo images (24-120 px) are never reduced at these sequence lengths: every pixel is the CPU path's, and so are
    the (soft) targets, with the card's RandAugment (geometric ops included), MixUp/CutMix and erasing."""
    cpu, dev = step_datasets(demo_dataset, aug, seed=3, mixup=mixup, colour_only=colour_only)
    applied = set()
    for k in range(cpu.schedule.num_steps):
        want, want_target = cpu[(0, k)]
        host, target = dev[(0, k)]
        plan = host['device_aug_plan']
        assert len(plan.stage_pixels) == 1 and not host['device_aug']['stages'][0, :, 6].any()  # no halving
        got = run_device(host)
        for key in ('patches', 'patch_coord', 'seq_lens', 'cu_seqlens', 'grid_sizes'):
            assert torch.equal(got[key], want[key]), (k, key)
        assert got['max_seqlen'] == want['max_seqlen'] and got['seq_len'] == want['seq_len']
        assert torch.equal(target, want_target)
        applied |= set(plan.ra_ops) | {f for f in ('any_vflip', 'any_jitter', 'any_grayscale', 'any_erasing')
                                       if getattr(plan, f)} | {plan.mix, 'affine' if any(plan.affine_layers) else None}
    if mixup is not None:
        assert {'mixup', 'cutmix', 'affine', 'any_erasing', 'any_grayscale'} <= applied, applied
    elif not aug.no_aug:
        assert {'any_vflip', 'any_grayscale'} <= applied, applied
        assert len(applied) >= 7 if aug.aa else 'any_jitter' in applied, applied


def test_reduction_is_pillows_draft_rule_uncapped():
    """The reduction is the power of two Pillow's JPEG draft picks for the crop (up to its cap at 8), beyond it too."""
    for (h, w), box, out in [((400, 600), (400, 600), (96, 144)), ((172, 395), (168, 388), (80, 192)),
                             ((3000, 4000), (3000, 4000), (48, 64)), ((100, 100), (60, 60), (48, 48)),
                             ((480, 640), (300, 200), (32, 16))]:
        r = reduction(h, w, box, out)
        buf = io.BytesIO()
        Image.new('RGB', (w, h)).save(buf, 'JPEG')
        img = Image.open(buf)
        request = _draft_size(img, h, w, (0, 0, *box), out, True)
        if request is not None:
            img.draft('RGB', request)
        assert img.size == (-(-w // min(r, 8)), -(-h // min(r, 8))), (h, w, box, out, r)
        assert r == 1 or (box[0] / r >= out[0] and box[1] / r >= out[1])
    assert reduction(3000, 4000, (3000, 4000), (48, 64)) == 32


@pytest.mark.shared_data
@pytest.mark.slow
def test_device_step_on_photos_within_tolerance(shared_data):
    """caltech101 JPEGs, most reduced before the resize: the device's 2x2 box means stand in for Pillow's reduced DCT.
    Same steps, tokens and grids; pixel differences small; per-channel mean and std within 1 % over ~200 images."""
    mixup = dataclasses.replace(CARD_MIX, num_classes=open_dataset(shared_data, 'train').num_classes)
    cpu, dev = step_datasets(shared_data, AUG_CARD, seq_lens=(16, 32), batch=16, seed=1, mixup=mixup)
    a, b, diffs, images, reduced = [], [], [], 0, 0
    for k in range(cpu.schedule.num_steps):
        want, _ = cpu[(0, k)]
        host, _ = dev[(0, k)]
        got = run_device(host)
        for key in ('patch_coord', 'cu_seqlens', 'grid_sizes'):
            assert torch.equal(got[key], want[key]), (k, key)
        a.append(want['patches'].view(-1, 3).float())
        b.append(got['patches'].view(-1, 3).float())
        diffs.append((a[-1] - b[-1]).abs().mean())
        images += want['seq_lens'].numel()
        reduced += int(host['device_aug']['stages'][0, :, 6].sum())
        if images >= 200:
            break
    a, b = torch.cat(a), torch.cat(b)
    assert images >= 200 and reduced >= images // 4, (images, reduced)
    assert float(torch.stack(diffs).mean()) < 1.0, diffs  # grey levels per value (measured ~0.1-0.3)
    assert torch.allclose(b.mean(0), a.mean(0), rtol=0.01) and torch.allclose(b.std(0), a.std(0), rtol=0.01), \
        (a.mean(0), b.mean(0), a.std(0), b.std(0))


def _fake_cuda_audit(demo_dataset, batch, aug):
    mixup = MixupConfig(num_classes=4, mixup_alpha=0.8, cutmix_alpha=0.0)
    _, dev = step_datasets(demo_dataset, aug, seq_lens=(32,), batch=batch, mixup=mixup, colour_only=False)
    host, _ = dev[(0, 0)]
    plan = host['device_aug_plan']
    # the host facts that depend on the draws, set as a step where every op was drawn: the same ops must then run
    # whatever the batch size
    plan.ra_ops = sorted(set(COLOUR_OPS) & set(dev.builder.augment.rand_augment.spec.ops)) if aug.aa else []
    plan.affine_layers = [bool(aug.aa)] * plan.ra_layers
    plan.any_vflip = plan.any_grayscale = plan.any_erasing = True
    plan.any_jitter = plan.jitter_hue = not aug.aa
    assert plan.mix == 'mixup'
    t = dict(host['device_aug'])
    jpeg = t.pop('jpeg')
    decoded = DeviceAugmenter('cpu').decode(jpeg, plan)[0]
    with fake_cuda() as mode:
        t = {k: v.to('cuda', non_blocking=True) for k, v in t.items()}
        planar = join_decoded([x.to('cuda') for x in decoded], 'cuda')  # one cat of the decoder's list
        mode.allow_non_fake_inputs = False  # a host tensor reached inside the step raises
        audit = StepAudit()
        with audit:
            out = augment_step(planar, t, plan)
    return audit, out, plan


@pytest.mark.parametrize('aug', [
    AugConfig(aa='rand-m8-inc1-mstd1.0', vflip=0.5, grayscale_prob=0.5, reprob=0.5, recount=2),
    AugConfig(vflip=0.5, grayscale_prob=0.5, color_jitter=(0.4, 0.4, 0.4, 0.2), reprob=0.5, remode='rand'),
], ids=['card', 'jitter'])
def test_device_step_has_no_host_sync_on_fake_cuda(demo_dataset, aug):
    """The whole device side after the decode: reduction, resize, flips, RandAugment (affine and colour ops), jitter,
    grayscale, MixUp, erasing."""
    small, out, plan = _fake_cuda_audit(demo_dataset, 8, aug)
    small.assert_clean(allowed_syncs=0)
    assert not small.syncs and not small.h2d_copies, (small.syncs, small.h2d_copies)
    assert out['patches'].device.type == 'cuda' and out['patches'].shape == (plan.num_tokens, P * P * 3)
    large, _, _ = _fake_cuda_audit(demo_dataset, 16, aug)
    assert [c.op for c in small.calls] == [c.op for c in large.calls], 'the ops depend on the batch size'
    assert len(small.ops('index_select')) > 10, 'nothing was recorded'


def test_unsupported_configurations_are_named():
    assert unsupported(AugConfig(), None) == []
    assert unsupported(AUG_CARD, CARD_MIX) == []
    text = ' '.join(unsupported(AugConfig(aa='rand-m9-t3a', gaussian_blur_prob=0.1, interpolation='lanczos'),
                                CARD_MIX, packing=False))
    for word in ('GaussianBlur', '--gaussian-blur-prob', 'lanczos', 'padded'):
        assert word in text
    assert 'nearest' in ' '.join(unsupported(AugConfig(aa='rand-m9', ra_interpolation='nearest'), None))


def test_train_refuses_what_has_no_device_version_in_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(['--data-dir', str(tmp_path), '--device-aug', '--gaussian-blur-prob', '0.1', '--model',
                    'naflexvit_tiny_test'])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '--device-aug has no device version of: --gaussian-blur-prob' in err[0], err


TINY = ('--model naflexvit_tiny_test -b 4 -j 0 --device cpu --epochs 2 --warmup-epochs 1 --naflex-train-seq-lens 32 64 '
        '--naflex-max-seq-len 64 --log-interval 1 --device-aug --aa rand-m8-inc1-mstd1.0 --grayscale-prob 0.1 '
        '--mixup 0.8 --cutmix 1.0 --reprob 0.25').split()  # the card's augmentations, and erasing's random values


@pytest.mark.slow
def test_train_with_device_aug_resumes_exactly(demo_dataset, tmp_path):
    from test_train import Hooks

    def run(name, hooks, *extra):
        train.main(['--data-dir', str(demo_dataset), *TINY, '--output', str(tmp_path), '--experiment', name, *extra],
                   hooks=hooks)
        return hooks

    ref = run('ref', Hooks())
    first = run('r', Hooks(stop_after_epoch=0))
    second = run('r', Hooks(), '--resume', 'auto')
    assert first.losses + second.losses == ref.losses and len(ref.losses) >= 4
    w_ref = torch.load(tmp_path / 'ref' / 'last.pth', map_location='cpu', weights_only=True)['state_dict']
    w = torch.load(tmp_path / 'r' / 'last.pth', map_location='cpu', weights_only=True)['state_dict']
    assert all(torch.equal(v, w[k]) for k, v in w_ref.items())


@pytest.mark.cuda
def test_device_step_on_cuda_equals_cpu(demo_dataset):
    """On the GPU: nvJPEG's decode, the reduction, resize and colour ops give the CPU device step's batch (nvJPEG may
    differ from libjpeg by a level: the tolerance is that of the photos test), no host sync inside the step."""
    _, dev = step_datasets(demo_dataset, AUG_CARD, seed=5, mixup=CARD_MIX)
    for k in range(min(3, dev.schedule.num_steps)):
        host, _ = dev[(0, k)]
        want = run_device(host)
        got = DeviceAugmenter('cuda')(host)
        assert got['patches'].device.type == 'cuda'
        for key in ('patch_coord', 'cu_seqlens', 'grid_sizes'):
            assert torch.equal(got[key].cpu(), want[key]), key
        diff = (got['patches'].cpu().float() - want['patches'].float()).abs()
        assert float(diff.mean()) < 1.0, float(diff.mean())


def test_profile_and_bench_scripts_run_the_device_path(demo_dataset, tmp_path):
    """profile_loader.py --device-aug times the worker side (its JSON keeps pipelines.ours.untimed_ms_per_image) and
    the device side on this CPU; bench_loader.py has an ours-devaug row."""
    import json
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'scripts' / 'bench'))
    import bench_loader
    import profile_loader
    out = tmp_path / 'p.json'
    profile_loader.main(['--data-dir', str(demo_dataset), '--only', 'ours', '--device-aug', '--cycles', '1',
                         '--fraction', '0.05', '-b', '8', '--naflex-train-seq-lens', '32', '64', '--device-steps', '1',
                         '--json', str(out)])
    rec = json.loads(out.read_text())
    assert rec['pipelines']['ours']['untimed_ms_per_image'] > 0 and 'device aug True' in rec['header']
    assert set(rec['pipelines']['ours']['stages_s']) == {'read + header', 'RRC params', 'pack'}  # no pixel work
    side = rec['device_side']
    assert side['steps'] == 1 and side['ms_per_batch'] > 0 and side['left_out'] == []
    best = bench_loader.main(['--data-dir', str(demo_dataset), '--only', 'ours-devaug', '-j', '0', '-b', '4',
                              '--naflex-train-seq-lens', '32', '--steps', '3'])
    assert best['ours-devaug']['img_s'] > 0


def test_prefetcher_keeps_what_the_device_step_made_on_the_device():
    """On CUDA the prefetcher pins host tensors before copying them; the device step's outputs are device tensors
    already (pinning one would raise)."""
    from loaders.prefetch import DevicePrefetcher
    prefetcher = DevicePrefetcher.__new__(DevicePrefetcher)  # no CUDA stream here: only the copy rule is under test
    prefetcher.device, prefetcher.is_cuda = torch.device('cuda'), True
    with fake_cuda():
        on_device = torch.zeros(4, dtype=torch.uint8, device='cuda')
        assert prefetcher._copy(on_device) is on_device


def test_a_jpeg_the_device_cannot_decode_is_grey_and_reported(tmp_path, caplog):
    from loaders.demo_data import make_demo_dataset
    root = make_demo_dataset(tmp_path / 'd', num_classes=2, per_class=4, val_per_class=1, seed=0, min_size=40,
                             max_size=80)
    _, dev = step_datasets(root, AugConfig(), seq_lens=(16,))
    broken = dev.dataset.path(0)
    data = Path(broken).read_bytes()
    Path(broken).write_bytes(data[:len(data) // 2])  # the header parses; the scan data is cut
    for k in range(dev.schedule.num_steps):
        host, _ = dev[(0, k)]
        if 0 in dev.schedule.step(0, k).indices.tolist():
            break
    else:
        pytest.fail('no step holds the broken file')
    with caplog.at_level('WARNING'):
        out = run_device(host)
    assert out['bad_files'] == [str(broken)] and str(broken) in caplog.text
    assert out['patches'].shape == (host['device_aug_plan'].num_tokens, P * P * 3)
