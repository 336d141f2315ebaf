"""Attention restricted to each image, for packed (NaViT) and padded (timm NaFlex) token layouts.

NaViT (arXiv:2307.06304) packs the tokens of several images into one sequence and masks attention so that a
token only sees tokens of its own image. With per-image offsets (``cu_seqlens``) this needs no padding:

- ``sdpa_dense``: ``F.scaled_dot_product_attention`` with a dense [T, T] block-diagonal boolean mask. O(T^2)
  memory; the reference backend, runs anywhere (CPU tests).
- ``sdpa_padded``: scatter the packed tokens into [B, max_seqlen] (``max_seqlen`` is host metadata, so no
  sync), SDPA with a key-validity mask, gather back. O(B * max_seqlen^2) like timm's padded batches; any
  device and dtype.
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash attention over cu_seqlens). CUDA, fp16/bf16.
- ``flex``: FlexAttention with a document mask; the BlockMask is built once per forward and shared by every
  layer. Fast only inside ``torch.compile``: eagerly, building the mask evaluates all T x T pairs and the
  attention materialises T^2 scores per head (about 200 GB at T = 65,536), so a packed batch of more than
  ``FLEX_EAGER_MAX_TOKENS`` tokens outside compilation runs on the 'auto' backend instead, with a warning.
- ``auto``: ``varlen`` on CUDA when the attention runs in fp16/bf16, else ``sdpa_padded``.

Padded inputs ([B, N, D], timm's dict with ``patch_valid``) always use SDPA with a key-validity mask, which
gives timm's results on every valid token. All metadata is prepared once per forward in an ``AttnContext``
with tensor ops only (no host syncs). NaFlex: SigLIP 2 (arXiv:2502.14786).
"""
import importlib.util
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

BACKENDS = ('auto', 'sdpa_dense', 'sdpa_padded', 'varlen', 'flex')

_HAS_VARLEN = importlib.util.find_spec('torch.nn.attention.varlen') is not None  # torch >= 2.10

# Above this many packed tokens, eager FlexAttention's dense T x T work is worth avoiding: at 4,096 tokens the mask
# is 16 MiB and each head's fp32 scores 64 MiB, kept per layer for the backward; at the documented 65,536 tokens
# per step it is hundreds of GB.
FLEX_EAGER_MAX_TOKENS = 4096


def _varlen_attn(*args, **kwargs):
    # imported on first use: the module pulls in torch._dynamo, which costs seconds at import time
    from torch.nn.attention.varlen import varlen_attn
    return varlen_attn(*args, **kwargs)


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    return create_block_mask, flex_attention


def available_backends(device: torch.device) -> tuple:
    """Backends that can run on ``device`` (for tests and 'auto')."""
    out = ['sdpa_dense', 'sdpa_padded', 'flex']
    if _HAS_VARLEN and torch.device(device).type == 'cuda':
        out.append('varlen')
    return tuple(out)


def check_backend(name: str) -> str:
    """``name`` if it is one of ``BACKENDS``, else a ValueError listing them."""
    if name not in BACKENDS:
        raise ValueError(f'unknown attention backend {name!r}; valid: {BACKENDS}')
    return name


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Pick a concrete backend. ``dtype`` is the dtype attention will run in (autocast dtype if enabled)."""
    if check_backend(name) != 'auto':
        return name
    device = torch.device(device)
    if device.type == 'cuda' and _HAS_VARLEN and dtype in (torch.float16, torch.bfloat16):
        return 'varlen'
    return 'sdpa_padded'


def flex_or_fallback(num_tokens: int, device: torch.device, dtype: torch.dtype) -> str:
    """'flex' inside torch.compile or for small batches; otherwise the 'auto' backend, with a warning."""
    # is_compiling() first: under dynamic shapes the size test would otherwise add a guard on the token count
    if torch.compiler.is_compiling() or num_tokens <= FLEX_EAGER_MAX_TOKENS:
        return 'flex'
    fallback = resolve_backend('auto', device, dtype)
    warnings.warn(
        f"attention backend 'flex' without torch.compile materialises a T x T mask and T^2 scores per head; "
        f"packed batches above {FLEX_EAGER_MAX_TOKENS} tokens use {fallback!r} instead. Compile the model "
        f"(train.py --torchcompile) to run FlexAttention, or choose the 'varlen' (CUDA, fp16/bf16) or "
        f"'sdpa_padded' backend.", stacklevel=3)
    return fallback


class AttnContext:
    """Per-forward attention metadata shared by all blocks (and drop-path / pooling).

    Packed layout: tokens [T, D]; ``seg_ids`` [T] image index of each token; ``cu_seqlens`` [B+1] int32;
    ``max_seqlen`` python int; ``num_images`` B. Padded layout: tokens [B, N, D]; ``key_valid`` [B, N] bool
    or None (no padding).
    """

    def __init__(
            self,
            backend: str,
            packed: bool,
            num_images: int,
            seg_ids: Optional[torch.Tensor] = None,
            cu_seqlens: Optional[torch.Tensor] = None,
            max_seqlen: int = 0,
            key_valid: Optional[torch.Tensor] = None,
    ):
        self.backend = backend
        self.packed = packed
        self.num_images = num_images
        self.seg_ids = seg_ids
        self.cu_seqlens = cu_seqlens
        self.max_seqlen = max_seqlen
        self.key_valid = key_valid
        # RoPE (naflex.model.rope): the tokens' positions and the (sin, cos) all blocks share, set by the model
        self.rope_pos: Optional[torch.Tensor] = None
        self.rope = None
        self.dense_mask = None
        self.block_mask = None
        if packed:
            if backend == 'sdpa_dense':
                self.dense_mask = (seg_ids[:, None] == seg_ids[None, :])[None, None]  # [1, 1, T, T]
            elif backend == 'flex':
                self.block_mask = _document_block_mask(seg_ids)
            elif backend == 'varlen':
                self.cu_seqlens = cu_seqlens.to(torch.int32)
            elif backend == 'sdpa_padded':
                cu = cu_seqlens.long()
                self.pad_index = (seg_ids, torch.arange(seg_ids.shape[0], device=seg_ids.device) - cu[seg_ids])
                slots = torch.arange(max_seqlen, device=seg_ids.device)
                self.dense_mask = (slots[None, :] < (cu[1:] - cu[:-1])[:, None])[:, None, None, :]  # [B,1,1,N]
        elif key_valid is not None:
            self.dense_mask = key_valid[:, None, None, :]  # [B, 1, 1, N]

    @classmethod
    def packed_from(cls, backend: str, seg_ids, cu_seqlens, max_seqlen: int, num_images: int, device, dtype):
        backend = resolve_backend(backend, device, dtype)
        if backend == 'flex':
            backend = flex_or_fallback(seg_ids.shape[0], device, dtype)
        return cls(backend, True, num_images, seg_ids=seg_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    @classmethod
    def padded_from(cls, num_images: int, key_valid: Optional[torch.Tensor] = None):
        return cls('sdpa_dense', False, num_images, key_valid=key_valid)


def _document_block_mask(seg_ids: torch.Tensor):
    create_block_mask, _ = _flex()
    total = seg_ids.shape[0]

    def same_image(b, h, q_idx, kv_idx):
        return seg_ids[q_idx] == seg_ids[kv_idx]

    return create_block_mask(same_image, None, None, total, total, device=seg_ids.device)


def attend(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx: AttnContext,
        dropout_p: float = 0.0,
) -> torch.Tensor:
    """Multi-head attention restricted per image.

    Packed: q, k, v [T, H, Dh] -> [T, H, Dh]. Padded: q, k, v [B, H, N, Dh] -> [B, H, N, Dh].
    """
    if not ctx.packed:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.dense_mask, dropout_p=dropout_p)
    if ctx.backend in ('varlen', 'flex'):
        # Under CUDA autocast qk_norm's LayerNorm returns fp32 q / k while v (straight from the qkv linear) is
        # bf16; SDPA casts its inputs itself, but flash attention and FlexAttention take one dtype.
        q, k = q.to(v.dtype), k.to(v.dtype)
    if ctx.backend == 'varlen':
        if dropout_p > 0:
            raise ValueError("attention dropout is not supported by the 'varlen' backend")
        cu = ctx.cu_seqlens
        return _varlen_attn(q, k, v, cu, cu, ctx.max_seqlen, ctx.max_seqlen)
    if ctx.backend == 'sdpa_padded':
        shape = (ctx.num_images, ctx.max_seqlen) + tuple(q.shape[1:])
        qp, kp, vp = (t.new_zeros(shape).index_put(ctx.pad_index, t).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=ctx.dense_mask, dropout_p=dropout_p)
        return out.transpose(1, 2)[ctx.pad_index]  # [T, H, Dh]
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, H, T, Dh]
    if ctx.backend == 'flex':
        if dropout_p > 0:
            raise ValueError("attention dropout is not supported by the 'flex' backend")
        # contiguous: inductor's CPU flex template fails to lower strided graph inputs (torch 2.14)
        qh, kh, vh = qh.contiguous(), kh.contiguous(), vh.contiguous()
        out = _flex()[1](qh, kh, vh, block_mask=ctx.block_mask)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=ctx.dense_mask, dropout_p=dropout_p)
    return out[0].transpose(0, 1)
