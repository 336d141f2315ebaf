"""The NaFlexViT model library: architecture, attention backends, position / patch embeddings, the variant
registry, weight files and the batch contract. It imports nothing from the loaders or the trainer.

NaFlex (SigLIP 2, arXiv:2502.14786) vision transformers with NaViT-style sequence packing (arXiv:2307.06304)
and FlexiViT patch-size flexibility (arXiv:2212.08013); timm-checkpoint compatible.
"""
from .attention import BACKENDS as ATTN_BACKENDS
from .factory import create_model, get_config
from .features import NaFlexFeatures
from .naflexvit import NaFlexVit, NaFlexVitCfg
from .registry import DEFAULT_MODEL, data_config, list_models
from .weights import HubUnavailable, WeightsMismatch, load_into, read_state_dict

__all__ = ['ATTN_BACKENDS', 'DEFAULT_MODEL', 'HubUnavailable', 'NaFlexFeatures', 'NaFlexVit', 'NaFlexVitCfg',
           'WeightsMismatch', 'create_model', 'data_config', 'get_config', 'list_models', 'load_into',
           'read_state_dict']
