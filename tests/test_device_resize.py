"""Stage A of the device path (augment.device_resize): crop + resize + flip of decoded images into the packed token
layout, against Pillow and loaders.packing, and free of host syncs.

Every image of a batch gets its own crop box (the loader's random-resized crops from augment.geometry.sample_rrc,
fractional boxes as a JPEG draft decode gives, whole images, up- and downscales, thin strips), grid, filter
(bilinear / bicubic) and flip. The output must equal, bit for bit, ``img.resize((w, h), filter, box=crop)`` (then
``transpose(FLIP_LEFT_RIGHT)``) per image, and as a whole the dict loaders.packing.pack makes of those images.
Images: generated ones (shading, shapes, noise, flat, two-level, saturated) always, caltech101 photos through the
CPU path's own decode (loaders.decode.decode_resized) when ``shared_data`` is present. On fake CUDA tensors
(tests/fake_cuda.py) the resize runs with no host sync, no host tensor, no host-to-device copy, and the same
sequence of tensor ops for 3 images as for 9. On a GPU (``-m cuda``) it gives the CPU's pixels without syncing.
"""
import random

import pytest
import torch
from PIL import Image

from augment import device_resize as R
from augment.geometry import sample_rrc
from fake_cuda import StepAudit, fake_cuda
from loaders.decode import decode_resized, open_image, pil_to_hwc
from loaders.packing import pack
from repo_scripts import load_script
from test_device_ops import generated_image

FILTERS = {'bilinear': Image.Resampling.BILINEAR, 'bicubic': Image.Resampling.BICUBIC}
KINDS = ['photo', 'vivid', 'flat', 'dim', 'two', 'photo']


# ------------------------------------------------------------------------------------------------------ cases
def draw_box(rng, h, w, P, kind):
    """(box (top, left, height, width), grid (gh, gw)) of one kind of crop."""
    if kind == 'rrc':  # the loader's crop and grid
        crop = sample_rrc(h, w, rng, patch_size=P, max_seq_len=rng.choice([4, 16, 64]))
        return (crop.top, crop.left, crop.height, crop.width), (crop.grid_h, crop.grid_w)
    grid = (rng.randint(1, 6), rng.randint(1, 6))
    if kind == 'whole':
        return (0, 0, h, w), grid
    if kind == 'strip':  # one source row or column, or a box narrower than a pixel
        return (rng.uniform(0, h - 1), 0.0, rng.choice([1.0, 0.4]), float(w)), grid
    ch, cw = rng.uniform(0.5, h), rng.uniform(0.5, w)  # 'fraction': a box rescaled to a draft-decoded image
    return (rng.uniform(0, h - ch), rng.uniform(0, w - cw), ch, cw), grid


def make_case(rng, imgs, P):
    """Per image: box, grid, filter, flip; and the tap count that covers the batch's largest downscale."""
    kinds = ['rrc', 'fraction', 'whole', 'strip']
    boxes, grids = [], []
    for i, img in enumerate(imgs):
        box, grid = draw_box(rng, img.shape[0], img.shape[1], P, kinds[i % len(kinds)] if i < 4 else
                             rng.choice(kinds))
        boxes.append(box)
        grids.append(grid)
    filters = [rng.choice(sorted(FILTERS)) for _ in imgs]
    flips = [rng.random() < 0.5 for _ in imgs]
    taps = max(R.taps_for(R.downscale(b[2:], (gh * P, gw * P)), f) for b, (gh, gw), f in zip(boxes, grids, filters))
    return boxes, grids, filters, flips, taps


def pil_reference(img, box, grid, P, name, flip):
    top, left, ch, cw = box
    out = Image.fromarray(img.numpy()).resize((grid[1] * P, grid[0] * P), FILTERS[name],
                                              box=(left, top, left + cw, top + ch))
    return pil_to_hwc(out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out)


def source_buffer(imgs):
    return torch.cat([x.reshape(-1) for x in imgs])


def run_device(imgs, boxes, grids, filters, flips, P, taps, device='cpu'):
    params = R.stack_resize_params([tuple(x.shape[:2]) for x in imgs], boxes, grids, filters, flips, P)
    return R.resize_to_packed(source_buffer(imgs).to(device), params.to(device), taps)


def vertical_first(img, grid, P):
    """The pass order Pillow 13.0 takes (augment.device_resize's docstring), on the host."""
    (h, w), (oh, ow) = img.shape[:2], (grid[0] * P, grid[1] * P)
    return oh < h and 2 * (ow - w) > oh - h


def assert_equals_pil(imgs, case, P):
    """The device batch against pack() of Pillow's images: every key, then each image's pixels for the report."""
    boxes, grids, filters, flips, taps = case
    out = run_device(imgs, boxes, grids, filters, flips, P, taps)
    refs = [pil_reference(x, b, g, P, f, fl) for x, b, g, f, fl in zip(imgs, boxes, grids, filters, flips)]
    expected = pack(refs, P)
    for key in ('patch_coord', 'seq_lens', 'cu_seqlens', 'grid_sizes'):
        assert out[key].dtype == expected[key].dtype and torch.equal(out[key], expected[key]), key
    assert out['max_seqlen'] == expected['max_seqlen'] and out['patch_size'] == P
    assert out['patches'].shape == expected['patches'].shape and out['patches'].dtype == torch.uint8
    cu = expected['cu_seqlens']
    for i in range(len(imgs)):
        got, ref = out['patches'][cu[i]:cu[i + 1]], expected['patches'][cu[i]:cu[i + 1]]
        diff = (got.int() - ref.int()).abs()
        assert int(diff.max()) == 0, (i, boxes[i], grids[i], filters[i], flips[i], int(diff.max()),
                                      float((diff > 0).float().mean()))
    return [vertical_first(x, g, P) for x, g in zip(imgs, grids)]


def generated_sources(rng, n, seed):
    sizes = [(rng.randint(1, 70), rng.randint(1, 70)) for _ in range(n)]
    sizes[0] = (rng.randint(40, 90), rng.randint(40, 90))
    return [torch.from_numpy(generated_image(h, w, KINDS[i % len(KINDS)], seed * 100 + i))
            for i, (h, w) in enumerate(sizes)]


# ------------------------------------------------------------------------------------------ equality with PIL
@pytest.mark.parametrize('patch_size', [16, 4])
def test_resize_equals_pil_on_generated_images(patch_size):
    orders = []
    for seed in range(6):
        rng = random.Random(seed)
        imgs = generated_sources(rng, 8, seed)
        orders += assert_equals_pil(imgs, make_case(rng, imgs, patch_size), patch_size)
    assert any(orders) and not all(orders), 'the batches must hold both of Pillow 13.0 pass orders'


def test_resize_equals_pil_with_large_downscales():
    """Crops reduced up to 12x (bicubic: 48 taps) and upscaled up to 16x, in one batch."""
    imgs = [torch.from_numpy(generated_image(h, w, 'photo', 40 + i)) for i, (h, w) in
            enumerate([(190, 150), (8, 5), (97, 203), (3, 120)])]
    boxes = [(3.5, 7.25, 180.0, 140.0), (1, 1, 6, 3), (0, 0, 97, 203), (0.0, 4.0, 3.0, 110.0)]
    grids = [(2, 2), (6, 3), (2, 3), (1, 2)]
    case = (boxes, grids, ['bicubic', 'bilinear', 'bicubic', 'bilinear'], [False, True, True, False],
            R.taps_for(12.0))
    assert_equals_pil(imgs, case, 8)


@pytest.mark.shared_data
def test_resize_equals_the_cpu_decode_path_on_photos(shared_data):
    """Natural JPEGs: the loader's crops (sample_rrc) decoded at full size and resized by the CPU path itself
    (loaders.decode.decode_resized, no draft), and the same crops from a draft-decoded (1/2, 1/4) source with the
    box rescaled as decode_resized rescales it."""
    classes = sorted(p for p in (shared_data / 'train').iterdir() if p.is_dir())
    paths = [sorted(c.glob('*.jpg'))[0] for c in classes[::max(1, len(classes) // 8)][:8]]
    rng = random.Random(3)
    P = 16
    for draft in (False, True):
        imgs, boxes, grids, filters, flips, refs = [], [], [], [], [], []
        for path in paths:
            opened = open_image(str(path))
            _, h, w, _ = opened
            crop = sample_rrc(h, w, rng, patch_size=P, max_seq_len=rng.choice([16, 64, 196]))
            box, grid = (crop.top, crop.left, crop.height, crop.width), (crop.grid_h, crop.grid_w)
            name, flip = rng.choice(sorted(FILTERS)), rng.random() < 0.5
            with Image.open(path) as im:
                if draft:
                    im.draft('RGB', (im.width // rng.choice([2, 4]), im.height // rng.choice([2, 4])))
                src = pil_to_hwc(im.convert('RGB'))
            sy, sx = src.shape[0] / h, src.shape[1] / w
            box = (box[0] * sy, box[1] * sx, box[2] * sy, box[3] * sx)
            if not draft:  # the CPU path's own pixels
                ref = decode_resized(str(path), (crop.top, crop.left, crop.height, crop.width),
                                     (grid[0] * P, grid[1] * P), name, draft=False, opened=opened)
                refs.append(pil_to_hwc(ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else ref))
            else:
                opened[0].close()
            imgs.append(src)
            boxes.append(box)
            grids.append(grid)
            filters.append(name)
            flips.append(flip)
        taps = max(R.taps_for(R.downscale(b[2:], (g[0] * P, g[1] * P)), f) for b, g, f in zip(boxes, grids, filters))
        case = (boxes, grids, filters, flips, taps)
        assert_equals_pil(imgs, case, P)
        if refs:
            out = run_device(imgs, *case[:4], P, taps)
            assert torch.equal(out['patches'], pack(refs, P)['patches'])


def test_flip_is_pils_transpose_after_the_resize():
    rng = random.Random(4)
    imgs = generated_sources(rng, 6, 9)
    boxes, grids, filters, _, taps = make_case(rng, imgs, 4)
    plain = run_device(imgs, boxes, grids, filters, [False] * 6, 4, taps)
    flipped = run_device(imgs, boxes, grids, filters, [True] * 6, 4, taps)
    cu, changed = plain['cu_seqlens'], 0
    for i, (gh, gw) in enumerate(grids):
        def image(out):
            return out['patches'][cu[i]:cu[i + 1]].view(gh, gw, 4, 4, 3).permute(0, 2, 1, 3, 4).reshape(gh * 4, -1, 3)
        ref = Image.fromarray(image(plain).numpy()).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        assert torch.equal(image(flipped), pil_to_hwc(ref)), i
        changed += int(not torch.equal(image(flipped), image(plain)))
    assert changed > 0


def test_beyond_the_tap_limit_the_filter_is_cut_not_broken():
    """Fewer taps than a downscale needs: the central window, renormalised: close to Pillow, not equal to it."""
    img = torch.from_numpy(generated_image(120, 160, 'photo', 5))
    case = ([(0, 0, 120, 160)], [(2, 2)], ['bicubic'], [False])
    needed = R.taps_for(R.downscale((120, 160), (8, 8)))
    assert needed == 80
    out = run_device([img], *case, 4, taps=24)['patches']
    ref = pack([pil_reference(img, (0, 0, 120, 160), (2, 2), 4, 'bicubic', False)], 4)['patches']
    diff = (out.int() - ref.int()).abs().float()
    assert diff.max() > 0 and diff.mean() < 8, (diff.max(), diff.mean())


def test_host_helpers():
    assert R.taps_for(1.0, 'bilinear') == 2 and R.taps_for(0.3, 'bicubic') == 4
    assert R.taps_for(2.0) == 8 and R.taps_for(2.0, 'bilinear') == 4
    assert R.downscale((100, 50), (25, 50)) == 4.0
    with pytest.raises(ValueError, match='lanczos'):
        R.stack_resize_params([(4, 4)], [(0, 0, 4, 4)], [(1, 1)], ['lanczos'], [False], 4)
    p = R.stack_resize_params([(4, 5), (6, 7)], [(0, 0, 4, 5)] * 2, [(1, 2), (3, 1)], ['bilinear'] * 2, [0, 1], 2)
    assert p.offset_B.tolist() == [0, 20] and p.num_tokens == 5 and p.max_seqlen == 3


# ------------------------------------------------------------------------------------------ no host sync (fake CUDA)
def _audit(n, seed, taps=6):
    rng = random.Random(seed)
    imgs = generated_sources(rng, n, seed)
    boxes, grids, filters, flips, _ = make_case(rng, imgs, 4)
    params = R.stack_resize_params([tuple(x.shape[:2]) for x in imgs], boxes, grids, filters, flips, 4)
    src = source_buffer(imgs)
    with fake_cuda() as mode:
        dev_src, dev_params = src.to('cuda'), params.to('cuda', non_blocking=True)
        mode.allow_non_fake_inputs = False  # a host tensor reached inside the step raises
        audit = StepAudit()
        with audit:
            out = R.resize_to_packed(dev_src, dev_params, taps)
        return audit, out, params


def test_resize_has_no_host_sync_on_fake_cuda():
    small, out, params = _audit(3, 1)
    small.assert_clean(allowed_syncs=0)
    assert not small.syncs and not small.h2d_copies, (small.syncs, small.h2d_copies)
    assert out['patches'].device.type == 'cuda' and out['patches'].shape == (params.num_tokens, 48)
    assert all(out[k].device.type == 'cuda' for k in ('patch_coord', 'cu_seqlens', 'seq_lens', 'grid_sizes'))
    large, _, _ = _audit(9, 2)
    assert [c.op for c in small.calls] == [c.op for c in large.calls], 'the ops depend on the batch size'
    assert small.ops('index_select'), 'nothing was recorded'


def test_the_audit_sees_a_host_sync_in_the_resize(monkeypatch):
    """The check above fails for a resize that reads a device value on the host."""
    real = R.packed_layout

    def reading(grid_B2, num_tokens):
        int(grid_B2[0, 0])
        return real(grid_B2, num_tokens)

    monkeypatch.setattr(R, 'packed_layout', reading)
    audit, _, _ = _audit(3, 1)
    assert audit.syncs


@pytest.mark.cuda
def test_resize_on_cuda_equals_cpu_without_syncing():
    rng = random.Random(8)
    imgs = generated_sources(rng, 8, 8)
    case = make_case(rng, imgs, 16)
    expected = run_device(imgs, *case[:4], 16, case[4])
    params = R.stack_resize_params([tuple(x.shape[:2]) for x in imgs], *case[:4], 16).to('cuda')
    src = source_buffer(imgs).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        out = R.resize_to_packed(src, params, case[4])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(out['patches'].cpu(), expected['patches'])


# ------------------------------------------------------------------------------------------------- benchmark
def test_benchmark_script_runs(capsys):
    bench = load_script('scripts/bench/bench_device_resize.py')
    row = bench.main(['--images', '3', '--tokens', '4', '--patch-size', '4', '--repeats', '1', '--device', 'cpu',
                      '--pil'])
    assert row['ms'] > 0 and row['pil_ms'] > 0 and row['exact']
    assert 'resize' in capsys.readouterr().out
