"""Rotary position embeddings (RoPE) for NaFlexViT, computed per token from its patch coordinate.

RoPE (RoFormer, arXiv:2104.09864) rotates each query / key channel pair by an angle proportional to the token's
position; for images the position is the (y, x) patch coordinate (axial RoPE, as in EVA-02, arXiv:2303.11331).
timm 1.0.31's NaFlexViT offers four variants, reproduced here with its options and numerics:

- 'axial' (timm's ``RotaryEmbeddingCat``): integer coordinates (+ ``rope_grid_offset``, rescaled to
  ``rope_ref_feat_shape`` when set), frequencies ``temperature ** -(i / (head_dim / 4))`` per axis;
- 'mixed' (RoPE-Mixed, arXiv:2403.13298): learned frequencies per block and head, ``rope.freqs``
  [2, depth, heads, head_dim / 2], applied to integer coordinates;
- 'dinov3' (DINOv3, arXiv:2508.10104): coordinates centred in each image, normalised to [-1, 1], periods
  ``temperature ** (2i / (head_dim / 2))``;
- 'mrope' (Qwen2-VL's multimodal RoPE, interleaved): a temporal / height / width assignment of the frequency
  channels by ``rope_mrope_section``; the temporal position of an image is 0.

timm builds one table per distinct grid size (a host loop over the batch) and places row-major table rows at the
first h*w slots of each image. Here the angle of every token is a function of its own (y, x) and its image's grid
(h, w): one expression for image tensors, padded dicts and packed sequences, with no host sync and no loop over
images, so patch dropout only has to gather the coordinates with the kept tokens. Prefix (class / register) tokens
get coordinate 0 after the transform, i.e. angle 0: sin 0, cos 1, an exact identity, which is what timm's
"skip the first num_prefix_tokens" does.

Train-time coordinate augmentation (``rope_shift_coords``, ``rope_jitter_coords``, ``rope_rescale_coords``) follows
timm: per draw a shift U(-s, s) per axis, then a per-axis scale exp(U(-log J, log J)), then a shared scale
exp(U(-log R, log R)), in that RNG order, applied to the coordinates in the variant's own units. timm draws once
per distinct grid size of the batch, in order of first appearance (images of the same size share a draw; an image
tensor batch is one draw). This module keeps that rule without a host sync: it draws uniform numbers for every
image in one call and gives the k-th distinct grid size the k-th row, so on the CPU the values equal timm's; when
several images share a size it consumes more random numbers than timm (the rows it does not use), which shifts
any random draw that follows. On CUDA the draws come from the model's device (timm's 'dinov3' draws on the CPU).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn

ROPE_TYPES = ('', 'none', 'axial', 'mixed', 'dinov3', 'mrope')


def rope_enabled(rope_type: str) -> bool:
    return rope_type not in ('', 'none')


def _layout(x: torch.Tensor, rotate_half: bool) -> torch.Tensor:
    """Per-frequency values [..., Dh/2] -> [..., Dh]: [f0, f1, .., f0, f1, ..] (half) or [f0, f0, f1, f1, ..]."""
    return torch.cat([x, x], dim=-1) if rotate_half else x.repeat_interleave(2, -1)


def _rotate(x: torch.Tensor, rotate_half: bool) -> torch.Tensor:
    if rotate_half:  # [x0 x1 x2 x3] -> [-x2 -x3 x0 x1]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)  # [x0 x1 ..] -> [-x1 x0 ..]


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, rotate_half: bool) -> torch.Tensor:
    """Rotate x [..., Dh] by (sin, cos) broadcast to it; computed in sin's precision, returned in x's dtype."""
    return (x * cos + _rotate(x, rotate_half) * sin).to(x.dtype)


def validate_rope(cfg) -> None:
    """ValueError for a RoPE setting of a ``NaFlexVitCfg`` that timm would reject or could not build."""
    if cfg.rope_type not in ROPE_TYPES:
        raise ValueError(f'invalid rope_type={cfg.rope_type!r}; valid: {ROPE_TYPES}')
    if cfg.rope_grid_indexing not in ('ij', 'xy'):
        raise ValueError(f"invalid rope_grid_indexing={cfg.rope_grid_indexing!r}; valid: ('ij', 'xy')")
    for name, minimum in (('rope_shift_coords', 0.0), ('rope_jitter_coords', 1.0), ('rope_rescale_coords', 1.0)):
        value = getattr(cfg, name)
        if value is not None and (not math.isfinite(value) or value < minimum):
            raise ValueError(f'{name} must be a finite number >= {minimum:g} or None, got {value!r}')
    if not rope_enabled(cfg.rope_type):
        return
    if cfg.rope_temperature <= 0:
        raise ValueError(f'rope_temperature must be > 0, got {cfg.rope_temperature}')
    head_dim = cfg.embed_dim // cfg.num_heads
    multiple = 2 if cfg.rope_type == 'mrope' else 4
    if head_dim % multiple:
        raise ValueError(f'rope_type={cfg.rope_type!r} needs a head dim (embed_dim / num_heads) divisible by '
                         f'{multiple}, got {head_dim}')
    if cfg.rope_type == 'mixed' and cfg.rope_rotate_half:
        raise ValueError("rope_type='mixed' needs rope_rotate_half=False (timm's rule)")
    kv = cfg.num_kv_heads
    if cfg.rope_type == 'mixed' and kv is not None and any(n != cfg.num_heads for n in ([kv] if isinstance(kv, int)
                                                                                         else kv)):
        raise ValueError("rope_type='mixed' rotates every head by its own frequencies: it needs num_kv_heads=None "
                         "(timm fails on this combination in its first forward)")
    if cfg.rope_type == 'mrope':
        if cfg.rope_mrope_section is None or min(cfg.rope_mrope_section) < 0:
            raise ValueError("rope_type='mrope' needs rope_mrope_section=(T, H, W), three ints >= 0")
        if cfg.rope_grid_indexing != 'ij':
            raise ValueError("rope_type='mrope' supports rope_grid_indexing='ij' only (timm's rule)")
    if cfg.rope_ref_feat_shape is not None and min(cfg.rope_ref_feat_shape) < 1:
        raise ValueError(f'rope_ref_feat_shape must be two ints >= 1, got {cfg.rope_ref_feat_shape}')


def build_rope(cfg) -> Optional['NaFlexRope']:
    """The RoPE module of a ``NaFlexVitCfg`` (None without RoPE). ``rope_ref_feat_shape`` applies to 'axial' only
    and ``rope_grid_offset`` to 'axial' / 'dinov3', as in timm."""
    if not rope_enabled(cfg.rope_type):
        return None
    return NaFlexRope(
        cfg.rope_type, cfg.embed_dim, cfg.num_heads, cfg.depth, temperature=cfg.rope_temperature,
        ref_feat_shape=cfg.rope_ref_feat_shape if cfg.rope_type == 'axial' else None,
        grid_offset=cfg.rope_grid_offset if cfg.rope_type in ('axial', 'dinov3') else 0.0,
        grid_indexing=cfg.rope_grid_indexing, rotate_half=cfg.rope_rotate_half,
        mrope_section=cfg.rope_mrope_section, shift_coords=cfg.rope_shift_coords,
        jitter_coords=cfg.rope_jitter_coords, rescale_coords=cfg.rope_rescale_coords)


class NaFlexRope(nn.Module):
    """One of timm's NaFlex RoPE variants, evaluated per token.

    Buffers are non-persistent (as in timm), so the only state-dict entry is 'mixed''s ``freqs``.
    ``coords`` maps patch coordinates to the variant's positions (augmented in training), ``embed`` turns
    positions into (sin, cos), once per forward, or per block for 'mixed' (``per_block``).
    """

    def __init__(self, rope_type: str, embed_dim: int, num_heads: int, depth: int, temperature: float = 10000.0,
                 ref_feat_shape: Optional[Tuple[int, int]] = None, grid_offset: float = 0.0,
                 grid_indexing: str = 'ij', rotate_half: bool = False, mrope_section=None,
                 shift_coords: Optional[float] = None, jitter_coords: Optional[float] = None,
                 rescale_coords: Optional[float] = None):
        super().__init__()
        head_dim = embed_dim // num_heads
        self.rope_type = rope_type
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.depth = depth
        self.temperature = float(temperature)
        self.ref_feat_shape = tuple(ref_feat_shape) if ref_feat_shape is not None else None
        self.grid_offset = float(grid_offset)
        self.swap_xy = grid_indexing == 'xy'
        self.mrope_section = tuple(mrope_section) if mrope_section is not None else None
        # the layout of sin / cos and of the rotation in attention (timm: mrope always 'half', mixed never)
        self.rotate_half = rope_type == 'mrope' or (rotate_half and rope_type != 'mixed')
        self.per_block = rope_type == 'mixed'
        self.shift_coords, self.jitter_coords, self.rescale_coords = shift_coords, jitter_coords, rescale_coords
        if rope_type == 'mixed':
            self.freqs = nn.Parameter(self._mixed_freqs())
        else:
            self.register_buffer('bands', self._bands(), persistent=False)
            if rope_type == 'mrope':
                self.register_buffer('axis', self._mrope_axis(), persistent=False)
            if self.ref_feat_shape is not None:  # (h, w) the positions are rescaled to (EVA's fine-tuning rule)
                self.register_buffer('ref_shape', torch.tensor(self.ref_feat_shape, dtype=torch.float32),
                                     persistent=False)

    # ------------------------------------------------------------------------------------------- frequencies
    def _bands(self) -> torch.Tensor:
        """Per-axis frequencies ('axial'), periods ('dinov3') or per-channel frequencies ('mrope'), float32."""
        dh = self.head_dim
        if self.rope_type == 'dinov3':
            n = dh // 4
            return self.temperature ** (2.0 * torch.arange(n, dtype=torch.float32) / (dh // 2))
        if self.rope_type == 'mrope':
            return 1.0 / (self.temperature ** (torch.arange(0, dh, 2, dtype=torch.int64).float() / dh))
        n = dh // 4
        return 1.0 / (self.temperature ** (torch.arange(n, dtype=torch.int64).float() / n))

    def _mrope_axis(self) -> torch.Tensor:
        """Axis of each of the Dh/2 channels: 0 temporal (position 0 for images), 1 height, 2 width."""
        _, sec_h, sec_w = self.mrope_section
        axis = torch.zeros(self.head_dim // 2, dtype=torch.long)
        axis[1:sec_h * 3:3] = 1
        axis[2:sec_w * 3:3] = 2
        return axis

    def _mixed_freqs(self) -> torch.Tensor:
        """timm's init: magnitudes ``temperature ** -(4i / Dh)`` rotated by a random angle per block and head."""
        dh = self.head_dim
        mag = 1.0 / (self.temperature ** (torch.arange(0, dh, 4, dtype=torch.float32) / dh))[None, None]
        angles = torch.rand(self.depth, self.num_heads, 1) * 2 * torch.pi
        fx = torch.cat([mag * torch.cos(angles), mag * torch.cos(angles + torch.pi / 2)], dim=-1)
        fy = torch.cat([mag * torch.sin(angles), mag * torch.sin(angles + torch.pi / 2)], dim=-1)
        return torch.stack([fx, fy], dim=0)

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        bands = getattr(self, 'bands', None)
        if bands is not None and bands.dtype != torch.float32:  # .half() / .to(bf16): keep float32 frequencies
            self.register_buffer('bands', self._bands().to(bands.device), persistent=False)
        return module

    def no_weight_decay(self):
        return {'freqs'} if self.rope_type == 'mixed' else set()

    # --------------------------------------------------------------------------------------------- positions
    @property
    def aug_active(self) -> bool:
        return any(v is not None for v in (self.shift_coords, self.jitter_coords, self.rescale_coords))

    def coords(self, yx: torch.Tensor, hw: torch.Tensor, image_of: Optional[torch.Tensor] = None,
               grids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Positions [..., 2] (float32, channel order of ``grid_indexing``) of tokens at yx [..., 2] (y, x) in
        grids hw [..., 2] (h, w). In training with coordinate augmentation, ``grids`` [B, 2] are the images' grid
        sizes and ``image_of`` [...] the image of each token (None: one image, the draw is shared)."""
        yx, hw = yx.float(), hw.float()
        if self.rope_type == 'dinov3':
            pos = (yx + 0.5 + self.grid_offset) / hw * 2.0 - 1.0
        elif self.rope_type == 'axial':
            pos = yx + self.grid_offset
            if self.ref_feat_shape is not None:
                pos = pos / hw * self.ref_shape
        else:  # 'mixed', 'mrope': integer coordinates
            pos = yx
        if self.swap_xy:
            pos = pos.flip(-1)
        if self.training and self.aug_active:
            pos = self._augment(pos, image_of, grids)
        return pos

    def _augment(self, pos: torch.Tensor, image_of: Optional[torch.Tensor], grids: Optional[torch.Tensor]):
        """timm's shift -> jitter -> rescale, one draw per distinct grid size (see the module docstring)."""
        specs = [(kind, n, bound) for kind, n, bound in (  # (kind, columns, bound of U(-bound, bound)), RNG order
            ('shift', 2, self.shift_coords), ('jitter', 2, self.jitter_coords), ('rescale', 1, self.rescale_coords))
            if bound is not None]
        specs = [(kind, n, float(b) if kind == 'shift' else math.log(b)) for kind, n, b in specs]
        num_rows = 1 if grids is None else grids.shape[0]
        u = torch.rand(num_rows, sum(n for _, n, _ in specs), device=pos.device, dtype=torch.float32)
        if grids is None:
            row = torch.zeros(pos.shape[:-1], dtype=torch.long, device=pos.device)
        else:
            row = _first_appearance_rank(grids)[image_of]
        col = 0
        for kind, n, bound in specs:
            draw = (u[:, col:col + n] * (2 * bound) - bound)[row]  # [..., n]
            col += n
            pos = pos + draw if kind == 'shift' else pos * draw.exp()
        return pos

    # ------------------------------------------------------------------------------------------- embeddings
    def embed(self, pos: torch.Tensor, block: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """(sin, cos) [..., Dh] (non-mixed) or [..., heads, Dh] ('mixed', of block ``block``), float32."""
        if self.rope_type == 'mixed':
            freqs = self.freqs[:, block].float()  # [2, H, Dh/2]
            angles = pos[..., 0, None, None] * freqs[0] + pos[..., 1, None, None] * freqs[1]
        elif self.rope_type == 'mrope':
            pos3 = torch.cat([torch.zeros_like(pos[..., :1]), pos], dim=-1)
            angles = pos3.index_select(-1, self.axis) * self.bands
        elif self.rope_type == 'dinov3':
            angles = (2 * math.pi * pos[..., None] / self.bands).flatten(-2)
        else:
            angles = (pos[..., None] * self.bands).flatten(-2)
        return _layout(angles.sin(), self.rotate_half), _layout(angles.cos(), self.rotate_half)


def _first_appearance_rank(grids: torch.Tensor) -> torch.Tensor:
    """[B] for grid sizes [B, 2]: k for every image whose size is the k-th distinct one (in batch order)."""
    same = (grids[:, None, :] == grids[None, :, :]).all(-1)  # [B, B]
    first = same.int().argmax(dim=1)  # the first image with this image's size
    is_first = first == torch.arange(grids.shape[0], device=grids.device)
    return (torch.cumsum(is_first.long(), 0) - 1)[first]
