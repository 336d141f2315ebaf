"""Image decoding for the NaFlex pipeline: any PIL-readable file -> RGB, cropped and resized in one step.

NaViT (arXiv:2307.06304) / SigLIP 2 NaFlex (arXiv:2502.14786) resize every image to a patch grid that fits
a sequence length, often far below the source resolution. ``decode_resized`` therefore takes the crop box
(in full-resolution coordinates) and the output size *before* decoding, so a JPEG can be decoded
with a reduced DCT (Pillow ``draft``, 1/2, 1/4, 1/8) when the output is at least 2x smaller; the box is
rescaled to the reduced image with float precision, so the same scene region is covered (only the
resampling differs: training uses it unless ``--no-jpeg-draft``; eval never does, so its pixels are timm's).

EXIF orientation: off by default, like timm (whose readers hand ``Image.open(f).convert('RGB')`` to the
transforms), so a checkpoint sees the pixels it was trained and scored on in timm. ``exif_orientation=True``
(``--exif-orientation``) turns each image upright first; all coordinates are then in the upright image.

Mode handling: L, LA, P (palette, with or without transparency), RGBA, CMYK, YCbCr, I;16*/I/F -> RGB.
Alpha is dropped like torchvision/timm's ``convert('RGB')`` (labels/checkpoints stay comparable); 16-bit
and 32-bit grey are scaled to 8 bits instead of being clipped.
"""
from __future__ import annotations

import io
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from augment.stages import StageHook, stage

# EXIF orientations 5..8 swap width and height.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)

PIL_INTERP = {
    'nearest': Image.Resampling.NEAREST,
    'bilinear': Image.Resampling.BILINEAR,
    'bicubic': Image.Resampling.BICUBIC,
    'lanczos': Image.Resampling.LANCZOS,
    'box': Image.Resampling.BOX,
    'hamming': Image.Resampling.HAMMING,
}


class UndecodableImage(Exception):
    """Reading or decoding an image file failed: missing or unreadable, not an image, truncated, no pixels,
    a pixel mode that cannot become RGB. Only this is a "bad file" that the loaders replace (train) or drop
    (eval) and report; any other exception while building a sample is a bug or a bad setting and propagates."""


def resample_filter(interpolation: str) -> Image.Resampling:
    """Pillow's filter for an interpolation name (a ValueError listing the names, not a bad file)."""
    try:
        return PIL_INTERP[interpolation]
    except KeyError:
        raise ValueError(f"unknown interpolation {interpolation!r}; valid: {', '.join(PIL_INTERP)}") from None


def read_encoded(path) -> bytes:
    """The encoded image bytes: ``path.read_bytes()`` where the source reads itself (a member of a tar shard),
    else the whole file in one read."""
    if hasattr(path, 'read_bytes'):
        return path.read_bytes()
    with open(path, 'rb') as f:
        return f.read()


def open_image(path, exif_orientation: bool = False) -> Tuple[Image.Image, int, int, int]:
    """Open lazily (header only). Returns (img, h, w, orientation): the size of the image as it will be decoded
    (upright when ``exif_orientation`` and the file has an orientation tag) and the tag applied (1 = none);
    UndecodableImage if the file cannot be read or is not an image.

    The file is read in one call and decoded from memory (PIL would otherwise issue dozens of small reads
    per JPEG), which also leaves no open file handle behind. ``path`` may also be anything with
    ``read_bytes()`` (a ``pathlib.Path``, a tar member: loaders.shards.ShardMember).
    """
    try:
        data = read_encoded(path)
    except Exception as e:  # OSError (missing, unreadable, a cut shard)
        raise UndecodableImage(f'{type(e).__name__}: {e}') from e
    return open_bytes(data, exif_orientation)


def open_bytes(data: bytes, exif_orientation: bool = False) -> Tuple[Image.Image, int, int, int]:
    """``open_image`` of encoded bytes already read (the device path ships them on)."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:  # its own text names the in-memory buffer, not the file
        raise UndecodableImage('empty file' if not data else 'not an image format Pillow can read') from e
    except Exception as e:  # OSError (a cut file), PIL's DecompressionBombError, ...
        raise UndecodableImage(f'{type(e).__name__}: {e}') from e
    orientation = 1
    if exif_orientation:
        try:
            orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
        except Exception:  # malformed EXIF must not make a decodable image "bad"
            orientation = 1
    w, h = img.size
    if orientation in _TRANSPOSED:
        h, w = w, h
    if h <= 0 or w <= 0:
        img.close()
        raise UndecodableImage(f"image has no pixels: {w}x{h}")
    return img, h, w, orientation


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB (see module docstring)."""
    mode = img.mode
    if mode == 'RGB':
        return img
    if mode == 'P':
        img = img.convert('RGBA' if 'transparency' in img.info else 'RGB')
        mode = img.mode
        if mode == 'RGB':
            return img
    if mode.startswith('I;16') or mode in ('I', 'F'):
        arr = np.asarray(img)
        if mode.startswith('I;16'):
            arr8 = (arr.astype(np.uint32) >> 8).astype(np.uint8)
        else:
            arr = arr.astype(np.float64)
            top = 65535.0 if arr.max(initial=0) > 255 else 255.0
            arr8 = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr8, mode='L').convert('RGB')
    return img.convert('RGB')


def decode_resized(
        path,
        box: Optional[Tuple[float, float, float, float]],
        out_hw: Tuple[int, int],
        interpolation: str = 'bicubic',
        draft: bool = True,
        opened: Optional[Tuple[Image.Image, int, int, int]] = None,
        timer: Optional[StageHook] = None,
) -> Image.Image:
    """Decode ``path`` and return the region ``box`` = (top, left, height, width) of the image resized to
    ``out_hw`` = (h, w) as an RGB PIL image. ``box=None`` means the whole image.

    ``opened`` is the result of :func:`open_image` if the caller already has it (to sample the crop; it also
    decides EXIF orientation). ``timer``: optional stage hook, called as 'decode' and 'crop + resize'.
    A bad interpolation name is a ValueError (the caller's mistake), never UndecodableImage.
    """
    resample = resample_filter(interpolation)
    src, h, w, orientation = opened if opened is not None else open_image(path)
    try:
        with stage(timer, 'decode'):
            img = _decode(src, orientation, _draft_size(src, h, w, box, out_hw, draft))
        with stage(timer, 'crop + resize'):
            return _crop_resize(img, h, w, box, out_hw, resample)
    finally:
        src.close()  # release the file's memory now, also when decoding fails


def _draft_size(img, h, w, box, out_hw, draft):
    """The JPEG draft request (reduced-DCT size) for this crop and output, or None."""
    _, _, ch, cw = box if box is not None else (0, 0, h, w)
    if not (draft and img.format == 'JPEG'):
        return None
    # Smallest DCT scale whose (upright) image still has >= out pixels across the crop.
    s = max(out_hw[0] / ch, out_hw[1] / cw)
    if s > 0.5:
        return None
    raw_w, raw_h = img.size
    # The scale is the same on both axes, so EXIF orientation does not matter here.
    return max(1, int(np.ceil(raw_w * s))), max(1, int(np.ceil(raw_h * s)))


def _decode(img, orientation, draft_size):
    """The whole image in RGB, upright when ``orientation`` != 1, reduced by JPEG draft when ``draft_size`` is
    set; every failure here comes from the file's content (UndecodableImage)."""
    try:
        if draft_size is not None:
            try:
                img.draft('RGB', draft_size)
            except Exception:
                pass
        img.load()
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except Exception as e:  # truncated data, broken chunks, unsupported mode, ...
        raise UndecodableImage(f'{type(e).__name__}: {e}') from e


def _crop_resize(img, h, w, box, out_hw, resample):
    top, left, ch, cw = box if box is not None else (0, 0, h, w)
    out_h, out_w = out_hw
    # Box in the (possibly reduced) image.
    sy, sx = img.height / h, img.width / w
    pil_box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
    if pil_box == (0, 0, img.width, img.height) and (out_w, out_h) == img.size:
        return img.copy() if img.mode == 'RGB' else img
    return img.resize((out_w, out_h), resample=resample, box=pil_box)


def pil_to_hwc(img: Image.Image):
    """RGB PIL image -> uint8 torch tensor [H, W, 3] (HWC is already the P-P-C order patches need)."""
    import torch
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
