"""The device side of ``--device-aug``: a step's encoded JPEGs and drawn parameters (loaders.device_worker) become the
packed uint8 batch the CPU path would have built, on the training device, in the main process.

Why: a loader worker spends most of its CPU time per image decoding, resampling and augmenting pixels; the training
device does the same work for the whole step in a fixed number of batched tensor ops. ``DeviceAugmenter`` runs inside
the prefetcher (loaders.prefetch), on its side stream on CUDA, so it overlaps the previous step's compute.

A step, in order (``augment_step`` after the decode: a fixed sequence of tensor ops for a given ``HostPlan``, no
Python loop over images, no host sync, checked on fake CUDA tensors in tests/test_device_aug.py):
1. decode: ``torchvision.io.decode_jpeg(list of byte tensors, device=...)`` (batched nvJPEG on CUDA, libjpeg on the
   CPU), full size, joined into one planar buffer (``join_decoded``); pixels the workers decoded come as HWC;
2. reduce (``reduce_sources``): every image by its power of two (2x2 box means per stage; the CPU path's JPEG draft
   reduces by the DCT instead), into one HWC buffer;
3. crop + resize + horizontal flip into the packed token layout (augment.device_resize, Pillow's resampling); the
   tap count comes from the step's largest remaining downscale and its filters, 2, 4 or 8 (a few buckets: the
   graphs do not multiply);
4. vertical flip, RandAugment layer by layer (the geometric ops as one affine map per image and layer:
   augment.device_geometry; the colour ops: augment.device_ops), colour jitter, grayscale; each op runs once per layer
   on the whole batch with the images that drew it selected (``apply_B``), and only when some image of the step drew
   it (a host fact in the plan);
5. MixUp/CutMix and random erasing (augment.device_mix) -- then the prefetcher normalises to float.

Tolerance against the CPU path: the draws are the same; decode + reduce differ from Pillow's draft decode by a few
levels where the CPU path reduces (measured in docs/performance.md); without reduction the decoded pixels are
libjpeg's in both; every step after that is bit-exact for the same source pixels, except random erasing's fill
values, drawn on the device from a generator seeded per step by the step's draws (same distribution, other values).

No device version: RandAugment's GaussianBlur (the '3a' op sets), ``--gaussian-blur-prob``, nearest resampling for
Rotate/Shear, resize filters other than bilinear/bicubic and timm's padded layout; ``unsupported`` names them and the
trainer refuses such a configuration in one line.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Tuple

import torch

from augment import device_geometry as G
from augment import device_mix as M
from augment import device_ops as D
from augment.config import AugConfig
from augment.device_resize import ResizeParams, packed_layout, resize_to_packed
from augment.mixup import MixupConfig
from augment.randaugment import RandAugment

from .device_worker import RA_OP_INDEX, HostPlan

C = 3
_logger = logging.getLogger(__name__)


def _no_arg(op):
    return lambda x, layout, apply_B, arg_B: op(x, layout, apply_B)


def _desaturate(x, layout, apply_B, arg_B):
    return D.saturation(x, layout, apply_B, (1.0 - arg_B).clamp(0.0, 1.0))


# RandAugment's colour ops: (x_TD, layout, apply_B, arg_B float64) -> x_TD, as augment.randaugment.OPS on PIL images.
DEVICE_RA_OPS: Dict[str, Callable] = {
    'AutoContrast': _no_arg(D.autocontrast), 'Equalize': _no_arg(D.equalize), 'Invert': _no_arg(D.invert),
    'Posterize': D.posterize, 'PosterizeIncreasing': D.posterize,
    'PosterizeOriginal': D.posterize,
    'Solarize': D.solarize, 'SolarizeIncreasing': D.solarize,
    'SolarizeAdd': D.solarize_add,
    'Color': D.saturation, 'ColorIncreasing': D.saturation,
    'Contrast': D.contrast, 'ContrastIncreasing': D.contrast,
    'Brightness': D.brightness, 'BrightnessIncreasing': D.brightness,
    'Sharpness': D.sharpness, 'SharpnessIncreasing': D.sharpness,
    'Desaturate': _desaturate,
}
# RandAugment's geometric ops go through augment.device_geometry.affine instead: one affine map per image and layer.
GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


def unsupported(aug: AugConfig, mixup: Optional[MixupConfig], packing: bool = True) -> List[str]:
    """What of this configuration has no device version (empty: ``--device-aug`` can run it)."""
    out = []
    if aug.aa:
        ra = RandAugment(aug.aa, interpolation=aug.ra_interpolation or aug.interpolation)
        missing = [name for name in ra.spec.ops if name not in DEVICE_RA_OPS and name not in GEOMETRIC]
        if missing:
            out.append(f"RandAugment ops {', '.join(missing)} of --aa {aug.aa}")
        if any(name in GEOMETRIC for name in ra.spec.ops) and 'nearest' in {m.value for m in ra.interps}:
            out.append('nearest resampling of RandAugment\'s Rotate/Shear')
    if not set(aug.interpolations()) <= {'bilinear', 'bicubic'}:
        out.append(f'--train-interpolation {aug.interpolation} (bilinear, bicubic, random only)')
    if aug.gaussian_blur_prob > 0:
        out.append('--gaussian-blur-prob')
    if not packing:
        out.append("timm's padded layout (--no-naflex-packing)")
    return out


def reduce_sources(buf: torch.Tensor, stages: torch.Tensor, order: torch.Tensor,
                   stage_pixels: List[int]) -> torch.Tensor:
    """Every image reduced by its power of two: per stage, each output pixel is the rounded mean of the 2x2 source
    pixels it covers (fewer at an odd edge) where the image halves, a copy where it does not. ``buf``: the stage-1
    source elements (uint8: the planar JPEG block, then HWC images), ``stages`` int64 [S, B, 10]
    (loaders.device_worker._stages), ``order`` int64 [B] the images in buffer order, ``stage_pixels`` the host's
    output pixel counts. Returns uint8 [N, 3]: HWC pixels, images back to back."""
    for k, total in enumerate(stage_pixels):
        out_off, out_h, out_w = stages[k, :, 7], stages[k, :, 8], stages[k, :, 9]
        n = torch.arange(total, device=buf.device)
        ends = (out_off + out_h * out_w).index_select(0, order)  # in buffer order, where they increase
        img = order.index_select(0, torch.searchsorted(ends, n, right=True))
        # each pixel's row of the table: in offset, in h, in w, strides c / y / x, halve, out offset, out h, out w
        in_off, h, w, sc, sy, sx, halve, off, _, ow = stages[k].index_select(0, img).unbind(1)
        local = n - off
        y = torch.div(local, ow, rounding_mode='floor')
        x = local - y * ow
        f = 1 + halve
        base = in_off.unsqueeze(1) + torch.arange(C, device=buf.device) * sc.unsqueeze(1)  # [N, 3]
        acc = torch.zeros(total, C, dtype=torch.int32, device=buf.device)
        count = torch.zeros(total, 1, dtype=torch.int32, device=buf.device)
        for dy in (0, 1):
            for dx in (0, 1):
                yy, xx = y * f + dy, x * f + dx
                ok = (yy < h) & (xx < w)
                if dy or dx:
                    ok &= halve.bool()
                index = base + (torch.minimum(yy, h - 1) * sy + torch.minimum(xx, w - 1) * sx).unsqueeze(1)
                acc += buf.index_select(0, index.view(-1)).view(total, C) * ok.unsqueeze(1)
                count += ok.unsqueeze(1)
        buf = torch.div(acc + count // 2, count, rounding_mode='floor').to(torch.uint8).view(-1)
    return buf.view(-1, C)


def _resize_params(t: Dict[str, torch.Tensor], stages: torch.Tensor, plan: HostPlan) -> ResizeParams:
    """The resize's per-image tensors, all made on the device from the shipped ones."""
    last = stages[-1]
    return ResizeParams(offset_B=last[:, 7], height_B=last[:, 8], width_B=last[:, 9], box_B4=t['box'],
                        grid_B2=t['grid'], bicubic_B=t['bicubic'], flip_B=t['hflip'], patch_size=plan.patch_size,
                        num_tokens=plan.num_tokens, max_seqlen=plan.max_seqlen)


def join_decoded(decoded: List[torch.Tensor], device) -> torch.Tensor:
    """uint8 [3, J]: the decoded JPEGs ([3, h, w] each, in the plan's order) side by side, one channel per row. One
    copy kernel whatever their memory layout: ``reshape(3, -1)`` is a view of a CHW image and of an HWC one alike
    (libjpeg's output on the CPU is HWC memory seen as CHW, nvJPEG's is CHW)."""
    if not decoded:
        return torch.empty(C, 0, dtype=torch.uint8, device=device)
    return torch.cat([x.reshape(C, -1) for x in decoded], dim=1)


def augment_step(planar: torch.Tensor, t: Dict[str, torch.Tensor], plan: HostPlan,
                 generator: Optional[torch.Generator] = None) -> Dict:
    """The packed uint8 batch from the decoded JPEGs (``join_decoded``) and the shipped parameters ``t`` (on the
    device): module docstring, steps 2-5. ``generator``: on the device, for random erasing's values."""
    buf = torch.cat([planar.view(-1), t['pixels']])
    stages = t['stages']
    src = reduce_sources(buf, stages, t['source_order'], plan.stage_pixels)
    lay = packed_layout(t['grid'], plan.num_tokens)
    out = resize_to_packed(src, _resize_params(t, stages, plan), plan.taps, lay)
    layout = D.PackedLayout(lay['seg_T'], out['patch_coord'][:, 0].long(), out['patch_coord'][:, 1].long(),
                            t['grid'], out['cu_seqlens'][:-1].long(), plan.patch_size)
    x = out['patches']
    if plan.any_vflip:
        x = D.vflip(x, layout, t['vflip'])
    for k in range(plan.ra_layers):  # each image has one op (or none) per layer: their order within it is free
        op_B, arg_B = t['ra_op'][:, k], t['ra_arg'][:, k]
        if plan.affine_layers[k]:
            x = G.affine(x, layout, t['ra_affine'][:, k], t['ra_matrix'][:, k], t['ra_bicubic'][:, k], t['fill'],
                         filters=plan.affine_filters)
        for name in plan.ra_ops:
            x = DEVICE_RA_OPS[name](x, layout, op_B == RA_OP_INDEX[name], arg_B)
    if plan.any_jitter:
        x = D.color_jitter(x, layout, t['jitter_apply'], t['jitter_order'], t['jitter_factor'], t['jitter_active'],
                           with_hue=plan.jitter_hue)
    if plan.any_grayscale:
        x = D.grayscale(x, layout, t['grayscale'])
    if plan.mix is not None:
        x = M.mix(x, layout, t['mix_partner'], t['mix_cutmix'], t['mix_lam'], t['mix_box'])
    if plan.any_erasing:
        x = M.erase(x, layout, t['erase_boxes'], plan.erase_mode, t['erase_mean'], t['erase_std'], generator)
    out['patches'] = x
    return out


class DeviceAugmenter:
    """Turns the host step of loaders.device_worker into the packed uint8 batch on ``device`` (the prefetcher then
    normalises it). A JPEG whose header parsed but whose data the device cannot decode is known only here, after the
    workers are done with the step: a grey image of its size stands in (the CPU path would have drawn another sample),
    a warning names it, and the step's ``bad_files`` lists it (the epoch's count in summary.csv includes it)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)  # erasing values, seeded per step from its draws

    def decode(self, jpeg: torch.Tensor, plan: HostPlan) -> Tuple[List[torch.Tensor], List[str]]:
        """The step's JPEGs decoded on the device (CHW uint8, full size), and the paths of any that failed."""
        from torchvision.io import ImageReadMode, decode_jpeg
        if not plan.jpeg_lengths:
            return [], []
        parts = list(torch.split(jpeg, plan.jpeg_lengths))
        try:
            out = decode_jpeg(parts, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # one broken file fails the batch: decode one by one to find it
            out = [self._decode_one(p, hw) for p, hw in zip(parts, plan.jpeg_hw)]
        bad = []
        for i, (x, hw) in enumerate(zip(out, plan.jpeg_hw)):
            if x is None or tuple(x.shape) != (C, *hw):
                bad.append(plan.jpeg_paths[i])
                out[i] = torch.full((C, *hw), 128, dtype=torch.uint8, device=self.device)
                _logger.warning(f'--device-aug: {plan.jpeg_paths[i]} could not be decoded on {self.device} (its header '
                                'could); a grey image stands in for it in this step')
        return out, bad

    def _decode_one(self, data: torch.Tensor, hw) -> Optional[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None

    def __call__(self, inputs: Dict, copy: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict:
        """``inputs`` of a device-path step (host tensors) -> the packed batch on the device (uint8 patches).
        ``copy`` moves a host tensor to the device (the prefetcher's pinned, non-blocking copy)."""
        copy = copy or (lambda v: v.to(self.device))
        inputs = dict(inputs)
        plan: HostPlan = inputs.pop('device_aug_plan')
        missing = [name for name in plan.ra_ops if name not in DEVICE_RA_OPS] + ['Gaussian blur'] * plan.any_blur
        if missing:  # train.py refuses such a configuration up front (unsupported); a library caller learns here
            raise ValueError(f'--device-aug: no device version of {", ".join(missing)}')
        t = dict(inputs.pop('device_aug'))
        jpeg = t.pop('jpeg')  # decode_jpeg reads the bytes from host memory
        t = {k: copy(v) for k, v in t.items()}
        decoded, bad = self.decode(jpeg, plan)
        self.generator.manual_seed(plan.fill_seed)
        out = augment_step(join_decoded(decoded, self.device), t, plan, self.generator)
        for k in ('seq_len', 'bad_files'):
            if k in inputs:
                out[k] = inputs[k]
        out['bad_files'] = list(out.get('bad_files', [])) + bad
        return out
