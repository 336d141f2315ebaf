"""Synthetic, learnable demo dataset in ImageNet folder layout (train/<class>/*.jpg, val/<class>/*.jpg).

Why: the quick start (scripts/demo.sh) and the tests need real JPEG files with *varied sizes and aspect
ratios* -- the whole point of NaFlex (native aspect ratio, variable sequence length; NaViT arXiv:2307.06304,
SigLIP 2 arXiv:2502.14786) -- without any download. Each class is a pattern (disk, square, stripes, checker...)
drawn in a class-specific hue band on a random background, so its label is visible at any resolution and at
any crop: a tiny ViT learns it in minutes on a CPU.

Pure function of its arguments: the same (num_classes, per_class, val_per_class, seed, sizes) always give the
same files, byte for byte (one RNG per image, seeded from (seed, split, class, index)).
"""
from __future__ import annotations

import colorsys
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["PATTERNS", "class_names", "make_demo_dataset", "render_image"]

PATTERNS = (
    "disk", "square", "triangle", "cross", "ring",
    "hstripes", "vstripes", "checker", "diagonal", "dots",
)


def class_names(num_classes: int) -> list[str]:
    """Folder names, sorted like torchvision's ImageFolder sorts them (so label index == position)."""
    return [f"{i:02d}_{PATTERNS[i % len(PATTERNS)]}" for i in range(num_classes)]


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def render_image(class_idx: int, num_classes: int, width: int, height: int, rng: random.Random) -> Image.Image:
    """Draw one RGB image of class ``class_idx``: pattern PATTERNS[idx % 10] in hue band idx / num_classes."""
    pattern = PATTERNS[class_idx % len(PATTERNS)]
    band = 1.0 / num_classes
    hue = class_idx * band + rng.uniform(-0.3, 0.3) * band
    fg = _rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0))
    bg = _rgb(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.05, 0.45))
    img = Image.new("RGB", (width, height), bg)
    d = ImageDraw.Draw(img)
    short = min(width, height)
    if pattern in ("disk", "square", "triangle", "cross", "ring"):
        # One object, 45-85% of the short side, anywhere it fits.
        s = max(6, int(short * rng.uniform(0.45, 0.85)))
        x0 = rng.randint(0, width - s)
        y0 = rng.randint(0, height - s)
        box = (x0, y0, x0 + s - 1, y0 + s - 1)
        if pattern == "disk":
            d.ellipse(box, fill=fg)
        elif pattern == "square":
            d.rectangle(box, fill=fg)
        elif pattern == "triangle":
            d.polygon([(x0 + s / 2, y0), (x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1)], fill=fg)
        elif pattern == "cross":
            t = max(2, s // 3)
            d.rectangle((x0 + (s - t) // 2, y0, x0 + (s + t) // 2, y0 + s - 1), fill=fg)
            d.rectangle((x0, y0 + (s - t) // 2, x0 + s - 1, y0 + (s + t) // 2), fill=fg)
        else:  # ring
            d.ellipse(box, outline=fg, width=max(2, s // 7))
    else:
        # Textures fill the image; the period scales with the image so it stays visible at any resolution.
        period = max(6, int(short * rng.uniform(0.12, 0.25)))
        half = max(2, period // 2)
        if pattern == "hstripes":
            for y in range(rng.randint(0, period), height, period):
                d.rectangle((0, y, width, y + half - 1), fill=fg)
        elif pattern == "vstripes":
            for x in range(rng.randint(0, period), width, period):
                d.rectangle((x, 0, x + half - 1, height), fill=fg)
        elif pattern == "checker":
            for yi, y in enumerate(range(0, height, half)):
                for xi, x in enumerate(range(0, width, half)):
                    if (xi + yi) % 2 == 0:
                        d.rectangle((x, y, x + half - 1, y + half - 1), fill=fg)
        elif pattern == "diagonal":
            w = max(1, int(period * 0.35))  # the stripe spacing across the lines is period / sqrt(2)
            for c in range(-height, width + height, period):
                d.line([(c, 0), (c + height, height)], fill=fg, width=w)
        else:  # dots
            r = max(1, period // 4)
            for y in range(period // 2, height, period):
                for x in range(period // 2, width, period):
                    d.ellipse((x - r, y - r, x + r, y + r), fill=fg)
    # Mild sensor-like noise so images are not trivially compressible / identical in flat regions.
    noise_rng = np.random.default_rng(rng.getrandbits(32))
    arr = np.asarray(img, dtype=np.int16) + noise_rng.integers(-12, 13, size=(height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _draw_size(rng: random.Random, min_size: int, max_size: int, max_aspect: float = 4.0) -> tuple[int, int]:
    """Width and height drawn independently from [min_size, max_size], redrawn until the aspect is <= 4:1."""
    while True:
        w, h = rng.randint(min_size, max_size), rng.randint(min_size, max_size)
        if max(w, h) <= max_aspect * min(w, h):
            return w, h


def make_demo_dataset(
        out_dir,
        num_classes: int = 10,
        per_class: int = 60,
        val_per_class: int = 20,
        seed: int = 0,
        min_size: int = 32,
        max_size: int = 256,
        quality: int = 90,
) -> Path:
    """Write train/ and val/ JPEGs under ``out_dir`` and return it as a Path.

    Width and height are drawn independently from [min_size, max_size] (aspect ratio capped at 4:1), so
    sizes and aspect ratios vary. Existing files with the same names are overwritten.
    """
    if num_classes < 1 or per_class < 0 or val_per_class < 0:
        raise ValueError("num_classes must be >= 1 and per-class counts >= 0")
    if not 8 <= min_size <= max_size:
        raise ValueError(f"need 8 <= min_size <= max_size, got {min_size}, {max_size}")
    out = Path(out_dir)
    names = class_names(num_classes)
    for split_idx, (split, count) in enumerate((("train", per_class), ("val", val_per_class))):
        for c, name in enumerate(names):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = random.Random(f"{seed}/{split_idx}/{c}/{i}")
                w, h = _draw_size(rng, min_size, max_size)
                img = render_image(c, num_classes, w, h, rng)
                img.save(folder / f"{split}_{c:02d}_{i:05d}.jpg", quality=quality)
    return out
