"""Patch dropout (arXiv:2212.00794, 2208.07220): in training, each image runs the transformer on a random subset
of its patch tokens; prefix (class / register) tokens are always kept. Fewer tokens make a step cheaper and
regularise like dropout; evaluation sees every token.

Padded layouts (image tensors, timm's padded NaFlex dict) follow timm 1.0.31's ``PatchDropoutWithIndices`` as its
``NaFlexVit`` applies it: every row of N patch slots keeps ``max(1, int(N * (1 - p)))`` of them, drawn with
timm's own RNG call (``argsort(randn(B, N))``), so with the same seed the kept indices are timm's. The draw is
over slots, padding included, so an image keeps a random number of its valid patches; ``patch_valid`` is gathered
with the tokens and becomes the attention's key mask and the pooling mask, as timm's ``create_attention_mask``
rebuilt after the dropout.

The packed layout has no padding and runs without host syncs, compiled as one graph with dynamic shapes. A
per-image draw of a data-dependent size (timm's count per image, or a Bernoulli mask) would make the number of
tokens after dropout known only on the device: the shapes that follow would need a sync. Instead every image
keeps one token for sure and a fraction 1 - p of the others, with the counts rounded along the pack (image i keeps
``1 + floor(C[i+1] * r) - floor(C[i] * r)``, ``C`` the running sum of ``len - 1``, ``r`` = 1 - p) so that they add
up to ``B + floor((T - B) * r)``: a function of the shapes T (tokens) and B (images) alone. An image of ``len``
patches then keeps ``int(len * (1 - p))`` (timm's count for an unpadded row) to two more tokens, never none and
never more than ``len``, and ``cu_seqlens``, the segment ids and the pooling follow the kept tokens on the device.
``r`` is rounded to a multiple of 2**-20 so that the device and the host compute these integers exactly alike.
"""
from typing import Optional, Tuple

import torch

_FRAC_BITS = 20  # r = keep_num / 2**20: integer arithmetic on the device and the host, no float rounding


def check_rate(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f'patch_drop_rate must be in [0, 1), got {p}')


def padded_keep_indices(b: int, n: int, p: float, device: torch.device) -> torch.Tensor:
    """[B, K] indices of the kept patch slots, K = max(1, int(N * (1 - p))): timm's draw, RNG call for RNG call."""
    num_keep = max(1, int(n * (1.0 - p)))
    return torch.argsort(torch.randn(b, n, device=device), dim=-1)[:, :num_keep]


def drop_padded(x: torch.Tensor, valid: Optional[torch.Tensor], keep: torch.Tensor,
                num_prefix: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """x [B, prefix + N, D], valid [B, N] or None, keep [B, K] -> x [B, prefix + K, D], valid [B, K] or None."""
    prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
    patches = patches.gather(1, keep[..., None].expand(-1, -1, patches.shape[-1]))
    return torch.cat([prefix, patches], dim=1), (valid.gather(1, keep) if valid is not None else None)


def some_key(valid: torch.Tensor) -> torch.Tensor:
    """[B, N] key mask in which an image without any valid key attends to all of its keys instead.

    Dropout over padded slots can leave an image (without prefix tokens) no valid patch; a boolean mask with no
    True in a row makes SDPA return NaN, which would reach the loss and every gradient. timm's additive mask of
    finfo.min gives a finite (equally meaningless) value there; this gives a finite one too."""
    return valid | ~valid.any(dim=-1, keepdim=True)


def keep_fraction(p: float) -> int:
    """1 - p as an integer numerator over 2**20."""
    return int(round((1.0 - p) * (1 << _FRAC_BITS)))


def packed_num_kept(num_tokens, num_images, p: float):
    """Tokens left after dropout in a pack of ``num_tokens`` patches of ``num_images`` images (host ints or the
    symbolic sizes of a compiled graph: shapes only)."""
    return num_images + (num_tokens - num_images) * keep_fraction(p) // (1 << _FRAC_BITS)


def packed_max_kept(max_len: int, p: float) -> int:
    """An upper bound of one image's kept tokens, from its host-known length (attention kernels' max_seqlen)."""
    return min(max_len, 2 + (max_len - 1) * keep_fraction(p) // (1 << _FRAC_BITS))


def drop_packed(cu: torch.Tensor, seg: torch.Tensor, p: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Choose the kept tokens of a pack. cu [B+1] long offsets, seg [T] image of each token ->
    (keep [T'] indices of the kept tokens in pack order, kept [B] tokens kept per image). No host sync."""
    num_tokens, num_images = seg.shape[0], cu.shape[0] - 1
    device = seg.device
    r = keep_fraction(p)
    run = cu - torch.arange(num_images + 1, device=device)  # running sum of (len - 1)
    quota = run * r // (1 << _FRAC_BITS)
    kept = 1 + quota[1:] - quota[:-1]  # [B], sums to packed_num_kept(T, B, p)
    # a random rank of each token within its image: shuffle, then a stable sort by image
    perm = torch.randperm(num_tokens, device=device)
    perm = perm[torch.sort(seg[perm], stable=True).indices]
    rank = torch.empty_like(seg)
    rank[perm] = torch.arange(num_tokens, device=device) - cu[seg[perm]]
    dropped = (rank >= kept[seg]).to(torch.int8)
    keep = torch.sort(dropped, stable=True).indices[:packed_num_kept(num_tokens, num_images, p)]
    return keep, kept
