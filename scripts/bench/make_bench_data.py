#!/usr/bin/env python3
"""Make benchmark images with no network and no dataset: photo-like JPEGs with ImageNet's sizes, in its folder layout.

Command (~3 s for the defaults on 16 cores, ~20 s on 2 idle ones: ~17 ms of CPU per image):
    python scripts/bench/make_bench_data.py OUT_DIR [--train 2048 --val 256 --classes 32 --seed 0 -j CPUS] [--repeat K]
``--repeat K`` lists every train image K times (K - 1 symlinks ``NNNNNN_rK.JPEG`` beside it): an epoch K times as
long, for loaders with many workers to reach steady state, at no extra generation time or disk.
Writes OUT_DIR/{train,val}/c000/000000.JPEG ... (image i is in class i % classes) and OUT_DIR/stats.json (counts,
sizes, bytes per pixel, seconds, the generator's parameters), and prints one summary line. An OUT_DIR that exists
and is not empty is refused (exit 2). Image i of a split is a pure function of (seed, split, i, classes): the same
seed and counts give the same bytes for any -j.

Sizes, modelled on ImageNet-1k train (most images 500 px on the long side, 500x375 and 500x333 typical, a tail of
small ones and a few large ones): long side 500 with p=0.6, log-uniform in [160, 500] with p=0.3, log-uniform in
[500, 1600] with p=0.1; long/short aspect 4:3 (p=0.5), 3:2 (0.15), 1:1 (0.1), 16:9 (0.05), log-uniform in
[1, 2.5] (0.2); portrait with p=0.25; sides rounded, at least 32 px. Mean about 450x385, median 500x375.

Content, so that JPEG size and decode cost resemble photographs: a two-colour gradient under 8-30 smooth-edged
ellipses and rectangles, each region with its own colour and texture strength; a luminance texture of 1/f-amplitude
noise (the spectrum of natural images; numpy FFT, at most 1024 px on the long side, upsampled beyond), weaker 1/f
chroma noise at half resolution, a small per-class tint, and a soft shoulder instead of clipping at 0 and 255.
JPEG quality uniform in [75, 95], 4:2:0, no optimize: about 0.55 bytes per pixel, ~105 KiB per image.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val")
# (probability, low, high): a component draws log-uniformly in [low, high]; low == high is a fixed value.
LONG_SIDE_MIXTURE = ((0.6, 500, 500), (0.3, 160, 500), (0.1, 500, 1600))
ASPECT_MIXTURE = ((0.5, 4 / 3, 4 / 3), (0.15, 1.5, 1.5), (0.1, 1.0, 1.0), (0.05, 16 / 9, 16 / 9), (0.2, 1.0, 2.5))
PORTRAIT_PROB = 0.25
MIN_SIDE = 32
QUALITY_RANGE = (75, 95)  # inclusive
NOISE_MAX_SIDE = 1024     # the noise fields are made at most this large and upsampled beyond
NOISE_LOW_CUT = 4.0       # cycles per image below which the noise spectrum is flat
LUMA_NOISE_STD = 70.0     # grey levels; sets the JPEG bytes per pixel (texture strength of a region multiplies it)
CHROMA_NOISE_STD = 12.0
SHAPES_RANGE = (8, 30)    # ellipses and rectangles per image, inclusive
TEXTURE_RANGE = (0.25, 2.0)  # texture strength of a region (multiplies LUMA_NOISE_STD), log-uniform
TINT_LEVELS = 12.0        # per-class colour offset, grey levels


def _draw_mixture(rng: np.random.Generator, mixture) -> float:
    probs = np.array([m[0] for m in mixture])
    _, lo, hi = mixture[int(rng.choice(len(mixture), p=probs / probs.sum()))]
    return float(lo) if lo == hi else float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) from the ImageNet-like mixtures above."""
    long_side = _draw_mixture(rng, LONG_SIDE_MIXTURE)
    aspect = _draw_mixture(rng, ASPECT_MIXTURE)
    long_px, short_px = max(MIN_SIDE, round(long_side)), max(MIN_SIDE, round(long_side / aspect))
    return (short_px, long_px) if rng.random() < PORTRAIT_PROB else (long_px, short_px)


def _pink_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Zero-mean, unit-std float32 field whose amplitude falls as 1/f above NOISE_LOW_CUT cycles per image (flat
    below: the gradient and the shapes make the coarsest structure). Made at most NOISE_MAX_SIDE large."""
    scale = min(1.0, NOISE_MAX_SIDE / max(height, width))
    h, w = max(8, round(height * scale)), max(8, round(width * scale))
    f_y = np.fft.fftfreq(h).astype(np.float32)[:, None]
    f_x = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    amp = 1.0 / np.maximum(np.sqrt(f_y * f_y + f_x * f_x), np.float32(NOISE_LOW_CUT / max(h, w)))
    amp[0, 0] = 0.0
    shape = (h, w // 2 + 1)
    spec = np.empty(shape, dtype=np.complex64)
    spec.real = rng.standard_normal(shape, dtype=np.float32) * amp
    spec.imag = rng.standard_normal(shape, dtype=np.float32) * amp
    field = np.fft.irfft2(spec, s=(h, w))
    field *= np.float32(1.0 / (field.std() + 1e-8))
    if (h, w) != (height, width):
        field = np.asarray(Image.fromarray(field).resize((width, height), Image.BICUBIC))
    return field


def _tone_curve(offset: int = 256) -> np.ndarray:
    """uint8 lookup table for values -offset..255+offset: linear in [32, 224], a soft shoulder beyond rather than
    clipping, so that texture stays in bright and dark regions as in photographs."""
    d = np.arange(-offset, 256 + offset, dtype=np.float64) - 127.5
    over = np.maximum(np.abs(d) - 96.0, 0.0)
    d -= np.copysign(over - 32.0 * np.tanh(over / 32.0), d)
    return np.clip(np.round(d + 127.5), 0, 255).astype(np.uint8)


_TONE_OFFSET = 256
_TONE_CURVE = _tone_curve(_TONE_OFFSET)


def _class_tint(label: int, num_classes: int) -> np.ndarray:
    """An RGB offset whose hue goes round the colour circle with the class index, shape (3, 1, 1)."""
    angle = 2 * np.pi * label / max(1, num_classes)
    tint = [np.cos(angle), np.cos(angle - 2 * np.pi / 3), np.cos(angle + 2 * np.pi / 3)]
    return (TINT_LEVELS * np.array(tint, dtype=np.float32))[:, None, None]


def _uniform(rng: np.random.Generator, low: float, high: float, size=None):
    return rng.uniform(low, high, size).astype(np.float32) if size else np.float32(rng.uniform(low, high))


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> np.float32:
    return np.float32(np.exp(rng.uniform(np.log(low), np.log(high))))


def make_image(rng: np.random.Generator, width: int, height: int, label: int = 0, num_classes: int = 1) -> np.ndarray:
    """One photo-like (height, width, 3) uint8 image: gradient + soft shapes + 1/f texture + class tint.
    Works on (3, height, width) float32 planes; each shape only touches its bounding box."""
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    # background: a linear gradient between two colours in a random direction
    theta = rng.uniform(0, 2 * np.pi)
    ramp = np.float32(np.cos(theta) / width) * x + np.float32(np.sin(theta) / height) * y
    ramp = (ramp - ramp.min()) * np.float32(1.0 / (ramp.max() - ramp.min() + 1e-6))
    c0, c1 = _uniform(rng, 30, 225, 3)[:, None, None], _uniform(rng, 30, 225, 3)[:, None, None]
    rgb = c0 + (c1 - c0) * ramp  # (3, H, W)
    gain = np.full((height, width), _log_uniform(rng, *TEXTURE_RANGE), dtype=np.float32)  # texture strength
    # objects: smooth-edged ellipses and rectangles, each with a colour and a texture strength
    for _ in range(int(rng.integers(SHAPES_RANGE[0], SHAPES_RANGE[1] + 1))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        size = _log_uniform(rng, 0.03, 0.4)  # radius, as a fraction of the image side
        rx, ry = size * width * _log_uniform(rng, 0.5, 2), size * height * _log_uniform(rng, 0.5, 2)
        rot = rng.uniform(0, np.pi)
        ellipse, edge = rng.random() < 0.6, rng.uniform(0.01, 0.15)  # soft edge, as a fraction of the size
        colour, strength = _uniform(rng, 30, 225, 3)[:, None, None], _log_uniform(rng, *TEXTURE_RANGE)
        cos, sin = np.cos(rot), np.sin(rot)
        if ellipse:  # half extents of the rotated shape's bounding box
            half_x, half_y = np.hypot(rx * cos, ry * sin), np.hypot(rx * sin, ry * cos)
        else:
            half_x, half_y = rx * abs(cos) + ry * abs(sin), rx * abs(sin) + ry * abs(cos)
        y0, y1 = max(0, int(cy - half_y)), min(height, int(cy + half_y) + 1)
        x0, x1 = max(0, int(cx - half_x)), min(width, int(cx + half_x) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        dx, dy = x[:, x0:x1] - np.float32(cx), y[y0:y1] - np.float32(cy)
        u = dx * np.float32(cos / rx) + dy * np.float32(sin / rx)  # shape coordinates: |u|, |v| <= 1 inside
        v = dy * np.float32(cos / ry) - dx * np.float32(sin / ry)
        if ellipse:
            u *= u
            v *= v
            u += v
            dist = np.sqrt(u, out=u)
        else:
            dist = np.maximum(np.abs(u, out=u), np.abs(v, out=v), out=u)
        alpha = np.clip((np.float32(1.0) - dist) * np.float32(1 / edge), 0.0, 1.0, out=dist)
        box = rgb[:, y0:y1, x0:x1]
        box += alpha * (colour - box)
        gbox = gain[y0:y1, x0:x1]
        gbox += alpha * (strength - gbox)
    # texture: luminance noise (the same in R, G, B: the channels of photos are strongly correlated) + weaker chroma
    gain *= _pink_noise(rng, height, width)
    gain *= np.float32(LUMA_NOISE_STD)
    rgb += gain
    ch, cw = max(8, (height + 1) // 2), max(8, (width + 1) // 2)
    for channel in (0, 2):  # two chroma fields at half resolution: +R -G/2 and +B -G/2
        plane = _pink_noise(rng, ch, cw) * np.float32(CHROMA_NOISE_STD)
        plane = plane.repeat(2, axis=0).repeat(2, axis=1)[:height, :width]
        rgb[channel] += plane
        rgb[1] -= np.float32(0.5) * plane
    rgb += _class_tint(label, num_classes)
    rgb += np.float32(_TONE_OFFSET + 0.5)
    np.clip(rgb, 0, len(_TONE_CURVE) - 1, out=rgb)
    return np.ascontiguousarray(_TONE_CURVE[rgb.astype(np.int16).transpose(1, 2, 0)])


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence((seed, SPLITS.index(split), index)))


def encode_image(seed: int, split: str, index: int, num_classes: int) -> tuple[bytes, int, int]:
    """(JPEG bytes, width, height) of image ``index`` of ``split``: a pure function of its arguments."""
    rng = _image_rng(seed, split, index)
    width, height = image_size(rng)
    pixels = make_image(rng, width, height, index % num_classes, num_classes)
    quality = int(rng.integers(QUALITY_RANGE[0], QUALITY_RANGE[1] + 1))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality, optimize=False, subsampling=2)
    return buf.getvalue(), width, height


def _class_name(label: int) -> str:
    return f"c{label:03d}"


def _write_one(job) -> tuple[int, int, int]:
    out_dir, seed, split, index, num_classes = job
    data, width, height = encode_image(seed, split, index, num_classes)
    (Path(out_dir) / split / _class_name(index % num_classes) / f"{index:06d}.JPEG").write_bytes(data)
    return width, height, len(data)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (other load on the machine does not count)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _parameters() -> dict:
    return {"long_side_mixture": LONG_SIDE_MIXTURE, "aspect_mixture": ASPECT_MIXTURE,
            "portrait_prob": PORTRAIT_PROB, "min_side": MIN_SIDE, "quality_range": QUALITY_RANGE,
            "noise_max_side": NOISE_MAX_SIDE, "noise_low_cut": NOISE_LOW_CUT, "luma_noise_std": LUMA_NOISE_STD,
            "chroma_noise_std": CHROMA_NOISE_STD, "shapes_range": SHAPES_RANGE,
            "texture_range": TEXTURE_RANGE, "tint_levels": TINT_LEVELS, "subsampling": "4:2:0"}


def make_dataset(out_dir, train: int = 2048, val: int = 256, classes: int = 32, seed: int = 0,
                 workers: int | None = None) -> dict:
    """Write ``train`` + ``val`` images under ``out_dir`` and stats.json; return the stats.
    Raises FileExistsError when ``out_dir`` exists and is not an empty folder."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; give a new or empty one")
    if classes < 1 or train < 0 or val < 0:
        raise ValueError(f"need classes >= 1 and counts >= 0, got classes={classes} train={train} val={val}")
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    counts = {"train": train, "val": val}
    workers = max(1, min(workers or os.cpu_count() or 1, train + val))
    for split, n in counts.items():
        for label in range(min(n, classes)):
            (out / split / _class_name(label)).mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), seed, split, i, classes) for split, n in counts.items() for i in range(n)]
    if workers == 1:
        results = [_write_one(job) for job in jobs]
    else:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        pool = ctx.Pool(workers)
        try:
            results = pool.map(_write_one, jobs, chunksize=max(1, len(jobs) // (workers * 8)))
            pool.close()
        finally:
            pool.terminate()
            pool.join()  # reaped workers count in RUSAGE_CHILDREN below
    seconds = time.perf_counter() - t0
    cpu_seconds = _cpu_seconds() - cpu0
    sizes = np.array([r[:2] for r in results], dtype=np.float64).reshape(-1, 2)
    nbytes = np.array([r[2] for r in results], dtype=np.float64)
    pixels = sizes.prod(axis=1)
    num = len(results)
    stats = {
        "train": train, "val": val, "classes": classes, "seed": seed, "workers": workers, "images": num,
        "mean_width": float(sizes[:, 0].mean()) if num else 0.0,
        "mean_height": float(sizes[:, 1].mean()) if num else 0.0,
        "median_width": float(np.median(sizes[:, 0])) if num else 0.0,
        "median_height": float(np.median(sizes[:, 1])) if num else 0.0,
        "share_long_side_500": float((sizes.max(axis=1) == 500).mean()) if num else 0.0,
        "mean_bytes": float(nbytes.mean()) if num else 0.0,
        "bytes_per_pixel": float(nbytes.sum() / pixels.sum()) if num else 0.0,
        "total_bytes": int(nbytes.sum()),
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "parameters": _parameters(),
    }
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(stats, indent=2) + "\n"
    (out / "stats.json").write_text(text)
    return json.loads(text)  # what stats.json holds (lists, not tuples)


def add_repeats(out_dir, repeat: int) -> int:
    """K - 1 symlinks beside every train image (see the module docstring); returns the train entries now listed."""
    entries = 0
    for path in sorted((Path(out_dir) / "train").glob("*/*.JPEG")):
        entries += 1
        for k in range(1, repeat):
            (path.parent / f"{path.stem}_r{k}{path.suffix}").symlink_to(path.name)
            entries += 1
    return entries


def summary(out_dir, stats: dict) -> str:
    return (f"wrote {stats['images']} JPEGs ({stats['train']} train + {stats['val']} val, {stats['classes']} classes) "
            f"to {out_dir} in {stats['seconds']:.1f} s with {stats['workers']} worker{'s' * (stats['workers'] > 1)} "
            f"({stats['cpu_seconds']:.0f} CPU-s): "
            f"mean {stats['mean_width']:.0f}x{stats['mean_height']:.0f}, "
            f"median {stats['median_width']:.0f}x{stats['median_height']:.0f}, "
            f"{100 * stats['share_long_side_500']:.0f}% long side 500, {stats['mean_bytes'] / 1024:.0f} KiB/image, "
            f"{stats['bytes_per_pixel']:.2f} bytes/pixel, {stats['total_bytes'] / 2**20:.0f} MiB")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", help="output folder (must be new or empty)")
    p.add_argument("--train", type=int, default=2048, help="train images")
    p.add_argument("--val", type=int, default=256, help="val images")
    p.add_argument("--classes", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-j", "--workers", type=int, default=os.cpu_count(), help="processes (default: all CPUs)")
    p.add_argument("--repeat", type=int, default=1, help="list every train image this many times (symlinks)")
    a = p.parse_args(argv)
    try:
        if a.repeat < 1:
            raise ValueError(f"--repeat must be >= 1, got {a.repeat}")
        stats = make_dataset(a.out_dir, a.train, a.val, a.classes, a.seed, a.workers)
    except (FileExistsError, ValueError) as e:
        print(f"make_bench_data.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(summary(a.out_dir, stats))
    if a.repeat > 1:
        print(f"train/ lists {add_repeats(a.out_dir, a.repeat)} entries ({a.repeat} x {a.train} images, symlinks)")
    return stats


if __name__ == "__main__":
    main()
