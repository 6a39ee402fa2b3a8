"""The shared backbone: ResNet with 1-3 modality-specific stems, optional AGW non-local
blocks, GeM pooling and a BNNeck."""
from .backbone import (DESCRIPTORS, MODALITIES, BNNeckHead, GeM, ModelOutput, ReIDBackbone, build_model,
                       feature_dim, feature_map_size, load_pretrained)
from .non_local import NonLocalBlock
from .safl import MAM, SAFL, DualBNNeck

__all__ = ["BNNeckHead", "DESCRIPTORS", "DualBNNeck", "GeM", "MAM", "MODALITIES", "ModelOutput", "NonLocalBlock",
           "ReIDBackbone", "SAFL", "build_model", "feature_dim", "feature_map_size", "load_pretrained"]
