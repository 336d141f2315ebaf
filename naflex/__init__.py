"""NaFlexViT: the model library (``naflex.model``) and the trainer built on it (``naflex.train``).

``import naflex`` gives the model library's API (``create_model``, ``list_models``, ...) and loads nothing of
the trainer or the data pipeline. NaFlex: SigLIP 2 (arXiv:2502.14786); packing: NaViT (arXiv:2307.06304);
variable patch size: FlexiViT (arXiv:2212.08013).
"""
from .model import (ATTN_BACKENDS, DEFAULT_MODEL, HubUnavailable, NaFlexFeatures, NaFlexVit, NaFlexVitCfg,
                    WeightsMismatch, create_model, data_config, get_config, list_models, load_into, read_state_dict)

__all__ = ['ATTN_BACKENDS', 'DEFAULT_MODEL', 'HubUnavailable', 'NaFlexFeatures', 'NaFlexVit', 'NaFlexVitCfg',
           'WeightsMismatch', 'create_model', 'data_config', 'get_config', 'list_models', 'load_into',
           'read_state_dict']
