"""The shared backbone: ResNet with 1-3 modality-specific stems, optional AGW non-local
blocks, GeM pooling and a BNNeck."""
from .backbone import (DESCRIPTORS, MODALITIES, BNNeckHead, GeM, ModelOutput, ReIDBackbone, build_model,
                       load_pretrained)
from .non_local import NonLocalBlock

__all__ = ["BNNeckHead", "DESCRIPTORS", "GeM", "MODALITIES", "ModelOutput", "NonLocalBlock", "ReIDBackbone",
           "build_model", "load_pretrained"]
