"""Backbones: the two-stream ResNet of LbA with GeM pooling and a BNNeck classifier."""
from .two_stream import BNNeckHead, GeM, ModelOutput, TwoStreamResNet, build_model, load_pretrained

__all__ = ["BNNeckHead", "GeM", "ModelOutput", "TwoStreamResNet", "build_model", "load_pretrained"]
