"""Feature extraction: which blocks to take (timm's ``feature_take_indices``) and the ``features_only`` wrapper.

``NaFlexFeatures`` is timm's ``FeatureGetterNet`` for this model: it prunes what the requested blocks do not need
(``prune_intermediate_layers``) and returns ``forward_intermediates(..., intermediates_only=True)``, so the wrapped
state dict (keys ``model.*``) and the outputs equal timm's ``features_only=True`` model's.
"""
from copy import deepcopy
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

# create_model(features_only=True, feature_cls=...): 'getter' (NaFlexFeatures, timm's NaFlexViT default) or 'fx'
# (timm's FeatureGraphNet: the block outputs of the torch.fx-traced image forward, prefix tokens included, NLC)
FEATURE_CLASSES = ('getter', 'fx')


def graph_features(model: nn.Module, out_indices: Union[int, Sequence[int]]) -> nn.Module:
    """timm's FeatureGraphNet around ``model`` (torchvision's fx feature extraction; image tensors only), with the
    input traits copied as timm copies them."""
    from timm.models._features_fx import FeatureGraphNet  # lazy: importing timm costs seconds
    out_indices = feature_take_indices(len(model.blocks), out_indices)[0]
    features = FeatureGraphNet(model, out_indices=out_indices)
    features._traits, features.in_chans = dict(model._traits), model.in_chans
    return features


def features_pretrained_cfg(cfg: Dict) -> Dict:
    """A backbone's pretrained_cfg, as timm's ``pretrained_cfg_for_features``: without the classifier entries
    (num_classes, classifier, global_pool), which describe a head the wrapper does not have."""
    cfg = deepcopy(cfg)
    for key in ('num_classes', 'classifier', 'global_pool'):
        cfg.pop(key, None)
    return cfg


def feature_take_indices(num_blocks: int, indices: Optional[Union[int, Sequence[int]]] = None) -> Tuple[List[int], int]:
    """(absolute indices, the largest) of the blocks to take, as timm: None: all; an int n: the last n; a sequence:
    those (negative from the end). An index out of range is a ValueError saying the valid range."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f'last-n ({indices}) is out of range (1 to {num_blocks})')
        take = list(range(num_blocks - indices, num_blocks))
    else:
        take = []
        for i in indices:
            idx = num_blocks + i if i < 0 else i
            if not 0 <= idx < num_blocks:
                raise ValueError(f'feature index {idx} is out of range (0 to {num_blocks - 1})')
            take.append(idx)
    return take, max(take)


class NaFlexFeatures(nn.Module):
    """``features_only`` wrapper, timm's FeatureGetterNet: the outputs of blocks ``out_indices`` (see
    ``feature_take_indices``), [B, D, H/p, W/p] each for an image tensor (``output_fmt='NLC'``: [B, N, D]; dict
    inputs take 'NLC'). ``norm``: apply the final norm to them (else it is pruned with the head)."""

    def __init__(self, model: nn.Module, out_indices: Union[int, Sequence[int]] = 4, norm: bool = False,
                 output_fmt: str = 'NCHW', prune: bool = True):
        super().__init__()
        if prune:  # absolute indices: negative ones would point elsewhere once blocks are gone
            out_indices = model.prune_intermediate_layers(out_indices, prune_norm=not norm)
        else:
            out_indices = feature_take_indices(len(model.blocks), out_indices)[0]
        from timm.models._features import FeatureInfo  # lazy: importing timm costs seconds
        self.feature_info = FeatureInfo(model.feature_info, out_indices)  # timm's helper: .channels(), .reduction()
        self.model = model
        self.out_indices = out_indices
        self.norm = norm
        self.output_fmt = output_fmt
        self.pretrained_cfg = features_pretrained_cfg(getattr(model, 'pretrained_cfg', {}))
        # timm copies the input traits to the wrapper, so its data-config helpers read the wrapper like the model
        self._traits = dict(getattr(model, '_traits', {}))
        self.in_chans = model.in_chans

    @property
    def default_cfg(self) -> Dict:
        return self.pretrained_cfg  # timm's older name

    def forward(self, x) -> List[torch.Tensor]:
        return self.model.forward_intermediates(
            x, indices=self.out_indices, norm=self.norm, output_fmt=self.output_fmt, intermediates_only=True)
