"""Registry of NaFlexViT variants and ``create_model`` / ``list_models``.

Each variant is a small ``NaFlexVitCfg`` with the same hyper-parameters as timm 1.0.31's registration of the
same name (NaFlex from SigLIP 2, arXiv:2502.14786; packing / factorized embeddings from NaViT,
arXiv:2307.06304), plus tiny variants (depth 2, width 64) for tests and the demo. ``create_model`` rejects an
unknown name or override with a message listing the valid ones.

Names follow timm: ``architecture.tag`` names a variant and its published weights
(``naflexvit_base_patch16_gap.e300_s576_in1k``); a bare architecture means its default tag.
``create_model(name, pretrained=True)`` fetches those weights from the Hugging Face Hub through timm's loader and
huggingface_hub's cache (see ``naflex.model.weights.read_hub_state_dict``); ``pretrained=PATH`` loads a local file.
"""
import fnmatch
import os
from dataclasses import fields, replace
from typing import Dict, List, Sequence, Tuple, Union

import torch

from .naflexvit import NaFlexFeatures, NaFlexVit, NaFlexVitCfg

_INCEPTION_MEAN = (0.5, 0.5, 0.5)
_INCEPTION_STD = (0.5, 0.5, 0.5)


def _pretrained_cfg(name: str, tag: str = '', num_classes: int = 1000, **kwargs) -> Dict:
    """A pretrained_cfg like timm's, so ``timm.data.resolve_model_data_config(model)`` works."""
    return {
        'url': '', 'hf_hub_id': _HUB_WEIGHTS.get(f'{name}.{tag}', ''), 'architecture': name, 'tag': tag,
        'custom_load': False, 'input_size': (3, 384, 384), 'fixed_input_size': False,
        'interpolation': 'bicubic', 'crop_pct': 1.0, 'crop_mode': 'center',
        'mean': _INCEPTION_MEAN, 'std': _INCEPTION_STD, 'num_classes': num_classes, 'pool_size': None,
        'first_conv': 'embeds.proj', 'classifier': 'head', 'license': 'apache-2.0', **kwargs,
    }


_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
_SO150M2 = dict(patch_size=16, embed_dim=832, depth=21, num_heads=13, mlp_ratio=34 / 13, init_values=1e-5,
                qkv_bias=False, reg_tokens=1)
_TINY = dict(patch_size=16, embed_dim=64, depth=2, num_heads=4, init_values=1e-5)

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
    ('naflexvit_so400m_patch16_siglip', 'v2_webli'))}

_CFG_FIELDS = tuple(f.name for f in fields(NaFlexVitCfg))
_EXTRA_KWARGS = ('num_classes', 'in_chans', 'features_only', 'out_indices', 'feature_norm')


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
    (from its ``pretrained_cfg``; the registry's variants all use SigLIP's 0.5 / 0.5 and bicubic)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return {'mean': tuple(cfg.get('mean', _INCEPTION_MEAN)), 'std': tuple(cfg.get('std', _INCEPTION_STD)),
            'interpolation': cfg.get('interpolation', 'bicubic')}


def valid_overrides() -> Tuple[str, ...]:
    return _EXTRA_KWARGS + _CFG_FIELDS


def create_model(name: str, pretrained: Union[bool, str, os.PathLike, None] = None, **overrides) -> torch.nn.Module:
    """Build a registered NaFlexViT variant.

    Args:
        name: a name from ``list_models()``, optionally with its pretrained tag (``list_models(pretrained=True)``).
        pretrained: None / False; True: the published weights of ``name``, fetched from the Hugging Face Hub into
            huggingface_hub's cache (``HF_HUB_OFFLINE=1`` reads the cache only; ``HubUnavailable`` when the
            weights are neither cached nor reachable); or a local .safetensors / .pth / .pt / .bin file (timm or
            this project's checkpoint; plain state dict or wrapped in 'state_dict' / 'model' / 'state_dict_ema').
            Loaded strictly, except that the classifier is skipped when ``num_classes`` differs from the weights'.
        **overrides: any ``NaFlexVitCfg`` field (drop_rate, drop_path_rate, global_pool, pos_embed_*,
            attn_backend, ...) and num_classes, in_chans, features_only, out_indices, feature_norm.
    """
    arch, tag = split_name(name)
    base_cfg, _, default_classes = _VARIANTS[arch]
    repo = hub_id(name) if pretrained is True else ''  # no published weights: fail before building anything
    unknown = sorted(set(overrides) - set(valid_overrides()))
    if unknown:
        raise ValueError(f'unknown override(s) {unknown} for {name}; valid: {", ".join(valid_overrides())}')
    num_classes = overrides.pop('num_classes', default_classes)
    in_chans = overrides.pop('in_chans', 3)
    features_only = overrides.pop('features_only', False)
    out_indices = overrides.pop('out_indices', 3)
    feature_norm = overrides.pop('feature_norm', False)
    if 'pos_embed_grid_size' in overrides:
        overrides['pos_embed_grid_size'] = tuple(overrides['pos_embed_grid_size'])
    model = NaFlexVit(replace(base_cfg, **overrides), num_classes=num_classes, in_chans=in_chans)  # validates cfg
    model.pretrained_cfg = _pretrained_cfg(arch, tag, num_classes=default_classes)
    if repo:
        from .weights import load_hub_pretrained
        load_hub_pretrained(model, repo)
    elif pretrained:
        from .weights import load_pretrained
        load_pretrained(model, pretrained)
    if features_only:
        return NaFlexFeatures(model, out_indices=out_indices, norm=feature_norm)
    return model
