"""Registry of NaFlexViT variants: ``list_models``, ``get_config``, names, tags and pretrained_cfgs.

Each variant is a small ``NaFlexVitCfg`` with the same hyper-parameters as timm 1.0.31's registration of the
same name (NaFlex from SigLIP 2, arXiv:2502.14786; packing / factorized embeddings from NaViT,
arXiv:2307.06304), plus tiny variants (depth 2, width 64) for tests and the demo. An unknown name or tag is a
ValueError listing the valid ones; ``naflex.model.factory.create_model`` builds the variants.

The C-RADIO backbones (NVIDIA's RADIO, arXiv:2412.07679; v4: arXiv:2601.17237) are registered as timm registers
them: a class token read by ``global_pool='token'``, the other per-teacher summary tokens as registers, no final
norm, and a 128x128 position table resized bilinearly (no anti-aliasing) to a square of the larger grid side.

Names follow timm: ``architecture.tag`` names a variant and its published weights
(``naflexvit_base_patch16_gap.e300_s576_in1k``); a bare architecture means its default tag.
"""
import fnmatch
from typing import Dict, List, Sequence, Tuple, Union

import torch

from .naflexvit import NaFlexVitCfg

_INCEPTION_MEAN = (0.5, 0.5, 0.5)
_INCEPTION_STD = (0.5, 0.5, 0.5)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, which the C-RADIO weights expect
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _pretrained_cfg(name: str, tag: str = '', num_classes: int = 1000) -> Dict:
    """The pretrained_cfg timm 1.0.31 gives ``name.tag`` (its ``_cfg`` with the null entries dropped, as
    ``PretrainedCfg.to_dict`` does, in its order), so ``timm.data.resolve_model_data_config(model)`` works."""
    hub = {'hf_hub_id': _HUB_WEIGHTS[f'{name}.{tag}']} if f'{name}.{tag}' in _HUB_WEIGHTS else {}
    radio = '_radio_' in name
    cfg = {
        'url': '', **hub, 'architecture': name, 'tag': tag,
        'custom_load': False, 'input_size': (3, 512, 512) if radio else (3, 384, 384), 'fixed_input_size': False,
        'interpolation': 'bicubic', 'crop_pct': 1.0, 'crop_mode': 'center',
        'mean': _CLIP_MEAN if radio else _INCEPTION_MEAN, 'std': _CLIP_STD if radio else _INCEPTION_STD,
        'num_classes': num_classes, 'pool_size': None, 'first_conv': 'embeds.proj', 'classifier': 'head',
        'license': 'nvidia-open-model-license' if radio else 'apache-2.0',
    }
    if radio:
        cfg.update(origin_url='https://github.com/NVlabs/RADIO',
                   paper_ids='arXiv:2601.17237' if name.endswith('_v4') else 'arXiv:2412.07679')
    return cfg


def pretrained_cfg(name: str) -> Dict:
    """A fresh copy of the registered pretrained_cfg of ``name`` (``architecture[.tag]``)."""
    arch, tag = split_name(name)
    return _pretrained_cfg(arch, tag, num_classes=_VARIANTS[arch][2])


_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
_SO150M2 = dict(patch_size=16, embed_dim=832, depth=21, num_heads=13, mlp_ratio=34 / 13, init_values=1e-5,
                qkv_bias=False, reg_tokens=1)
_TINY = dict(patch_size=16, embed_dim=64, depth=2, num_heads=4, init_values=1e-5)
# timm's _radio_vit_cfg. pos_embed_align_corners follows each checkpoint's own code (timm's note): True for the
# C-RADIOv3 B and H weights, False for v3 L / g (their code changed in 2025-07, same weights) and for v4.
_RADIO = dict(patch_size=16, class_token=True, global_pool='token', final_norm=False, pos_embed_grid_size=(128, 128),
              pos_embed_interp_mode='bilinear', pos_embed_ar_preserving=True, pos_embed_antialias=False)

# name -> (config, pretrained tag, default num_classes)
_VARIANTS: Dict[str, Tuple[NaFlexVitCfg, str, int]] = {
    'naflexvit_base_patch16_gap': (NaFlexVitCfg(
        **_BASE, init_values=1e-5, global_pool='avg', reg_tokens=4, fc_norm=True), 'e300_s576_in1k', 1000),
    'naflexvit_base_patch16_par_gap': (NaFlexVitCfg(
        **_BASE, init_values=1e-5, pos_embed_ar_preserving=True, global_pool='avg', reg_tokens=4, fc_norm=True),
        'e300_s576_in1k', 1000),
    'naflexvit_base_patch16_parfac_gap': (NaFlexVitCfg(
        **_BASE, init_values=1e-5, pos_embed_ar_preserving=True, pos_embed='factorized', global_pool='avg',
        reg_tokens=4, fc_norm=True), 'e300_s576_in1k', 1000),
    'naflexvit_base_patch16_map': (NaFlexVitCfg(
        **_BASE, init_values=1e-5, global_pool='map', reg_tokens=1), 'untrained', 1000),
    'naflexvit_so150m2_patch16_reg1_gap': (NaFlexVitCfg(
        **_SO150M2, global_pool='avg', fc_norm=True), 'untrained', 1000),
    'naflexvit_so150m2_patch16_reg1_map': (NaFlexVitCfg(**_SO150M2, global_pool='map'), 'untrained', 1000),
    'naflexvit_base_patch16_siglip': (NaFlexVitCfg(
        **_BASE, act_layer='gelu_tanh', global_pool='map', pos_embed_interp_mode='bilinear'), 'v2_webli', 0),
    'naflexvit_so400m_patch16_siglip': (NaFlexVitCfg(
        patch_size=16, embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, act_layer='gelu_tanh',
        global_pool='map', pos_embed_interp_mode='bilinear'), 'v2_webli', 0),
    'naflexvit_base_patch16_radio_v3': (NaFlexVitCfg(
        **_RADIO, embed_dim=768, depth=12, num_heads=12, init_values=1e-5, reg_tokens=7, pos_embed_align_corners=True),
        'c_radio', 0),
    'naflexvit_large_patch16_radio_v3': (NaFlexVitCfg(
        **_RADIO, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5, reg_tokens=7), 'c_radio', 0),
    'naflexvit_huge_patch16_radio_v3': (NaFlexVitCfg(
        **_RADIO, embed_dim=1280, depth=32, num_heads=16, reg_tokens=7, pos_embed_align_corners=True), 'c_radio', 0),
    'naflexvit_giant_patch16_radio_v3': (NaFlexVitCfg(
        **_RADIO, embed_dim=1536, depth=40, num_heads=24, reg_tokens=7), 'c_radio', 0),
    'naflexvit_so400m_patch16_radio_v4': (NaFlexVitCfg(
        **_RADIO, embed_dim=1152, depth=27, num_heads=16, mlp_ratio=4304 / 1152, reg_tokens=9), 'c_radio', 0),
    'naflexvit_huge_patch16_radio_v4': (NaFlexVitCfg(
        **_RADIO, embed_dim=1280, depth=32, num_heads=16, reg_tokens=9), 'c_radio', 0),
    # tiny variants for tests / demo (same structure as the base variants above)
    'naflexvit_tiny_test': (NaFlexVitCfg(**_TINY, global_pool='avg', reg_tokens=4, fc_norm=True), '', 1000),
    'naflexvit_tiny_test_par': (NaFlexVitCfg(
        **_TINY, pos_embed_ar_preserving=True, global_pool='avg', reg_tokens=4, fc_norm=True), '', 1000),
    'naflexvit_tiny_test_parfac': (NaFlexVitCfg(
        **_TINY, pos_embed_ar_preserving=True, pos_embed='factorized', global_pool='avg', reg_tokens=4,
        fc_norm=True), '', 1000),
    'naflexvit_tiny_test_map': (NaFlexVitCfg(**_TINY, global_pool='map', reg_tokens=1), '', 1000),
    'naflexvit_tiny_test_token': (NaFlexVitCfg(
        **_TINY, class_token=True, reg_tokens=2, global_pool='token'), '', 1000),
}

DEFAULT_MODEL = 'naflexvit_base_patch16_gap'  # the model card's model: train.py's and validate.py's --model default

# The weights timm 1.0.31 publishes on the Hugging Face Hub (its default_cfgs with hf_hub_id='timm/'):
# 'architecture.tag' -> hub repository. 'untrained' tags have none.
_HUB_WEIGHTS: Dict[str, str] = {f'{name}.{tag}': f'timm/{name}.{tag}' for name, tag in (
    ('naflexvit_base_patch16_gap', 'e300_s576_in1k'), ('naflexvit_base_patch16_par_gap', 'e300_s576_in1k'),
    ('naflexvit_base_patch16_parfac_gap', 'e300_s576_in1k'), ('naflexvit_base_patch16_siglip', 'v2_webli'),
    ('naflexvit_so400m_patch16_siglip', 'v2_webli'),
    *((f'naflexvit_{size}_patch16_radio_{v}', 'c_radio') for size, v in (
        ('base', 'v3'), ('large', 'v3'), ('huge', 'v3'), ('giant', 'v3'), ('so400m', 'v4'), ('huge', 'v4'))))}


def list_models(filter: Union[str, Sequence[str]] = '', pretrained: bool = False) -> List[str]:
    """Registered variant names, as timm's ``list_models``: ``filter`` is a wildcard pattern (fnmatch:
    ``'naflexvit_base*'``) or a list of them; ``pretrained=True`` lists the ``architecture.tag`` names that have
    published weights."""
    names = sorted(_HUB_WEIGHTS if pretrained else _VARIANTS)
    patterns = [filter] if isinstance(filter, str) else list(filter)
    patterns = [p for p in patterns if p]
    return [n for n in names if not patterns or any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def _tags(arch: str) -> List[str]:
    """The pretrained tags of a registered architecture, its default first."""
    default = _VARIANTS[arch][1]
    published = sorted(n.partition('.')[2] for n in _HUB_WEIGHTS if n.partition('.')[0] == arch)
    return [default] + [t for t in published if t != default]


_HUB_PREFIXES = ('hf-hub:timm/', 'timm/')  # timm's names for its Hub repositories: hf-hub:timm/NAME.TAG


def split_name(name: str) -> Tuple[str, str]:
    """(architecture, pretrained tag) of ``name`` or ``name.tag`` (or timm's ``hf-hub:timm/name.tag`` /
    ``timm/name.tag``); a bare name gets its default tag. ValueError, one line listing the valid choices, for an
    unknown architecture or tag."""
    prefix = next((p for p in _HUB_PREFIXES if name.startswith(p)), '')
    if not prefix and name.startswith('hf-hub:'):
        raise ValueError(f'{name}: of the Hugging Face Hub only the timm/ repositories of {", ".join(_HUB_WEIGHTS)} '
                         'are known here')
    arch, _, tag = name[len(prefix):].partition('.')
    if arch not in _VARIANTS:
        raise ValueError(f'unknown model {arch!r}; valid: {", ".join(list_models())}')
    tag = tag or _VARIANTS[arch][1]
    if tag not in _tags(arch):
        valid = ', '.join(repr(t) for t in _tags(arch) if t) or 'none (it has no pretrained weights)'
        raise ValueError(f'unknown pretrained tag {tag!r} for {arch}; valid tags: {valid}')
    return arch, tag


def get_config(name: str) -> NaFlexVitCfg:
    return _VARIANTS[split_name(name)[0]][0]


def hub_id(name: str) -> str:
    """The Hugging Face Hub repository holding the weights of ``name`` (``architecture[.tag]``); ValueError when
    it has none (tiny and 'untrained' variants), naming the ones that do."""
    arch, tag = split_name(name)
    repo = _HUB_WEIGHTS.get(f'{arch}.{tag}')
    if not repo:
        raise ValueError(f'{name} has no published weights (those that do: {", ".join(list_models(pretrained=True))})')
    return repo


def data_config(model: torch.nn.Module) -> Dict:
    """The input normalization and eval resize a model was trained with: ``mean``, ``std``, ``interpolation``
    (from its ``pretrained_cfg``: SigLIP's 0.5 / 0.5 for most variants, OpenAI CLIP's for C-RADIO; bicubic for all)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return {'mean': tuple(cfg.get('mean', _INCEPTION_MEAN)), 'std': tuple(cfg.get('std', _INCEPTION_STD)),
            'interpolation': cfg.get('interpolation', 'bicubic')}
