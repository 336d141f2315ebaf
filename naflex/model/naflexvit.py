"""NaFlexViT: a Vision Transformer for native aspect ratio and variable resolution / sequence length.

NaFlex comes from SigLIP 2 (arXiv:2502.14786): patchify the image at its native aspect ratio, embed the
patches linearly and add a learned position-embedding table resized to the image's patch grid. NaViT
(arXiv:2307.06304) adds sequence packing (several images in one token sequence with attention restricted to
each image) and factorized position embeddings; FlexiViT (arXiv:2212.08013) adds variable patch sizes.

Parameter names and shapes equal timm's ``NaFlexVit`` (timm 1.0.31), so timm checkpoints load with
``strict=True`` and give the same outputs. ``model(x)`` accepts three inputs:

1. an image tensor [B, C, H, W] (H, W multiples of the patch size);
2. timm's padded NaFlex dict: ``patches`` [B, N, P*P*C] (or [B, N, Ph, Pw, C]), ``patch_coord`` [B, N, 2] (y, x),
   ``patch_valid`` [B, N] bool;
3. the packed dict (no padding); both dict layouts are specified in ``naflex.model.batch``.

The packed path runs without host syncs: every per-image quantity (grid size, prefix-token slot, pooling
segment) is gathered per token with tensor ops, so ``torch.compile(fullgraph=True)`` traces it whole.
"""
import contextlib
import math
from dataclasses import dataclass, fields, replace
from typing import (Dict, List, Optional, Set, Tuple, Union, get_args, get_origin,
                    get_type_hints)

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import BACKENDS, AttnContext, check_backend
from .batch import grid_coords, is_packed
from .blocks import Block, Mlp, _layer_norm
from .eva import EvaBlock, needs_eva_block, validate_eva
from .features import feature_take_indices
from .patch_drop import (drop_packed, drop_padded, packed_max_kept, padded_keep_indices, some_key)
from .patch_embed import NaFlexEmbeds
from .rope import build_rope, validate_rope

POOL_TYPES = ('', 'avg', 'avgmax', 'max', 'token', 'map')
ACT_LAYERS = ('gelu', 'gelu_tanh')
# timm NaFlexVitCfg switches for other layer implementations: the default is the one this library implements
_UNSUPPORTED = dict(pos_embed_use_grid_sample=False, patchify_channels_last=True, weight_init='',
                    embed_proj_type='linear', input_norm_layer=None, embed_norm_layer=None, norm_layer=None,
                    block_fn=None, mlp_layer=None, attn_layer=None)


@dataclass
class NaFlexVitCfg:
    """Architecture + regularisation hyper-parameters (field names and defaults follow timm's NaFlexVitCfg)."""
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    scale_mlp_norm: bool = False  # norm of the MLP hidden layer
    num_kv_heads: Optional[Union[int, Tuple[int, ...]]] = None  # grouped-query attention (EVA block), or per block
    qkv_bias: bool = True
    qk_norm: bool = False
    proj_bias: bool = True
    scale_attn_inner_norm: bool = False  # norm of the attention output before its projection
    use_key_only_attn_mask: bool = False  # accepted: our masks are key-only already (docs/model.md)
    init_values: Optional[float] = None  # layer-scale init (enabled when not None)
    class_token: bool = False
    reg_tokens: int = 0
    pos_embed: str = 'learned'  # 'learned', 'factorized', 'none'
    pos_embed_grid_size: Tuple[int, int] = (16, 16)
    pos_embed_interp_mode: str = 'bicubic'
    pos_embed_ar_preserving: bool = False
    pos_embed_antialias: bool = True
    pos_embed_align_corners: bool = False
    pos_embed_use_grid_sample: bool = False  # timm's alternative resampling: not supported (True is refused)
    rope_type: str = ''  # '' / 'none', 'axial', 'mixed', 'dinov3', 'mrope': see naflex.model.rope
    rope_temperature: float = 10000.0
    rope_ref_feat_shape: Optional[Tuple[int, int]] = None
    rope_grid_offset: float = 0.0
    rope_grid_indexing: str = 'ij'
    rope_rotate_half: bool = False
    rope_shift_coords: Optional[float] = None  # training only: shift in [-s, s] (rope grid units)
    rope_jitter_coords: Optional[float] = None  # training only: per-axis scale in [1/J, J]
    rope_rescale_coords: Optional[float] = None  # training only: shared scale in [1/R, R]
    rope_mrope_section: Optional[Tuple[int, int, int]] = None  # rope_type='mrope': (T, H, W) channel sections
    dynamic_img_pad: bool = False  # image tensors: pad H, W up to a multiple of the patch size
    patchify_channels_last: bool = True  # P-P-C patch layout (False is refused)
    pre_norm: bool = False
    final_norm: bool = True
    fc_norm: Optional[bool] = None  # None: True for 'avg' pooling
    global_pool: str = 'map'
    pool_include_prefix: bool = False
    attn_pool_num_heads: Optional[int] = None
    attn_pool_mlp_ratio: Optional[float] = None
    act_layer: Optional[str] = 'gelu'  # None: timm's default, GELU
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    patch_drop_rate: float = 0.0  # training only: see naflex.model.patch_drop
    fix_init: bool = True
    weight_init: str = ''  # timm's default init ('jax', 'moco' are refused)
    # timm's layer-implementation switches: only their defaults are supported
    embed_proj_type: str = 'linear'
    input_norm_layer: Optional[str] = None
    embed_norm_layer: Optional[str] = None
    norm_layer: Optional[str] = None
    block_fn: Optional[str] = None
    mlp_layer: Optional[str] = None
    attn_layer: Optional[str] = None
    # EVA block (naflex.model.eva), used for any RoPE and the options below
    attn_type: str = 'standard'  # 'standard', 'eva', 'rope'
    attn_gated: bool = False
    swiglu_mlp: bool = False
    swiglu_align_to: int = 0
    qkv_fused: bool = True
    attn_only_layer_scale: bool = False
    enable_patch_interpolator: bool = False  # accepted: variable patch sizes always work here (docs/model.md)
    attn_backend: str = 'auto'

    def validate(self) -> None:
        def bad(field, value, valid):
            raise ValueError(f'invalid {field}={value!r}; valid: {valid}')
        self._check_types()
        if self.global_pool not in POOL_TYPES:
            bad('global_pool', self.global_pool, POOL_TYPES)
        if self.global_pool == 'token' and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if self.pos_embed not in ('learned', 'factorized', 'none', ''):
            bad('pos_embed', self.pos_embed, ('learned', 'factorized', 'none'))
        if self.pos_embed_interp_mode not in ('bicubic', 'bilinear'):
            bad('pos_embed_interp_mode', self.pos_embed_interp_mode, ('bicubic', 'bilinear'))
        if self.act_layer is not None and self.act_layer not in ACT_LAYERS:
            bad('act_layer', self.act_layer, ACT_LAYERS)
        for name, default in _UNSUPPORTED.items():
            if getattr(self, name) != default:
                raise ValueError(f'{name}={getattr(self, name)!r} is not supported; only timm\'s default '
                                 f'{default!r} is (see docs/model.md)')
        validate_rope(self)
        validate_eva(self)
        if self.attn_backend not in BACKENDS:
            bad('attn_backend', self.attn_backend, BACKENDS)
        for name in ('patch_size', 'embed_dim', 'depth', 'num_heads'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
        if self.mlp_ratio <= 0 or self.reg_tokens < 0 or min(self.pos_embed_grid_size) < 1:
            raise ValueError(f'mlp_ratio must be > 0, reg_tokens >= 0 and pos_embed_grid_size >= 1; got '
                             f'{self.mlp_ratio}, {self.reg_tokens}, {self.pos_embed_grid_size}')
        if self.embed_dim % self.num_heads:
            raise ValueError(f'embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}')
        for name in ('drop_rate', 'pos_drop_rate', 'proj_drop_rate', 'attn_drop_rate', 'drop_path_rate',
                     'patch_drop_rate'):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f'{name} must be in [0, 1), got {getattr(self, name)}')


    def _check_types(self) -> None:
        """Each field holds its annotated type (ints count as floats; a list of ints as a tuple of them), so a
        mistyped override (``depth=2.5``, ``embed_dim='big'``) is one ValueError instead of a crash in a layer."""
        for f in fields(self):
            value, hint = getattr(self, f.name), _FIELD_TYPES[f.name]
            if not _matches(value, hint):
                raise ValueError(f'{f.name}={value!r} is not {_type_name(hint)}')


_FIELD_TYPES = get_type_hints(NaFlexVitCfg)


def _matches(value, hint) -> bool:
    if get_origin(hint) is Union:
        return any(_matches(value, a) for a in get_args(hint))
    if get_origin(hint) is tuple:
        args = get_args(hint)
        if not isinstance(value, (tuple, list)):
            return False
        if args[-1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return value is None if hint is type(None) else isinstance(value, hint)


def _type_name(hint) -> str:
    if get_origin(hint) is Union:
        return ' or '.join(_type_name(a) for a in get_args(hint))
    if get_origin(hint) is tuple:
        return 'a tuple of ints' if get_args(hint)[-1] is Ellipsis else f'{len(get_args(hint))} ints'
    return {int: 'an int', float: 'a number', bool: 'a bool', str: 'a string', type(None): 'None'}.get(hint, str(hint))


def _naflex_args(x, patch_coord: Optional[torch.Tensor], patch_valid: Optional[torch.Tensor]):
    """timm's ``forward(patches, patch_coord=, patch_valid=)`` call as the padded dict (torch.fx makes every argument
    a Proxy, never None: traced, the forward is the image-tensor one)."""
    if patch_coord is None or isinstance(x, dict) or torch.fx._symbolic_trace.is_fx_tracing():
        return x
    if patch_valid is None:
        raise ValueError("patch_valid is required with patch_coord (timm's NaFlex arguments)")
    return dict(patches=x, patch_coord=patch_coord, patch_valid=patch_valid)


@torch.fx.wrap
def check_image_size(h: int, w: int, p: int) -> None:
    """ValueError unless an h x w image splits into p x p patches. A leaf of torch.fx graphs (``fx.wrap``): symbolic
    tracing records the call instead of branching on traced sizes, and the traced module still checks every input."""
    if h % p or w % p:
        raise ValueError(f'image size {h}x{w} is not a multiple of the patch size {p}')


class AttentionPoolLatent(nn.Module):
    """Multi-head attention pooling with one learned latent query (MAP head, timm's AttentionPoolLatent).

    Padded: SDPA over each image's valid tokens. Packed: a segment softmax over each image's tokens
    (scatter-max, exp, index-add), so no padding and no host sync.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, act_layer: str = 'gelu'):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        self.norm = _layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer)
        nn.init.trunc_normal_(self.latent, std=dim ** -0.5, a=-2 * dim ** -0.5, b=2 * dim ** -0.5)

    def _out(self, x_BD: torch.Tensor) -> torch.Tensor:
        x_BD = self.proj_drop(self.proj(x_BD))
        return x_BD + self.mlp(self.norm(x_BD))

    def forward(self, x: torch.Tensor, key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, N, D], key_valid [B, N] bool or None -> [B, D]."""
        b, n, dim = x.shape
        q = self.q(self.latent).reshape(1, 1, self.num_heads, self.head_dim).transpose(1, 2).expand(b, -1, -1, -1)
        k, v = self.kv(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = key_valid[:, None, None, :] if key_valid is not None else None
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=mask)
        return self._out(out.transpose(1, 2).reshape(b, dim))

    def forward_packed(self, x_TD: torch.Tensor, seg_T: torch.Tensor, num_images: int) -> torch.Tensor:
        """x_TD [T, D] tokens, seg_T [T] image index -> [B, D]."""
        t, dim = x_TD.shape
        h, dh = self.num_heads, self.head_dim
        q_HD = self.q_norm(self.q(self.latent).reshape(h, dh)).float() * dh ** -0.5
        k, v = self.kv(x_TD).reshape(t, 2, h, dh).unbind(1)
        score_TH = (self.k_norm(k).float() * q_HD[None]).sum(-1)
        idx = seg_T[:, None].expand(-1, h)
        smax = score_TH.new_full((num_images, h), float('-inf'))
        smax = smax.scatter_reduce(0, idx, score_TH.detach(), reduce='amax', include_self=True)
        e_TH = torch.exp(score_TH - smax[seg_T])
        denom = score_TH.new_zeros(num_images, h).index_add(0, seg_T, e_TH)
        out = score_TH.new_zeros(num_images, h, dh).index_add(0, seg_T, e_TH[..., None] * v.float())
        out = (out / denom[..., None]).to(x_TD.dtype).reshape(num_images, dim)
        return self._out(out)


class NaFlexVit(nn.Module):
    """NaFlexViT classifier / backbone; see module docstring for inputs."""

    def __init__(self, cfg: Optional[NaFlexVitCfg] = None, in_chans: int = 3, num_classes: int = 1000,
                 img_size: Union[int, Tuple[int, int], None] = None,
                 device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None, **kwargs):
        """timm's constructor: ``kwargs`` are ``NaFlexVitCfg`` fields laid over ``cfg`` (another key is a
        TypeError, as in timm); the parameters are created on ``device`` and cast to ``dtype``. ``img_size``
        (timm's, for classic-ViT call sites) only sizes the position-embedding table when ``pos_embed_grid_size``
        is None: ``img_size // patch_size``, as timm; with a grid size set it has no effect, as in timm."""
        super().__init__()
        cfg = cfg or NaFlexVitCfg()
        unknown = sorted(set(kwargs) - set(_FIELD_TYPES))
        if unknown:
            raise TypeError(f'{type(self).__name__}.__init__() got unexpected keyword argument(s): {unknown}; '
                            f'valid config fields: {", ".join(_FIELD_TYPES)}')
        cfg = replace(cfg, **kwargs)
        if cfg.pos_embed_grid_size is None:
            if img_size is None:
                raise ValueError('pos_embed_grid_size=None needs img_size (the table is img_size // patch_size)')
            h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
            cfg = replace(cfg, pos_embed_grid_size=(h // cfg.patch_size, w // cfg.patch_size))
        cfg.validate()
        cfg = replace(cfg, pos_embed_grid_size=tuple(cfg.pos_embed_grid_size))  # a list from JSON / YAML
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self._build(cfg, in_chans, num_classes)
        if dtype is not None:
            self.to(dtype=dtype)

    def _build(self, cfg: NaFlexVitCfg, in_chans: int, num_classes: int) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.patch_size = cfg.patch_size
        self.embed_dim = self.num_features = self.head_hidden_size = cfg.embed_dim
        self.num_reg_tokens = cfg.reg_tokens
        self.has_class_token = cfg.class_token
        self.num_prefix_tokens = int(cfg.class_token) + cfg.reg_tokens
        self.global_pool = cfg.global_pool
        self.pool_include_prefix = cfg.pool_include_prefix
        self.attn_backend = cfg.attn_backend
        self.patch_drop_rate = cfg.patch_drop_rate
        self.grad_checkpointing = False
        self.pretrained_cfg: Dict = {}
        # timm's reconstruction record (``timm.models.get_model_args`` / ``save_for_hf`` read them): the keyword
        # arguments ``create_model`` was given, the source checkpoint's, and the input traits
        self._model_args: Dict = {}
        self.pretrained_model_args: Dict = {}
        self._traits = dict(fixed_input_size=False, first_conv='embeds.proj', img_size=None)

        self.embeds = NaFlexEmbeds(
            patch_size=cfg.patch_size, in_chans=in_chans, embed_dim=cfg.embed_dim, proj_bias=not cfg.pre_norm,
            class_token=cfg.class_token, reg_tokens=cfg.reg_tokens, pos_embed=cfg.pos_embed,
            pos_embed_grid_size=tuple(cfg.pos_embed_grid_size), pos_embed_interp_mode=cfg.pos_embed_interp_mode,
            pos_embed_ar_preserving=cfg.pos_embed_ar_preserving, pos_embed_antialias=cfg.pos_embed_antialias,
            pos_embed_align_corners=cfg.pos_embed_align_corners, pos_drop_rate=cfg.pos_drop_rate)
        self.norm_pre = _layer_norm(cfg.embed_dim) if cfg.pre_norm else nn.Identity()
        self.rope = build_rope(cfg)  # RoPE on q / k per token, see naflex.model.rope
        # timm's capability flag follows its switch; resampling works here either way (docs/model.md)
        self.supports_patch_interpolation = cfg.enable_patch_interpolator
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear decay rule
        self.blocks = nn.Sequential(*[EvaBlock(cfg, i, dpr[i]) if needs_eva_block(cfg) else Block(cfg, dpr[i])
                                      for i in range(cfg.depth)])
        self.feature_info = [
            dict(module=f'blocks.{i}', num_chs=cfg.embed_dim, reduction=cfg.patch_size) for i in range(cfg.depth)]
        fc_norm = cfg.fc_norm if cfg.fc_norm is not None else cfg.global_pool == 'avg'
        self.norm = _layer_norm(cfg.embed_dim) if cfg.final_norm and not fc_norm else nn.Identity()
        self.attn_pool = AttentionPoolLatent(
            cfg.embed_dim, cfg.attn_pool_num_heads or cfg.num_heads, cfg.attn_pool_mlp_ratio or cfg.mlp_ratio,
            cfg.act_layer) if cfg.global_pool == 'map' else None
        self.fc_norm = _layer_norm(cfg.embed_dim) if cfg.final_norm and fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # ----------------------------------------------------------------------------------------- setup / API
    def init_weights(self) -> None:
        """timm's default ViT init: trunc-normal(0.02) linears, zero biases, then 1/sqrt(2 * layer) rescale."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif hasattr(m, 'init_weights') and m is not self:  # SwiGLU gates (timm's init_weights_vit_timm)
                m.init_weights()
        self.embeds.reset_parameters()
        if self.cfg.fix_init:
            with torch.no_grad():
                for layer_id, blk in enumerate(self.blocks, start=1):
                    blk.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
                    blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str, prefix: str = '') -> None:
        """A JAX / Flax .npz checkpoint, as timm's ``load_pretrained`` (timm's ``load_checkpoint`` calls it)."""
        from .big_vision import load_npz
        load_npz(self, checkpoint_path, prefix)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        rope = {'rope.' + n for n in self.rope.no_weight_decay()} if self.rope is not None else set()
        return {'embeds.pos_embed', 'embeds.pos_embed_y', 'embeds.pos_embed_x', 'embeds.cls_token',
                'embeds.reg_token'} | rope

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r'^embeds', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_attn_backend(self, name: str) -> None:
        self.attn_backend = check_backend(name)

    def prewarm_patch_sizes(self, sizes) -> None:
        """Precompute FlexiViT resampling matrices for other patch sizes (before torch.compile)."""
        self.embeds.prewarm_patch_sizes(sizes)

    def prewarm_patch_interpolator(self, patch_sizes) -> None:
        """timm's name for ``prewarm_patch_sizes``, with its contract: a RuntimeError unless the model was built
        with ``enable_patch_interpolator=True``."""
        if not self.supports_patch_interpolation:
            raise RuntimeError('patch interpolation is not supported by this configuration '
                               '(enable_patch_interpolator=False); prewarm_patch_sizes() works regardless')
        self.prewarm_patch_sizes(patch_sizes)

    def get_patch_size(self) -> Tuple[int, int]:
        return (self.patch_size, self.patch_size)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            replace(self.cfg, global_pool=global_pool).validate()  # the constructor's pool checks
            if global_pool == 'map' and self.attn_pool is None:
                raise ValueError("cannot add attention pooling in reset_classifier()")
            if global_pool != 'map':
                self.attn_pool = None
            self.global_pool = global_pool
            # fc_norm's default follows global_pool, so a rebuild from the recorded args must be told the current one
            self._model_args = dict(self._model_args, fc_norm=not isinstance(self.fc_norm, nn.Identity))
        w = self.embeds.proj.weight
        self.head = nn.Linear(self.embed_dim, num_classes).to(w.device, w.dtype) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)  # a model in eval() keeps its new head in eval mode too

    @property
    def default_cfg(self) -> Dict:
        return self.pretrained_cfg

    # ------------------------------------------------------------------------------------------ embedding
    def _add_pos(self, x: torch.Tensor, coord: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """x [..., D] plus the position embedding of tokens at coord [..., 2] in grids grid [..., 2]
        (coord / grid may omit the batch dim of x; they then broadcast)."""
        if self.embeds.pos_embed_type == 'none':
            return x
        pe = self.embeds.pos_embed_tokens(coord.reshape(-1, 2), grid.reshape(-1, 2))
        return x + pe.unflatten(0, coord.shape[:-1]).to(x.dtype)

    def _patch_drop_active(self) -> bool:
        return self.training and self.patch_drop_rate > 0

    def _embed_padded(self, patches: torch.Tensor, coord: torch.Tensor, grid: torch.Tensor,
                      patch_size: Tuple[int, int], valid: Optional[torch.Tensor] = None,
                      image_grids: Optional[torch.Tensor] = None):
        """patches [B, N, p*p*C], coord / grid [B, N, 2] or [N, 2] (shared), valid [B, N] or None, image_grids
        [B, 2] (dict inputs) -> ([B, prefix + K, D], valid [B, K] or None, RoPE positions [B|1, prefix + K, 2] or
        None); K = N unless patch dropout runs (timm's order: position dropout, RoPE, patch dropout, norm_pre)."""
        b, n = patches.shape[:2]
        x = self._add_pos(self.embeds.project(patches, patch_size), coord, grid)  # [B, N, D]
        prefix = self.embeds.prefix_tokens()
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype)[None].expand(b, -1, -1), x], dim=1)
        x = self.embeds.pos_drop(x)
        pos = None
        if self.rope is not None:
            image_of = None if image_grids is None else torch.arange(b, device=x.device)[:, None].expand(b, n)
            pos = self.rope.coords(coord, grid, image_of, image_grids)
            pos = pos if image_grids is not None else pos[None]  # [B|1, N, 2] (image tensors share [N, 2])
        if self._patch_drop_active():
            keep = padded_keep_indices(b, n, self.patch_drop_rate, x.device)
            x, valid = drop_padded(x, valid, keep, self.num_prefix_tokens)
            if pos is not None:
                pos = pos.expand(b, -1, -1).gather(1, keep[..., None].expand(-1, -1, 2))
        if pos is not None:  # prefix tokens: position 0, the identity rotation
            pos = torch.cat([pos.new_zeros(pos.shape[0], self.num_prefix_tokens, 2), pos], dim=1)
        return self.norm_pre(x), valid, pos

    def _embed_packed(self, batch: Dict) -> Tuple[torch.Tensor, AttnContext, Dict]:
        """Embed a packed batch and insert each image's prefix tokens in front of its patches."""
        patches = batch['patches']
        p = int(batch.get('patch_size') or self.patch_size)
        patches = patches.reshape(patches.shape[0], -1)
        num_tokens = patches.shape[0]
        device = patches.device
        if 'cu_seqlens' in batch:
            cu = batch['cu_seqlens'].to(device=device, dtype=torch.long)
        else:
            seq_lens = batch['seq_lens'].to(device=device, dtype=torch.long)
            cu = F.pad(torch.cumsum(seq_lens, 0), (1, 0))
        num_images = cu.shape[0] - 1
        seq_lens = cu[1:] - cu[:-1]
        coord = batch['patch_coord'].to(device=device, dtype=torch.long)
        tok = torch.arange(num_tokens, device=device)
        seg = torch.searchsorted(cu[1:], tok, right=True)  # [T] image of each token
        if 'grid_sizes' in batch:
            grid_B2 = batch['grid_sizes'].to(device=device, dtype=torch.long)
        else:  # derive from coordinates (segment max), still no host sync
            grid_B2 = torch.zeros(num_images, 2, dtype=torch.long, device=device).scatter_reduce(
                0, seg[:, None].expand(-1, 2), coord, reduce='amax', include_self=True) + 1

        x = self.embeds.project(patches, (p, p))
        x = self._add_pos(x, coord, grid_B2[seg])
        pos = self.rope.coords(coord, grid_B2[seg], seg, grid_B2) if self.rope is not None else None
        max_len = int(batch.get('max_seqlen') or num_tokens)

        keep_index = None
        if self._patch_drop_active():  # per image, sizes from shapes only (see naflex.model.patch_drop)
            keep_index, seq_lens = drop_packed(cu, seg, self.patch_drop_rate)
            x, seg = x[keep_index], seg[keep_index]
            pos = pos[keep_index] if pos is not None else None
            cu = F.pad(torch.cumsum(seq_lens, 0), (1, 0))
            num_tokens = keep_index.shape[0]
            tok = torch.arange(num_tokens, device=device)
            max_len = packed_max_kept(max_len, self.patch_drop_rate)

        npre = self.num_prefix_tokens
        patch_pos = tok + npre * (seg + 1)  # where each patch token lands once prefixes are inserted
        cu2 = cu + npre * torch.arange(num_images + 1, device=device)
        total = num_tokens + npre * num_images
        if npre:
            prefix_pos = (cu2[:-1, None] + torch.arange(npre, device=device)[None]).reshape(-1)
            src = torch.empty(total, dtype=torch.long, device=device)
            src[patch_pos] = tok
            src[prefix_pos] = num_tokens + torch.arange(npre, device=device).repeat(num_images)
            x = torch.cat([x, self.embeds.prefix_tokens().to(x.dtype)], dim=0)[src]
            seg_all = torch.searchsorted(cu2[1:], torch.arange(total, device=device), right=True)
        else:
            seg_all = seg
        x = self.norm_pre(self.embeds.pos_drop(x))

        max_seqlen = max_len + npre
        attn_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else x.dtype
        ctx = AttnContext.packed_from(self.attn_backend, seg_all, cu2, max_seqlen, num_images, device, attn_dtype)
        if pos is not None:  # prefix tokens: position 0, the identity rotation
            self._attach_rope(ctx, pos.new_zeros(total, 2).index_copy(0, patch_pos, pos))
        meta = dict(patch_pos=patch_pos, seg=seg, seq_lens=seq_lens, cu_seqlens=cu2, seg_all=seg_all,
                    num_images=num_images)
        if keep_index is not None:
            meta['keep_index'] = keep_index  # input patch of each kept token
        return x, ctx, meta

    def _attach_rope(self, ctx: AttnContext, pos: Optional[torch.Tensor]) -> AttnContext:
        """Keep the tokens' RoPE positions (packed [T, 2], padded [B|1, N, 2]) in ``ctx``, with the (sin, cos)
        every block shares (all RoPE types but 'mixed', whose frequencies differ per block)."""
        ctx.rope_pos = pos
        if pos is not None and not self.rope.per_block:
            ctx.rope = self._rope_sincos(ctx, 0)
        return ctx

    def _rope_sincos(self, ctx: AttnContext, block: int):
        """(sin, cos) shaped for q / k: packed [T, 1|H, Dh], padded [B|1, 1|H, N, Dh]."""
        sin, cos = self.rope.embed(ctx.rope_pos, block)
        if ctx.packed:
            return (sin, cos) if self.rope.per_block else (sin[:, None], cos[:, None])
        if self.rope.per_block:  # [B, N, H, Dh] -> [B, H, N, Dh]
            return sin.transpose(1, 2), cos.transpose(1, 2)
        return sin[:, None], cos[:, None]

    def _run_block(self, i: int, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        blk = self.blocks[i]
        args = (x, ctx)
        if ctx.rope_pos is not None:
            args += (self._rope_sincos(ctx, i) if self.rope.per_block else ctx.rope,)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, *args, use_reentrant=False)
        return blk(*args)

    def _run_blocks(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        for i in range(len(self.blocks)):
            x = self._run_block(i, x, ctx)
        return x

    # -------------------------------------------------------------------------------------------- forward
    @staticmethod
    def _padded_grid(coord: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, 2] (h, w) per image from the valid tokens' coordinates."""
        return torch.where(valid[..., None], coord, torch.zeros_like(coord)).amax(dim=1) + 1

    def _image_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, AttnContext]:
        p = self.patch_size
        if self.cfg.dynamic_img_pad:  # timm's: zeros below and right up to a multiple of the patch size
            x = F.pad(x, (0, -x.shape[-1] % p, 0, -x.shape[-2] % p))
        b, c, h, w = x.shape
        check_image_size(h, w, p)
        nh, nw = h // p, w // p
        patches = x.reshape(b, c, nh, p, nw, p).permute(0, 2, 4, 3, 5, 1).reshape(b, nh * nw, p * p * c)
        coord = grid_coords(nh, nw, x.device)
        grid = coord.new_tensor([nh, nw]).expand(nh * nw, 2)
        tokens, _, pos = self._embed_padded(patches, coord, grid, (p, p))
        return tokens, self._attach_rope(AttnContext.padded_from(b), pos)

    def _padded_inputs(self, batch: Dict):
        patches = batch['patches']
        if patches.ndim == 5:  # [B, N, Ph, Pw, C] variable patch size
            ps = (patches.shape[2], patches.shape[3])
            patches = patches.flatten(2)
        else:
            p = int(batch.get('patch_size') or self.patch_size)
            ps = (p, p)
        coord = batch['patch_coord'].long()
        valid = batch['patch_valid'].bool()
        grid = self._padded_grid(coord, valid)  # [B, 2]
        b, n = valid.shape
        grid_tok = grid[:, None, :].expand(b, n, 2)
        x, valid, pos = self._embed_padded(patches, coord, grid_tok, ps, valid, grid)
        return x, valid, self._attach_rope(AttnContext.padded_from(b, self._with_prefix_valid(some_key(valid))), pos)

    def forward_features(self, x: Union[torch.Tensor, Dict], patch_coord: Optional[torch.Tensor] = None,
                         patch_valid: Optional[torch.Tensor] = None) -> Union[torch.Tensor, Dict]:
        """Image tensor -> [B, prefix + N, D]. Padded dict (or timm's ``patch_coord`` / ``patch_valid`` arguments)
        -> {'patches', 'patch_valid'} (timm's format). Packed dict -> {'tokens': [T + B*prefix, D], plus packing
        metadata for ``forward_head``}."""
        x = _naflex_args(x, patch_coord, patch_valid)
        if isinstance(x, dict):
            if is_packed(x):
                tokens, ctx, meta = self._embed_packed(x)
                tokens = self.norm(self._run_blocks(tokens, ctx))
                return dict(tokens=tokens, **meta)
            tokens, valid, ctx = self._padded_inputs(x)
            return {'patches': self.norm(self._run_blocks(tokens, ctx)), 'patch_valid': valid}
        tokens, ctx = self._image_tokens(x)
        return self.norm(self._run_blocks(tokens, ctx))

    def _with_prefix_valid(self, valid: torch.Tensor) -> torch.Tensor:
        """[B, N] patch validity -> [B, prefix + N] (prefix tokens are always valid)."""
        return torch.cat([valid.new_ones(valid.shape[0], self.num_prefix_tokens), valid], dim=1)

    def _pool_padded(self, x: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
        pool = self.global_pool  # 'map' exactly when self.attn_pool is set
        if pool == 'token':
            return x[:, 0]
        if pool == '':
            return x
        if not self.pool_include_prefix:
            x = x[:, self.num_prefix_tokens:]
        elif valid is not None:
            valid = self._with_prefix_valid(valid)
        if self.attn_pool is not None:
            return self.attn_pool(x, some_key(valid) if valid is not None else None)
        if valid is None:
            avg, mx = x.mean(1), x.amax(1)
        else:
            w = valid.to(x.dtype)[..., None]
            avg = (x * w).sum(1) / w.sum(1).clamp(min=1)
            mx = x.masked_fill(~valid[..., None], torch.finfo(x.dtype).min).amax(1)
        return {'avg': avg, 'max': mx, 'avgmax': 0.5 * (avg + mx)}[pool]

    def _pool_packed(self, f: Dict) -> torch.Tensor:
        x, num_images = f['tokens'], f['num_images']
        pool = self.global_pool  # 'map' exactly when self.attn_pool is set
        if pool == 'token':
            return x[f['cu_seqlens'][:-1]]
        if pool == '':
            return x
        if self.pool_include_prefix:
            sel, seg, counts = x, f['seg_all'], f['seq_lens'] + self.num_prefix_tokens
        else:
            sel, seg, counts = x[f['patch_pos']], f['seg'], f['seq_lens']
        if self.attn_pool is not None:
            return self.attn_pool.forward_packed(sel, seg, num_images)
        d = x.shape[-1]
        avg = x.new_zeros(num_images, d, dtype=torch.float32).index_add(0, seg, sel.float())
        avg = (avg / counts.clamp(min=1)[:, None].float()).to(x.dtype)
        if pool == 'avg':
            return avg
        mx = x.new_full((num_images, d), torch.finfo(x.dtype).min).scatter_reduce(
            0, seg[:, None].expand(-1, d), sel, reduce='amax', include_self=True)
        return mx if pool == 'max' else 0.5 * (avg + mx)

    def forward_head(self, x: Union[torch.Tensor, Dict], pre_logits: bool = False,
                     patch_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pool (per image), fc_norm, dropout, classifier. Accepts any ``forward_features`` output."""
        if isinstance(x, dict):
            x = self._pool_packed(x) if 'tokens' in x else self._pool_padded(x['patches'], x['patch_valid'])
        else:
            x = self._pool_padded(x, patch_valid)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Union[torch.Tensor, Dict], patch_coord: Optional[torch.Tensor] = None,
                patch_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Any input of the module docstring; as in timm, pre-patchified ``x`` [B, N, P*P*C] (or [B, N, Ph, Pw, C])
        may come with ``patch_coord`` and ``patch_valid`` as arguments instead of a dict."""
        return self.forward_head(self.forward_features(_naflex_args(x, patch_coord, patch_valid)))

    # -------------------------------------------------------------------------------------- intermediates
    def forward_intermediates(
            self,
            x: Union[torch.Tensor, Dict],
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            output_dict: bool = False,
    ):
        """Block outputs, with timm's arguments, return types and values (dense prediction heads, feature pyramids).

        Args:
            x: an image tensor, timm's padded NaFlex dict or the packed dict.
            indices: None: every block; an int n: the last n; a list: those blocks (negative counts from the end).
            return_prefix_tokens: pair each intermediate with its prefix (class / register) tokens.
            norm: apply the final norm to the intermediates.
            stop_early: run no block after the last one taken (the final features then come from it).
            output_fmt: 'NCHW' (image tensors only: [B, D, H/p, W/p]) or 'NLC'.
            intermediates_only: return only the intermediates.
            output_dict: a dict with 'image_intermediates', 'image_intermediates_prefix' (return_prefix_tokens),
                'patch_valid' (padded dict input), 'keep_index' (packed input under patch dropout) and
                'image_features' (unless intermediates_only).

        Returns:
            (final features, intermediates), the intermediates, or the dict. Per input, an intermediate holds the
            patch tokens only: [B, D, h, w] / [B, N, D] for images, [B, N, D] for the padded dict (its patch_valid
            marks padding), [T, D] in the input's patch order for the packed dict; prefix tokens are [B, prefix, D].
            The final features are what ``forward_features`` gives, so ``forward_head`` takes them. Under patch
            dropout (train mode) only the kept tokens appear, so dict inputs need ``output_dict`` (timm's rule).
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        meta = valid = None
        if isinstance(x, dict):
            if output_fmt == 'NCHW':  # timm's rule: one spatial reshape cannot fit every image's grid
                raise ValueError('output_fmt="NCHW" is not supported for NaFlex (dict) inputs, use "NLC"; each image '
                                 'has its own grid: patch_coord places its tokens')
            if self._patch_drop_active() and not output_dict:  # timm's rule
                raise ValueError('NaFlex forward_intermediates with active patch dropout needs output_dict=True, '
                                 'which returns the kept tokens\' patch_valid (padded) or keep_index (packed)')
            if is_packed(x):
                tokens, ctx, meta = self._embed_packed(x)
            else:
                tokens, valid, ctx = self._padded_inputs(x)
        else:
            if self._patch_drop_active() and output_fmt == 'NCHW':
                raise ValueError('output_fmt="NCHW" needs every patch token: patch dropout is active (train mode), '
                                 'use "NLC" or eval()')
            p = self.patch_size
            grid = (-(-x.shape[-2] // p), -(-x.shape[-1] // p)) if self.cfg.dynamic_img_pad else (
                x.shape[-2] // p, x.shape[-1] // p)
            tokens, ctx = self._image_tokens(x)

        intermediates = []
        for i in range(max_index + 1 if stop_early else len(self.blocks)):
            tokens = self._run_block(i, tokens, ctx)
            if i in take:
                intermediates.append(self.norm(tokens) if norm else tokens)

        npre = self.num_prefix_tokens
        if meta is not None:  # packed: each image's prefix tokens sit in front of its patches
            starts = meta['cu_seqlens'][:-1]
            prefix_pos = (starts[:, None] + torch.arange(npre, device=starts.device)[None]).reshape(-1)
            prefix = [y[prefix_pos].reshape(meta['num_images'], npre, -1) for y in intermediates]
            intermediates = [y[meta['patch_pos']] for y in intermediates]
        else:
            prefix = [y[:, :npre] for y in intermediates]
            intermediates = [y[:, npre:] for y in intermediates]
        if output_fmt == 'NCHW':
            intermediates = [y.reshape(y.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        prefix = prefix if npre else None

        final = None
        if not intermediates_only:
            final = self.norm(tokens)
            if meta is not None:
                final = dict(tokens=final, **meta)
        if output_dict:
            out = {'image_intermediates': intermediates}
            if prefix is not None and return_prefix_tokens:
                out['image_intermediates_prefix'] = prefix
            if valid is not None:
                out['patch_valid'] = valid
            if meta is not None and 'keep_index' in meta:
                out['keep_index'] = meta['keep_index']
            if final is not None:
                out['image_features'] = final
            return out
        if return_prefix_tokens and prefix is not None:
            intermediates = list(zip(intermediates, prefix))
        return intermediates if intermediates_only else (final, intermediates)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop what ``forward_intermediates(indices=...)`` does not need (timm's semantics): the blocks after the
        last index, the final norm (``prune_norm``), pooling and classifier (``prune_head``). Returns the indices,
        made absolute (negative ones would point elsewhere once blocks are gone)."""
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, '')  # also drops the attention pool
        return take
