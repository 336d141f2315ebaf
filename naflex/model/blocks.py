"""timm's standard ViT block for NaFlexViT (pre-norm attention + MLP, optional layer scale and scale norms).

Every module works on packed tokens [T, D] and padded tokens [B, N, D] alike: attention goes through
``naflex.model.attention.attend``, which restricts it to each image, and stochastic depth draws per image.
Parameter names equal timm's ``Block`` / ``Attention`` / ``Mlp`` so checkpoints load as they are.
"""
import torch
import torch.nn as nn

from .attention import AttnContext, attend


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)  # timm's LayerNorm default eps


def _act(name) -> nn.Module:
    return nn.GELU(approximate='tanh') if name == 'gelu_tanh' else nn.GELU()  # None: timm's default, GELU


def drop_path(x: torch.Tensor, p: float, training: bool, ctx: AttnContext) -> torch.Tensor:
    """Stochastic depth (per image, scaled by 1/keep like timm); packed tokens share their image's draw."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty(ctx.num_images).bernoulli_(keep).div_(keep)
    if ctx.packed:
        return x * mask[ctx.seg_ids][:, None]
    return x * mask[:, None, None]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act_layer: str = 'gelu', bias: bool = True, drop: float = 0.0,
                 scale_norm: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = _act(act_layer)
        self.drop1 = nn.Dropout(drop)
        self.norm = _layer_norm(hidden) if scale_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention over packed [T, D] or padded [B, N, D] tokens (see ``naflex.attention``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, scale_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = _layer_norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = _layer_norm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = _layer_norm(dim) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        dropout_p = self.attn_drop.p if self.training else 0.0
        if ctx.packed:
            num_tokens, dim = x.shape
            q, k, v = self.qkv(x).reshape(num_tokens, 3, self.num_heads, self.head_dim).unbind(1)  # [T, H, Dh]
            out = attend(self.q_norm(q), self.k_norm(k), v, ctx, dropout_p).reshape(num_tokens, dim)
        else:
            b, n, dim = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # [B, H, N, Dh]
            out = attend(self.q_norm(q), self.k_norm(k), v, ctx, dropout_p).transpose(1, 2).reshape(b, n, dim)
        return self.proj_drop(self.proj(self.norm(out)))


class Block(nn.Module):
    """Pre-norm transformer block with optional layer scale and per-image stochastic depth (timm's Block)."""

    def __init__(self, cfg, drop_path_rate: float = 0.0):
        """``cfg``: a ``NaFlexVitCfg``."""
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = _layer_norm(dim)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, cfg.qk_norm, cfg.proj_bias,
                              cfg.attn_drop_rate, cfg.proj_drop_rate, scale_norm=cfg.scale_attn_inner_norm)
        self.ls1 = LayerScale(dim, cfg.init_values) if cfg.init_values else nn.Identity()
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.act_layer, cfg.proj_bias, cfg.proj_drop_rate,
                       scale_norm=cfg.scale_mlp_norm)
        self.ls2 = LayerScale(dim, cfg.init_values) if cfg.init_values else nn.Identity()
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        x = x + drop_path(self.ls1(self.attn(self.norm1(x), ctx)), self.drop_path_rate, self.training, ctx)
        x = x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path_rate, self.training, ctx)
        return x

