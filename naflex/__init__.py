"""NaFlexViT model and training library.

NaFlex (SigLIP 2, arXiv:2502.14786) vision transformers with NaViT-style sequence packing (arXiv:2307.06304)
and FlexiViT patch-size flexibility (arXiv:2212.08013); timm-checkpoint compatible.
"""
from .attention import BACKENDS as ATTN_BACKENDS
from .model import NaFlexFeatures, NaFlexVit, NaFlexVitCfg
from .registry import create_model, get_config, list_models

__all__ = ['ATTN_BACKENDS', 'NaFlexFeatures', 'NaFlexVit', 'NaFlexVitCfg', 'create_model', 'get_config',
           'list_models']
