"""``create_model``: build a registered NaFlexViT variant under timm 1.0.31's ``timm.create_model`` contract.

The keywords mean what they mean in timm, so code written for ``timm.create_model`` runs unchanged:
``pretrained`` / ``pretrained_cfg`` / ``pretrained_cfg_overlay`` choose the weights and the data config
(timm's ``resolve_pretrained_cfg`` and ``_resolve_pretrained_source`` order), ``checkpoint_path`` loads a file
after creation (timm's ``load_checkpoint``: EMA first, strict), ``device`` / ``dtype`` place the parameters, and
an unknown keyword is a TypeError. Names may carry timm's sources: ``hf-hub:timm/NAME.TAG`` and
``local-dir:PATH`` (a folder written by ``timm.models.save_for_hf``: ``config.json`` plus the weights).
"""
import dataclasses
import os
import re
from typing import Any, Dict, Optional, Tuple, Union

import torch

from . import big_vision, weights
from .features import FEATURE_CLASSES, NaFlexFeatures, features_pretrained_cfg, graph_features
from .naflexvit import NaFlexVit, NaFlexVitCfg
from .registry import _VARIANTS, hub_id, split_name
from .registry import get_config as registered_config, pretrained_cfg as registered_cfg

# timm's parse_model_name: a source prefix of two or more characters (so 'C:\\' stays a path), then an opaque id
_SOURCES = ('hf-hub', 'local-dir')
_SOURCE_ALIASES = {'hf_hub': 'hf-hub'}
_SOURCE_PREFIX = re.compile(r'[a-zA-Z][a-zA-Z0-9+.\-_]+')
# pretrained_cfg keys that locate weights; setting one through the overlay resets custom_load (timm's rule)
_WEIGHT_KEYS = ('file', 'url', 'hf_hub_id', 'hf_hub_filename')
_CFG_FIELDS = tuple(f.name for f in dataclasses.fields(NaFlexVitCfg))
# how the model runs, not what it is: left out of the recorded model args (timm leaves out device and dtype), so a
# save_for_hf folder stays readable by timm
_RUNTIME_KWARGS = ('attn_backend',)
_MODEL_KWARGS = ('num_classes', 'in_chans', 'img_size', 'features_only', 'out_indices', 'feature_cls', 'feature_norm')
PathLike = Union[str, os.PathLike]


def valid_kwargs() -> Tuple[str, ...]:
    return _MODEL_KWARGS + _CFG_FIELDS


def parse_model_name(name: str) -> Tuple[Optional[str], str]:
    """(source, id) as timm splits ``hf-hub:ID`` / ``local-dir:PATH``; (None, name) for a registry name."""
    source, sep, model_id = name.partition(':')
    if not sep or not _SOURCE_PREFIX.fullmatch(source):
        return None, name
    source = _SOURCE_ALIASES.get(source.lower(), source.lower())
    if source not in _SOURCES:
        raise ValueError(f"unknown model source {source!r} in {name!r}; valid sources: {', '.join(_SOURCES)}")
    if not model_id:
        raise ValueError(f'model name {name!r} has no model id or path after {source + ":"!r}')
    return source, model_id


def read_local_dir(path: PathLike) -> Tuple[Dict[str, Any], str, Dict[str, Any]]:
    """(pretrained_cfg, architecture, model_args) of a ``save_for_hf`` folder, parsed by timm's own reader (the
    legacy single-dict layout, label names, in_chans repairs), its cfg sourcing weights from the folder.
    FileNotFoundError, one line, when the folder or its config.json is missing."""
    from timm.models._hub import load_model_config_from_path
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, 'config.json')):
        what = 'has no config.json (a folder written by timm.models.save_for_hf holds one)' if os.path.isdir(path) \
            else 'is not a folder'
        raise FileNotFoundError(f'local-dir:{path}: {what}')
    return load_model_config_from_path(path)


def get_config(name: str) -> NaFlexVitCfg:
    """The architecture ``name`` builds: a registered name (``NAME[.TAG]``, ``hf-hub:timm/NAME.TAG``), or a
    ``local-dir:PATH`` folder's architecture with the config fields of its model_args laid over it (the model its
    weights fit). ValueError, one line, for an unknown name or an unreadable folder."""
    source, model_id = parse_model_name(name)
    if source != 'local-dir':
        return registered_config(name)
    try:
        _, arch, model_args = read_local_dir(model_id)
    except (OSError, ValueError) as e:  # json errors are ValueErrors
        raise ValueError(str(e).splitlines()[0]) from None
    return dataclasses.replace(registered_config(arch), **{k: v for k, v in model_args.items() if k in _CFG_FIELDS})


def published_state_dict(name: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """(state dict, where it came from) of the weights a model name carries without a file: the weights file of a
    ``local-dir:`` folder (the one timm reads), else the published weights of a registered name on the Hugging
    Face Hub (``HubUnavailable`` when neither cached nor reachable; ValueError for a name without any)."""
    source, model_id = parse_model_name(name)
    if source == 'local-dir':
        path = weights.dir_weights_file(model_id)
        return weights.read_state_dict(path), path
    repo = hub_id(name)
    return weights.read_hub_state_dict(repo), f'hf-hub:{repo}'


def resolve_pretrained_cfg(arch: str, tag: str, pretrained_cfg=None, overlay: Optional[Dict] = None) -> Dict:
    """The model's pretrained_cfg as timm resolves it: a str is a tag of ``arch``; a dict / timm PretrainedCfg
    replaces the registered cfg; ``overlay`` replaces single entries (an unknown key is timm's TypeError)."""
    if isinstance(pretrained_cfg, str):
        tag, pretrained_cfg = split_name(f'{arch}.{pretrained_cfg}')[1], None
    if not pretrained_cfg and not overlay:
        return registered_cfg(f'{arch}.{tag}')
    from timm.models import PretrainedCfg  # lazy: importing timm costs seconds
    if not pretrained_cfg:
        cfg = PretrainedCfg(**registered_cfg(f'{arch}.{tag}'))
    elif isinstance(pretrained_cfg, dict):
        cfg = PretrainedCfg(**pretrained_cfg)
    else:
        cfg = pretrained_cfg
    overlay = dict(overlay or {})
    if not cfg.architecture:
        overlay.setdefault('architecture', arch)
    if any(overlay.get(k) for k in _WEIGHT_KEYS):
        overlay.setdefault('custom_load', False)
    return dataclasses.replace(cfg, **overlay).to_dict()


def weights_source(cfg: Dict) -> Tuple[str, Any]:
    """Where ``pretrained=True`` reads the weights of ``cfg`` from, in timm's order: ('state_dict', dict),
    ('file', path), ('dir', folder), ('hub', (repo, filename)); ('', None) when it names none."""
    source = cfg.get('source') or ''
    if source == 'local-dir':
        return 'dir', cfg['file']
    if source != 'hf-hub':
        if cfg.get('state_dict'):
            return 'state_dict', cfg['state_dict']
        if cfg.get('file'):
            return ('dir' if os.path.isdir(cfg['file']) else 'file'), cfg['file']
    if cfg.get('hf_hub_id'):
        return 'hub', (cfg['hf_hub_id'], cfg.get('hf_hub_filename'))
    if cfg.get('url'):
        raise ValueError(f"{cfg.get('architecture')}: weights by url ({cfg['url']}) are not read here; download the "
                         "file and pass pretrained_cfg_overlay=dict(file=PATH)")
    return '', None


def _load_pretrained(model: NaFlexVit, where: Tuple[str, Any], custom_load: bool = False) -> None:
    """Strict, except that a classifier of another size keeps its fresh initialization (as timm drops it). A
    JAX / Flax .npz file (by its extension, or a file with ``custom_load``) loads as timm's ``load_pretrained``."""
    kind, loc = where
    if kind == 'hub':
        repo, filename = loc
        state = weights.read_hub_state_dict(repo, filename=filename or weights.HUB_FILE)
        source = f'hf-hub:{repo}'
    elif kind == 'state_dict':
        state, source = weights.strip_prefixes(loc), 'the pretrained_cfg state_dict'
    else:
        path = weights.dir_weights_file(loc) if kind == 'dir' else loc
        if custom_load or weights.is_npz(path):  # timm: custom_load files go to model.load_pretrained (.npz)
            big_vision.load_npz(model, path)
            return
        state, source = weights.read_state_dict(path), repr(os.fspath(path))
    weights.load_into(model, state, source=source, reinit_head=True)


def create_model(
        model_name: str,
        pretrained: Union[bool, PathLike, None] = False,
        pretrained_cfg: Union[str, Dict, Any, None] = None,
        pretrained_cfg_overlay: Optional[Dict] = None,
        checkpoint_path: Optional[PathLike] = None,
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
        **kwargs,
) -> torch.nn.Module:
    """Build a registered NaFlexViT variant, as ``timm.create_model`` builds the same name.

    Args:
        model_name: a name from ``list_models()``, optionally ``NAME.TAG`` (``list_models(pretrained=True)``),
            ``hf-hub:timm/NAME.TAG``, or ``local-dir:PATH`` (a ``save_for_hf`` folder: its config.json gives
            the architecture, the model arguments and the pretrained_cfg; ``pretrained=True`` its weights).
        pretrained: True: the weights the resolved pretrained_cfg names (state_dict, file, then the Hugging Face
            Hub through timm's loader and huggingface_hub's cache; ``HubUnavailable`` when neither cached nor
            reachable). A path: that local file (an extension of timm's bool). Loaded strictly, except that the
            classifier keeps its fresh initialization when ``num_classes`` differs from the weights'.
        pretrained_cfg: a tag of ``model_name``, or a dict / timm ``PretrainedCfg`` replacing the registered one.
        pretrained_cfg_overlay: entries replacing those of the pretrained_cfg, e.g. ``dict(file=PATH)``.
        checkpoint_path: a file loaded after creation, as timm's ``load_checkpoint`` (EMA copy first, strict).
        device / dtype: where the parameters are created / the dtype they are cast to.
        **kwargs: any ``NaFlexVitCfg`` field and num_classes, in_chans (default: the pretrained_cfg's), img_size
            (timm's: sizes the position table only when pos_embed_grid_size is None),
            features_only (with out_indices, feature_norm and feature_cls: 'getter', ``NaFlexFeatures``, timm's
            FeatureGetterNet; or 'fx', timm's FeatureGraphNet over the traced model). Another key is a TypeError.
    """
    source, model_id = parse_model_name(model_name)
    kwargs, model_args = dict(kwargs), {}
    if source == 'local-dir':
        if pretrained_cfg:
            raise ValueError(f'{model_name}: pretrained_cfg comes from the folder\'s config.json; do not pass one')
        pretrained_cfg, arch_name, model_args = read_local_dir(model_id)
        for key, value in model_args.items():
            kwargs.setdefault(key, value)
        arch, tag = split_name(arch_name)
        tag = pretrained_cfg.get('tag') or tag
    else:
        arch, tag = split_name(model_name)  # hf-hub:timm/NAME.TAG names the registered variant
    unknown = sorted(set(kwargs) - set(valid_kwargs()))
    if unknown:
        raise TypeError(f'create_model() got unexpected keyword argument(s) {unknown} for {model_name}; valid: '
                        f'{", ".join(valid_kwargs())}')
    cfg = resolve_pretrained_cfg(arch, tag, pretrained_cfg, pretrained_cfg_overlay)
    where = ('file', pretrained) if isinstance(pretrained, (str, os.PathLike)) else ('', None)
    if pretrained is True:
        where = weights_source(cfg)
        if not where[0]:  # no weights: fail before building anything
            hub_id(arch if source == 'local-dir' else model_name)  # the registry's message, naming those with weights
            raise ValueError(f'{model_name}: its pretrained_cfg names no weights (file, state_dict or hf_hub_id)')
    recorded = {k: v for k, v in kwargs.items() if k not in _RUNTIME_KWARGS}
    if cfg.get('num_classes') is not None and cfg['num_classes'] >= 0:
        kwargs.setdefault('num_classes', cfg['num_classes'])
    if cfg.get('input_size'):
        kwargs.setdefault('in_chans', cfg['input_size'][0])
    features_only = kwargs.pop('features_only', False)
    out_indices = kwargs.pop('out_indices', 3)
    feature_cls = kwargs.pop('feature_cls', 'getter')
    feature_norm = kwargs.pop('feature_norm', False)
    feature_cls = 'getter' if feature_cls is NaFlexFeatures else str(feature_cls).lower()
    if features_only and feature_cls not in FEATURE_CLASSES:
        raise ValueError(f'feature_cls={feature_cls!r} is not available for NaFlexViT; valid: '
                         f'{", ".join(FEATURE_CLASSES)} (timm\'s FeatureGetterNet and FeatureGraphNet)')
    model = NaFlexVit(_VARIANTS[arch][0], device=device, dtype=dtype, **kwargs)
    model.pretrained_cfg = cfg
    model.pretrained_model_args = dict(model_args)  # what the source folder's weights were built with
    if where[0]:
        _load_pretrained(model, where, custom_load=bool(cfg.get('custom_load')) and pretrained is True)
    npz_checkpoint = bool(checkpoint_path) and weights.is_npz(checkpoint_path)
    if npz_checkpoint:  # timm's load_checkpoint hands a .npz file to model.load_pretrained
        big_vision.load_npz(model, checkpoint_path)
    if features_only and feature_cls == 'fx':
        model = graph_features(model, out_indices)
        model.pretrained_cfg = model.default_cfg = features_pretrained_cfg(cfg)
    elif features_only:
        model = NaFlexFeatures(model, out_indices=out_indices, norm=feature_norm)
    # what timm's get_model_args / save_for_hf read to rebuild this model (timm records the same keywords)
    model._model_args = recorded
    if checkpoint_path and not npz_checkpoint:
        weights.load_into(model, weights.read_state_dict(checkpoint_path), source=repr(os.fspath(checkpoint_path)))
    return model
