"""timm's EVA-style transformer block for NaFlexViT: RoPE attention, SwiGLU MLP, grouped-query attention.

EVA-02 (arXiv:2303.11331) pairs rotary position embeddings with a SwiGLU MLP (arXiv:2002.05202) and optional
normalisation inside the attention output and the MLP hidden layer (NormFormer's scale norms, arXiv:2110.09456).
timm's NaFlexViT switches to this block (its ``get_block_fn``) for any RoPE type, ``attn_type`` 'eva' / 'rope',
``swiglu_mlp``, ``attn_gated``, ``attn_only_layer_scale`` or ``num_kv_heads``. Parameter names and shapes equal
timm's ``EvaBlock`` with ``EvaAttention`` ('eva': fused qkv without key bias, ``q_bias`` / ``v_bias``) or
``AttentionRope`` ('rope': plain qkv bias, grouped-query attention by ``num_kv_heads``), ``Mlp``, ``GluMlp`` or
``SwiGLU``, so timm state dicts load strictly.

The attention runs on packed [T, D] or padded [B, N, D] tokens through ``naflex.model.attention.attend``; the RoPE
(sin, cos) come per token from ``naflex.model.rope`` with an identity rotation at prefix tokens, so no slicing of
prefix tokens is needed in either layout.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttnContext, attend
from .blocks import Mlp, _layer_norm, drop_path
from .rope import apply_rope

Rope = Optional[Tuple[torch.Tensor, torch.Tensor]]


def needs_eva_block(cfg) -> bool:
    """timm's ``get_block_fn`` rule: which configurations use the EVA block."""
    return (cfg.attn_type in ('eva', 'rope') or cfg.rope_type not in ('', 'none') or cfg.swiglu_mlp
            or cfg.attn_gated or cfg.attn_only_layer_scale or cfg.num_kv_heads is not None)


def validate_eva(cfg) -> None:
    """ValueError for an EVA-block setting of a ``NaFlexVitCfg`` that timm would reject."""
    if cfg.attn_type not in ('standard', 'eva', 'rope'):
        raise ValueError(f"invalid attn_type={cfg.attn_type!r}; valid: ('standard', 'eva', 'rope')")
    if cfg.swiglu_align_to < 0:
        raise ValueError(f'swiglu_align_to must be >= 0, got {cfg.swiglu_align_to}')
    kv = cfg.num_kv_heads
    if kv is None:
        return
    per_block = [kv] * cfg.depth if isinstance(kv, int) else list(kv)
    if len(per_block) != cfg.depth:
        raise ValueError(f'num_kv_heads needs one entry per block ({cfg.depth}), got {len(per_block)}')
    for n in per_block:
        if n < 1 or cfg.num_heads % n:
            raise ValueError(f'num_kv_heads entries must divide num_heads={cfg.num_heads}, got {n}')
        if n != cfg.num_heads and (cfg.qkv_fused or _attn_type(cfg) != 'rope'):
            raise ValueError("grouped-query attention (num_kv_heads < num_heads) needs qkv_fused=False and "
                             "attn_type 'rope' or a rope_type (timm's rule)")


def _attn_type(cfg) -> str:
    """'rope' (timm's AttentionRope) or 'eva' (EvaAttention); 'standard' means 'rope' when a RoPE is set."""
    if cfg.attn_type == 'rope' or (cfg.attn_type == 'standard' and cfg.rope_type not in ('', 'none')):
        return 'rope'
    return 'eva'


class EvaAttention(nn.Module):
    """Self-attention with RoPE on q / k, optional gate, scale norm and grouped-query attention.

    ``eva_bias``: timm's ``EvaAttention`` bias layout (fused ``qkv`` without bias plus ``q_bias``, a zero
    ``k_bias`` buffer and ``v_bias``; unfused: no key bias); otherwise timm's ``AttentionRope`` (all biases in the
    linears, ``num_kv_heads`` key / value heads)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qkv_fused: bool = True,
                 eva_bias: bool = False, num_kv_heads: Optional[int] = None, qk_norm: bool = False,
                 scale_norm: bool = False, gated: bool = False, rotate_half: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = dim // num_heads
        self.rotate_half = rotate_half
        self.split_bias = qkv_fused and eva_bias and qkv_bias  # q / k / v biases outside the fused linear
        attn_dim = self.head_dim * num_heads
        kv_dim = self.head_dim * self.num_kv_heads
        if qkv_fused:
            self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias and not eva_bias)
            if self.split_bias:
                self.q_bias = nn.Parameter(torch.zeros(attn_dim))
                self.register_buffer('k_bias', torch.zeros(attn_dim), persistent=False)
                self.v_bias = nn.Parameter(torch.zeros(attn_dim))
        else:
            self.q_proj = nn.Linear(dim, attn_dim, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, kv_dim, bias=qkv_bias and not eva_bias)
            self.v_proj = nn.Linear(dim, kv_dim, bias=qkv_bias)
        self.qkv_fused = qkv_fused
        self.q_norm = _layer_norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = _layer_norm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = _layer_norm(attn_dim) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, attn_dim, bias=qkv_bias) if gated else None
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor):
        """[..., D] -> q [..., H, Dh], k / v [..., Hkv, Dh]."""
        if self.qkv_fused:
            if self.split_bias:
                qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
            else:
                qkv = self.qkv(x)
            return qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        return (self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)),
                self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)),
                self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)))

    def forward(self, x: torch.Tensor, ctx: AttnContext, rope: Rope = None) -> torch.Tensor:
        """x packed [T, D] or padded [B, N, D]; rope (sin, cos) broadcastable to q: [T, 1|H, Dh] packed,
        [B|1, 1|H, N, Dh] padded."""
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self._qkv(x)  # [..., N, H, Dh]
        if not ctx.packed:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, Dh]
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = apply_rope(q, *rope, self.rotate_half).type_as(v)
            k = apply_rope(k, *rope, self.rotate_half).type_as(v)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:  # head h uses key / value head h // groups (timm's repeat_interleave; dim 1 in both layouts)
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = attend(q, k, v, ctx, self.attn_drop.p if self.training else 0.0)
        out = out.flatten(-2) if ctx.packed else out.transpose(1, 2).flatten(-2)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


class GluMlp(nn.Module):
    """SwiGLU with one packed fc1 (timm's ``GluMlp(act_layer=SiLU, gate_last=False)``): silu(x1) * x2."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden * 2)
        self.act = nn.SiLU()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def init_weights(self) -> None:
        """timm's: the gate half of fc1 starts near zero with bias 1."""
        nn.init.ones_(self.fc1.bias[self.fc1.bias.shape[0] // 2:])
        nn.init.normal_(self.fc1.weight[self.fc1.weight.shape[0] // 2:], std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.fc1(x).chunk(2, dim=-1)
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(x1) * x2))))


class SwiGLU(nn.Module):
    """SwiGLU with separate gate / value linears (timm's ``SwiGLU``), hidden width rounded up to ``align_to``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, scale_norm: bool = False, align_to: int = 0):
        super().__init__()
        if align_to:
            hidden += -hidden % align_to
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.act = nn.SiLU()
        self.drop1 = nn.Dropout(drop)
        self.norm = _layer_norm(hidden) if scale_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def init_weights(self) -> None:
        nn.init.ones_(self.fc1_g.bias)
        nn.init.normal_(self.fc1_g.weight, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1_g(x)) * self.fc1_x(x)
        return self.drop2(self.fc2(self.norm(self.drop1(x))))


class EvaBlock(nn.Module):
    """timm's ``EvaBlock``: pre-norm attention and MLP, layer scale as ``gamma_1`` / ``gamma_2``."""

    def __init__(self, cfg, block_idx: int, drop_path_rate: float = 0.0):
        """``cfg``: a ``NaFlexVitCfg``; ``block_idx`` picks this block's entry of a per-block ``num_kv_heads``."""
        super().__init__()
        dim = cfg.embed_dim
        num_kv_heads = cfg.num_kv_heads
        if num_kv_heads is not None and not isinstance(num_kv_heads, int):
            num_kv_heads = num_kv_heads[block_idx]
        self.norm1 = _layer_norm(dim)
        self.attn = EvaAttention(
            dim, cfg.num_heads, qkv_bias=cfg.qkv_bias, qkv_fused=cfg.qkv_fused, eva_bias=_attn_type(cfg) == 'eva',
            num_kv_heads=num_kv_heads, qk_norm=cfg.qk_norm, scale_norm=cfg.scale_attn_inner_norm,
            gated=cfg.attn_gated, rotate_half=cfg.rope_rotate_half or cfg.rope_type == 'mrope',
            attn_drop=cfg.attn_drop_rate, proj_drop=cfg.proj_drop_rate)
        init_values = cfg.init_values
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values))) if init_values is not None else None
        self.norm2 = _layer_norm(dim)
        hidden = int(dim * cfg.mlp_ratio)
        if cfg.swiglu_mlp and (cfg.scale_mlp_norm or cfg.swiglu_align_to):
            self.mlp = SwiGLU(dim, hidden, cfg.proj_drop_rate, cfg.scale_mlp_norm, cfg.swiglu_align_to)
        elif cfg.swiglu_mlp:
            self.mlp = GluMlp(dim, hidden, cfg.proj_drop_rate)
        else:
            self.mlp = Mlp(dim, hidden, cfg.act_layer, True, cfg.proj_drop_rate, scale_norm=cfg.scale_mlp_norm)
        use_mlp_ls = init_values is not None and not cfg.attn_only_layer_scale
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values))) if use_mlp_ls else None
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, ctx: AttnContext, rope: Rope = None) -> torch.Tensor:
        x_attn = self.attn(self.norm1(x), ctx, rope)
        if self.gamma_1 is not None:
            x_attn = self.gamma_1 * x_attn
        x = x + drop_path(x_attn, self.drop_path_rate, self.training, ctx)
        x_mlp = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            x_mlp = self.gamma_2 * x_mlp
        return x + drop_path(x_mlp, self.drop_path_rate, self.training, ctx)
