"""The worker side of ``--device-aug``: a training step as encoded bytes plus every drawn parameter, no pixels.

Why: decoding, resampling and the per-pixel augmentations are most of a loader worker's CPU time per image; with
``--device-aug`` the training device does them (loaders.device_step), batched over the step, and a worker only reads
each file, parses its header (size, mode, EXIF orientation when asked for) and draws the sample's parameters with the
same code and random streams as the CPU path (``TrainSampleBuilder.draw``, ``RandomErasing.draw``,
``augment.mixup.draw_mix``), so the two paths augment every image alike.

Sources. A baseline or progressive RGB (YCbCr) JPEG upright as stored goes as its bytes (the device decodes it at full
size: ``torchvision.io.decode_jpeg``, nvJPEG on CUDA). Anything else (PNG, WebP, grey or CMYK JPEG, an EXIF-rotated
image) is decoded here, as the CPU path decodes it (JPEG draft included), and goes as uint8 RGB pixels.

Reduction. Like the CPU path's JPEG draft, each source is reduced by a power of two ``r`` before the resize, so the
resize's antialiasing window stays short: the largest r with the crop still >= its output on both axes (Pillow's
draft rule for JPEG, without its cap at 8). A JPEG shipped as bytes is reduced on the device by r (2x2 box means); a
source decoded here already holds Pillow's draft reduction and the device reduces it by the rest.

The step (``build_host_step``) is a dict: the packed-batch metadata the trainer reads before the device step
(``seq_lens``, ``cu_seqlens``, ``grid_sizes``, ``max_seqlen``, ``patch_size``, ``seq_len``, ``bad_files``), the
tensors under ``'device_aug'`` (bytes, pixels, per-image parameters: ``[B]`` / ``[B, k]``) and a ``HostPlan`` under
``'device_aug_plan'`` (plain numbers the device step needs without reading a device tensor). Targets (soft with
MixUp/CutMix) are made here: they depend on sizes and draws only.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchvision.transforms import InterpolationMode

from augment.device_geometry import op_matrix
from augment.device_mix import stack_erase_boxes, stack_mix
from augment.device_resize import taps_for
from augment.device_ops import stack_color_jitter
from augment.erasing import ErasingDraw, RandomErasing
from augment.mixup import MixDraw, MixupConfig, draw_mix, mix_targets, mix_weights
from augment.policy import ImageDraws
from augment.randaugment import OPS
from augment.stages import StageHook, stage

from .decode import _decode, _draft_size, open_bytes, read_encoded
from .packing import _empty_uint8
from .pipeline import SampleDraws, TrainSampleBuilder

RA_OP_INDEX = {name: i for i, name in enumerate(sorted(OPS))}  # op name <-> the integer shipped per image
GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')  # one affine map per image and layer


@dataclass
class DeviceSample:
    """One image for the device: ``jpeg`` bytes or ``pixels`` (uint8 HWC), the size of what the device decodes or
    receives (``src_hw``), its further reduction ``reduce`` (a power of two), the crop box in the reduced source,
    the draws and the erasing draw."""
    path: str
    jpeg: Optional[bytes]
    pixels: Optional[np.ndarray]
    src_hw: Tuple[int, int]
    reduce: int
    box: Tuple[float, float, float, float]
    draws: SampleDraws
    erasing: Optional[ErasingDraw]

    @property
    def reduced_hw(self) -> Tuple[int, int]:
        return -(-self.src_hw[0] // self.reduce), -(-self.src_hw[1] // self.reduce)


def reduction(h: int, w: int, box_hw: Tuple[float, float], out_hw: Tuple[int, int]) -> int:
    """Pillow's JPEG draft rule for an h x w source whose crop ``box_hw`` becomes ``out_hw``, uncapped: the largest
    power of two r <= min(w // ceil(w s), h // ceil(h s)) with s the output/crop ratio (1 unless s <= 0.5)."""
    s = max(out_hw[0] / box_hw[0], out_hw[1] / box_hw[1])
    if s > 0.5:
        return 1
    scale = min(w // max(1, math.ceil(w * s)), h // max(1, math.ceil(h * s)))
    return 1 << max(0, int(scale).bit_length() - 1)


def _ships_as_jpeg(img, orientation: int) -> bool:
    """The device decodes baseline/progressive 3-channel JPEGs; EXIF rotation and other modes stay here."""
    return img.format == 'JPEG' and img.mode == 'RGB' and orientation == 1


def prepare_sample(builder: TrainSampleBuilder, erasing: Optional[RandomErasing], path, seq_len: int,
                   patch_size: int, rng: random.Random, timer: Optional[StageHook] = None) -> DeviceSample:
    """Read ``path``, draw every parameter (the CPU path's order and streams), decode here only what the device
    cannot. UndecodableImage as the CPU path raises it (an unreadable file, no image, a broken non-JPEG)."""
    with stage(timer, 'read + header'):
        data = read_encoded(path)
        img, h, w, orientation = open_bytes(data, builder.cfg.exif_orientation)
    try:
        with stage(timer, 'RRC params'):
            d = builder.draw(h, w, seq_len, patch_size, rng)
            erase = erasing.draw(rng, *d.grid) if erasing is not None else None
        box = d.box if d.box is not None else (0, 0, h, w)
        r = reduction(h, w, box[2:], d.out_hw)
        if _ships_as_jpeg(img, orientation):
            jpeg, pixels, src_hw = data, None, (h, w)
        else:
            with stage(timer, 'decode'):
                draft = _draft_size(img, h, w, box, d.out_hw, builder.cfg.draft)
                decoded = _decode(img, orientation, draft)
                pixels = np.array(decoded, dtype=np.uint8)
            jpeg, src_hw = None, pixels.shape[:2]
            r = max(1, r * src_hw[0] // h) if r > 1 else 1  # what Pillow's draft did not reduce yet
            r = 1 << max(0, r.bit_length() - 1)
    finally:
        img.close()
    sample = DeviceSample(str(path), jpeg, pixels, src_hw, r, box, d, erase)
    rh, rw = sample.reduced_hw
    sy, sx = rh / h, rw / w
    sample.box = (box[0] * sy, box[1] * sx, box[2] * sy, box[3] * sx)
    return sample


def stand_in(builder: TrainSampleBuilder, erasing: Optional[RandomErasing], patch_size: int,
             rng: random.Random) -> DeviceSample:
    """A grey one-patch image (the CPU path's stand-in for a sample the loader gave up on), erased as it would be."""
    P = patch_size
    pixels = np.full((P, P, 3), 128, dtype=np.uint8)
    erase = erasing.draw(rng, 1, 1) if erasing is not None else None
    draws = SampleDraws(None, (1, 1), P, builder.interps[0], ImageDraws())
    return DeviceSample('', None, pixels, (P, P), 1, (0.0, 0.0, float(P), float(P)), draws, erase)


@dataclass
class HostPlan:
    """The numbers of a step the device side needs on the host (never read back from the device)."""
    patch_size: int
    num_tokens: int
    max_seqlen: int
    taps: int
    jpeg_lengths: List[int]
    jpeg_paths: List[str]
    jpeg_hw: List[Tuple[int, int]]
    stage_pixels: List[int]        # output pixels of each 2x reduction stage (the last one: the resize's source)
    ra_layers: int
    ra_ops: List[str]              # the RandAugment ops some image of the step drew, geometric ones aside
    any_vflip: bool
    any_jitter: bool
    jitter_hue: bool
    any_grayscale: bool
    any_blur: bool
    any_erasing: bool
    mix: Optional[str]             # None, 'mixup' or 'cutmix'
    affine_layers: List[bool] = field(default_factory=list)  # per RandAugment layer: some image drew a geometric op
    affine_filters: Tuple[str, ...] = ('bilinear', 'bicubic')  # what Rotate/Shear may resample with (a setting)
    erase_mode: str = 'pixel'
    fill_seed: int = 0             # seeds the device's random erasing values of this step


def _stages(samples: Sequence[DeviceSample]) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """The reduction stages (at least one): int64 [S, B, 10] (in offset, in h, in w, channel / row / column strides,
    halve, out offset, out h, out w; offsets in elements in, pixels out), the images in buffer order and the output
    pixels per stage. Stage 1 reads the decoded JPEGs, planar (channel c of pixel p of the J JPEG pixels at c J + p:
    loaders.device_step.join_decoded), then the shipped pixels (HWC); it writes HWC, which later stages read."""
    n = len(samples)
    num_stages = max([1] + [s.reduce.bit_length() - 1 for s in samples])  # stage 1 also lays every image out HWC
    order = [i for i, s in enumerate(samples) if s.jpeg is not None] + [i for i, s in enumerate(samples)
                                                                       if s.jpeg is None]
    hw = [samples[i].src_hw for i in range(n)]
    left = [samples[i].reduce for i in range(n)]
    jpeg_pixels = sum(h * w for (h, w), s in zip(hw, samples) if s.jpeg is not None)
    in_off, off = [0] * n, 0
    for i in order:  # JPEG pixels first (offsets in pixels of the planar block), then the shipped images' elements
        if samples[i].jpeg is None and off < 3 * jpeg_pixels:
            off = 3 * jpeg_pixels
        in_off[i] = off
        off += hw[i][0] * hw[i][1] * (1 if samples[i].jpeg is not None else 3)
    strides = [(jpeg_pixels, w, 1) if s.jpeg is not None else (1, 3 * w, 3) for (h, w), s in zip(hw, samples)]
    rows, totals = [], []
    for k in range(num_stages):
        out_hw = [((h + 1) // 2, (w + 1) // 2) if left[i] > 1 else (h, w) for i, (h, w) in enumerate(hw)]
        out_off, total = [0] * n, 0
        for i in order:
            out_off[i] = total
            total += out_hw[i][0] * out_hw[i][1]
        table = []
        for i in range(n):
            h, w = hw[i]
            table.append([in_off[i], h, w, *strides[i], int(left[i] > 1), out_off[i], *out_hw[i]])
        rows.append(table)
        totals.append(total)
        hw, left = out_hw, [max(1, r // 2) for r in left]
        in_off = [3 * o for o in out_off]
        strides = [(1, 3 * w, 3) for _, w in hw]
    stages = torch.tensor(rows, dtype=torch.int64).view(num_stages, n, 10)
    return stages, torch.tensor(order, dtype=torch.int64), totals


def _concat(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 arrays back to back in one tensor (in a worker: in shared memory, loaders.packing._empty_uint8)."""
    out = _empty_uint8(sum(a.size for a in arrays))
    view, off = out.numpy(), 0
    for a in arrays:
        view[off:off + a.size] = a
        off += a.size
    return out


def build_host_step(samples: Sequence[DeviceSample], targets: Sequence[int], builder: TrainSampleBuilder,
                    mixup: Optional[MixupConfig], mix_rng: random.Random, *, epoch: int, seq_len: int,
                    patch_size: int, bad_files: List[str]) -> Tuple[Dict, torch.Tensor]:
    """(inputs, target) of one step for the device path (module docstring)."""
    P, n = patch_size, len(samples)
    grids = [s.draws.grid for s in samples]
    sizes = [(gh * P, gw * P) for gh, gw in grids]
    mix: Optional[MixDraw] = draw_mix(sizes, mixup, mix_rng, epoch) if mixup is not None else None
    if mixup is not None:
        target = mix_targets(targets, mixup, *mix_weights(sizes, mix))
    else:
        target = torch.tensor(list(targets), dtype=torch.int64)
    jpegs = [s for s in samples if s.jpeg is not None]
    jpeg_buf = _concat([np.frombuffer(s.jpeg, dtype=np.uint8) for s in jpegs])
    pixel_buf = _concat([s.pixels.reshape(-1) for s in samples if s.jpeg is None])
    stages, order, stage_pixels = _stages(samples)
    lens = [gh * gw for gh, gw in grids]
    # the largest downscale the resize is left with picks its tap count (augment.device_resize.taps_for): bicubic 4
    # taps when no image is reduced by the resize, else 8 (below 2x after the reduction, or the window is cut);
    # bilinear half that, when no image of the step is bicubic
    residual = max([1.0] + [max(s.box[2] / oh, s.box[3] / ow) for s, (oh, ow) in zip(samples, sizes)])
    draws = [s.draws.image for s in samples]
    tensors = _parameter_tensors(samples, draws, mix, builder)
    tensors.update(jpeg=jpeg_buf, pixels=pixel_buf, stages=stages, source_order=order)
    ra_ops = sorted({op.name for d in draws for op in d.ra if op.name not in GEOMETRIC_OPS})
    erase_max = max([len(s.erasing.boxes) for s in samples if s.erasing is not None] + [0])
    ra = builder.augment.rand_augment
    fill_seed = 0
    for s in samples:
        fill_seed ^= s.erasing.seed if s.erasing is not None else 0
    plan = HostPlan(
        patch_size=P, num_tokens=sum(lens), max_seqlen=max(lens, default=0),
        taps=taps_for(2.0 if residual > 1.0 else 1.0, 'bicubic' if bool(tensors['bicubic'].any()) else 'bilinear'),
        jpeg_lengths=[len(s.jpeg) for s in jpegs],
        jpeg_paths=[s.path for s in jpegs], jpeg_hw=[s.src_hw for s in jpegs], stage_pixels=stage_pixels,
        ra_layers=tensors['ra_op'].shape[1], ra_ops=ra_ops, any_vflip=any(d.vflip for d in draws),
        any_jitter=any(d.jitter is not None for d in draws),
        jitter_hue=any(d.jitter is not None and d.jitter[1][3] is not None for d in draws),
        any_grayscale=any(d.grayscale for d in draws), any_blur=any(d.blur_sigma is not None for d in draws),
        any_erasing=erase_max > 0, mix=None if mix is None else ('cutmix' if mix.cutmix else 'mixup'),
        affine_layers=tensors['ra_affine'].any(0).tolist(),
        affine_filters=tuple(sorted({m.value for m in ra.interps})) if ra is not None else ('bilinear',),
        erase_mode=builder.cfg.remode, fill_seed=fill_seed)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    cu = torch.zeros(n + 1, dtype=torch.int32)
    torch.cumsum(seq_lens, 0, out=cu[1:])
    inputs = {'seq_lens': seq_lens, 'cu_seqlens': cu, 'grid_sizes': torch.tensor(grids, dtype=torch.int32).view(-1, 2),
              'max_seqlen': plan.max_seqlen, 'patch_size': P, 'seq_len': int(seq_len), 'bad_files': list(bad_files),
              'device_aug': tensors, 'device_aug_plan': plan}
    return inputs, target


def _parameter_tensors(samples: Sequence[DeviceSample], draws, mix: Optional[MixDraw],
                       builder: TrainSampleBuilder) -> Dict[str, torch.Tensor]:
    """The per-image parameters as CPU tensors ([B] or [B, k]), one entry per op the device step applies."""
    n = len(samples)
    ra = builder.augment.rand_augment
    layers = ra.spec.num_layers if ra is not None else 0
    ra_op = torch.full((n, layers), -1, dtype=torch.int64)
    ra_arg = torch.zeros(n, layers, dtype=torch.float64)
    ra_affine = torch.zeros(n, layers, dtype=torch.bool)
    ra_matrix = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64).repeat(n, layers, 1)
    ra_bicubic = torch.zeros(n, layers, dtype=torch.bool)
    for i, (s, d) in enumerate(zip(samples, draws)):
        h, w = s.draws.out_hw
        for k, op in enumerate(d.ra):
            ra_op[i, k] = RA_OP_INDEX[op.name]
            ra_arg[i, k] = float(op.arg) if op.arg is not None else 0.0
            if op.name in GEOMETRIC_OPS:
                ra_affine[i, k] = True
                ra_matrix[i, k] = torch.tensor(op_matrix(op.name, op.arg, w, h), dtype=torch.float64)
                ra_bicubic[i, k] = op.interpolation == InterpolationMode.BICUBIC
    jitter = stack_color_jitter([d.jitter for d in draws])
    erasing = builder.augment.erasing
    boxes = [s.erasing.boxes if s.erasing is not None else [] for s in samples]
    erase = stack_erase_boxes(boxes, erasing.max_count if erasing is not None else 1)
    partner, cutmix, lam, cut = stack_mix([None] * n, False, 1.0, [None] * n)
    if mix is not None:
        partners: List[Optional[int]] = [None] * n
        for a, b in mix.pairs:
            partners[a], partners[b] = b, a
        partner, cutmix, lam, cut = stack_mix(partners, mix.cutmix, mix.lam, [mix.cuts.get(i) for i in range(n)])
    fill = ra.fill if ra is not None else (0, 0, 0)
    return {
        'box': torch.tensor([s.box for s in samples], dtype=torch.float64).view(-1, 4),
        'grid': torch.tensor([s.draws.grid for s in samples], dtype=torch.int64).view(-1, 2),
        'bicubic': torch.tensor([s.draws.interpolation == 'bicubic' for s in samples], dtype=torch.bool),
        'hflip': torch.tensor([d.hflip for d in draws], dtype=torch.bool),
        'vflip': torch.tensor([d.vflip for d in draws], dtype=torch.bool),
        'grayscale': torch.tensor([d.grayscale for d in draws], dtype=torch.bool),
        'ra_op': ra_op, 'ra_arg': ra_arg, 'ra_affine': ra_affine, 'ra_matrix': ra_matrix, 'ra_bicubic': ra_bicubic,
        'fill': torch.tensor([fill], dtype=torch.uint8).expand(n, 3).contiguous(),
        'jitter_apply': jitter[0], 'jitter_order': jitter[1], 'jitter_factor': jitter[2], 'jitter_active': jitter[3],
        'erase_boxes': erase,
        'erase_mean': torch.tensor(builder.cfg.mean, dtype=torch.float32),
        'erase_std': torch.tensor(builder.cfg.std, dtype=torch.float32),
        'mix_partner': partner, 'mix_cutmix': cutmix, 'mix_lam': lam, 'mix_box': cut,
    }
