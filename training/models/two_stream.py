"""Two-stream ResNet of LbA (ALGORITHMS.md §2.1) with GeM pooling and a BNNeck classifier.

* modality-specific stems (``visible_stem``, ``infrared_stem``: conv1/bn1/relu/maxpool),
  shared ``layer1``..``layer4`` (the released LbA code's choice), last stride 1;
* feature taps: ``layer3`` output (LbA's conv4-6) and ``layer4`` output (conv5-3);
* GeM pooling, fixed or learnable ``p`` (LbA: fixed p = 3);
* BNNeck: ``BatchNorm1d`` with its bias frozen at 0, then a bias-free ``Linear``
  (training only; test descriptors are the GeM-pooled features, §2.7).

``depth`` 18/34/50/101 and ``width`` (channels of the stem; torchvision uses 64) pick
the backbone: ResNet-50 at width 64 is the paper's; depth 18 at width 16 with stem
stride 1 is a CPU-sized network for the synthetic demo.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, NamedTuple

import torch
from torch import nn

from .resnet import DEPTHS, Stem, init_resnet, make_layer


class GeM(nn.Module):
    """Generalised-mean pooling: (mean_p x(p)^p)^(1/p) per channel (LbA: p = 3, fixed)."""

    def __init__(self, p: float = 3.0, learnable: bool = False, eps: float = 1e-6):
        super().__init__()
        p_tensor = torch.tensor(float(p))
        if learnable:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer("p", p_tensor)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.to(x.dtype)
        return x.clamp(min=self.eps).pow(p).flatten(2).mean(-1).pow(1.0 / p)


class BNNeckHead(nn.Module):
    """BatchNorm1d (bias frozen at 0) -> Linear without bias; LbA's initialisation."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)
        nn.init.normal_(self.bn.weight, 1.0, 0.01)
        nn.init.zeros_(self.bn.bias)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, 0.0, 0.001)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bn(pooled))


class ModelOutput(NamedTuple):
    feat3: torch.Tensor  # layer3 map (B, C3, h, w): LbA conv4-6
    feat4: torch.Tensor  # layer4 map (B, C4, h, w): LbA conv5-3
    pooled: torch.Tensor  # GeM(feat4) (B, C4)
    logits: torch.Tensor  # classifier(BN(pooled))


class TwoStreamResNet(nn.Module):
    def __init__(self, num_classes: int, depth: int = 50, width: int = 64, last_stride: int = 1,
                 stem_stride: int = 2, maxpool: bool = True, gem_p: float = 3.0, gem_learnable: bool = False):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"model.depth: expected one of {sorted(DEPTHS)}, got {depth}")
        block, counts = DEPTHS[depth]
        self.depth, self.width = depth, width
        self.visible_stem = Stem(width, stem_stride, maxpool)
        self.infrared_stem = Stem(width, stem_stride, maxpool)
        planes = [width, width * 2, width * 4, width * 8]
        inplanes = width
        strides = [1, 2, 2, last_stride]
        for i, (p, n, s) in enumerate(zip(planes, counts, strides), start=1):
            setattr(self, f"layer{i}", make_layer(block, inplanes, p, n, s))
            inplanes = p * block.expansion
        self.feat3_dim = planes[2] * block.expansion
        self.feat_dim = inplanes
        init_resnet(self)
        self.pool = GeM(gem_p, gem_learnable)
        self.head = BNNeckHead(self.feat_dim, num_classes)

    # --- parameter groups: the paper trains the backbone at lr and the rest at 10x lr
    def backbone_parameters(self):
        for name, param in self.named_parameters():
            if not name.startswith(("head.", "pool.")) and param.requires_grad:
                yield param

    def head_parameters(self):
        for name, param in self.named_parameters():
            if name.startswith(("head.", "pool.")) and param.requires_grad:
                yield param

    def shared(self, x: torch.Tensor):
        f3 = self.layer3(self.layer2(self.layer1(x)))
        return f3, self.layer4(f3)

    def forward(self, x_visible: torch.Tensor, x_infrared: torch.Tensor) -> ModelOutput:
        """Training forward of a ``[visible ; infrared]`` batch through stems and shared layers."""
        x = torch.cat([self.visible_stem(x_visible), self.infrared_stem(x_infrared)], 0)
        f3, f4 = self.shared(x)
        pooled = self.pool(f4)
        return ModelOutput(f3, f4, pooled, self.head(pooled))

    def extract(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Test descriptor: GeM-pooled layer4 features of a single-modality batch."""
        stem = self.visible_stem if modality == "visible" else self.infrared_stem
        if modality not in ("visible", "infrared"):
            raise ValueError(f"modality: expected 'visible' or 'infrared', got {modality!r}")
        _, f4 = self.shared(stem(x))
        return self.pool(f4)

    def feature_maps(self, x: torch.Tensor, modality: str):
        stem = self.visible_stem if modality == "visible" else self.infrared_stem
        return self.shared(stem(x))


def build_model(cfg: dict, num_classes: int, log=print) -> TwoStreamResNet:
    m = cfg
    model = TwoStreamResNet(num_classes, depth=m["depth"], width=m["width"], last_stride=m["last_stride"],
                            stem_stride=m["stem_stride"], maxpool=m["maxpool"], gem_p=m["gem_p"],
                            gem_learnable=m["gem_learnable"])
    if m.get("pretrained"):
        load_pretrained(model, m["pretrained"], log)
    else:
        warnings.warn("model.pretrained not set: training from scratch (ImageNet weights are never downloaded; "
                      "pass --pretrained PATH to a torchvision ResNet state_dict)", stacklevel=2)
    return model


def load_pretrained(model: TwoStreamResNet, path: str, log=print) -> Dict[str, int]:
    """Load a torchvision-format ResNet state_dict into both stems and the shared layers.

    A missing file warns and leaves the model at its random initialisation; a file of a
    different architecture raises naming the first mismatching tensor.
    """
    if not os.path.isfile(path):
        warnings.warn(f"model.pretrained: {path} not found; training from scratch (nothing is downloaded)",
                      stacklevel=2)
        return {"loaded": 0}
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    own = model.state_dict()
    loaded, skipped = 0, []
    for name, tensor in state.items():
        name = name[len("module."):] if name.startswith("module.") else name
        targets = ([f"visible_stem.{name}", f"infrared_stem.{name}"] if name.startswith(("conv1.", "bn1."))
                   else [name] if name.startswith("layer") else [])
        if not targets:
            skipped.append(name)
            continue
        for target in targets:
            if target not in own:
                raise ValueError(f"model.pretrained: {path}: tensor {name!r} has no counterpart in a "
                                 f"ResNet-{model.depth} (width {model.width})")
            if own[target].shape != tensor.shape:
                raise ValueError(f"model.pretrained: {path}: {name!r} has shape {tuple(tensor.shape)}, the model "
                                 f"expects {tuple(own[target].shape)} (depth/width mismatch?)")
            own[target].copy_(tensor)
            loaded += 1
    log(f"loaded {loaded} tensors from {path} (ignored: {', '.join(sorted(set(s.split('.')[0] for s in skipped))) or 'none'})")
    return {"loaded": loaded}
