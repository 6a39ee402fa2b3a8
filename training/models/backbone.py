"""The shared VI-ReID backbone every recipe builds on (the LbA, MCE and PECA papers' ResNet-50 variants).

* a ResNet (torchvision parameter names, so ImageNet state_dicts load) whose stem --
  conv1/bn1/relu/maxpool -- is modality-specific with ``stems`` = 1, 2 or 3 copies:
  1: one ``stem`` for every input (MCE: fully shared); 2: ``visible_stem`` and
  ``infrared_stem`` (LbA's released code), the derived ``auxiliary`` modality going
  through the visible stem it was made from; 3: a third ``auxiliary_stem`` for the
  derived images (PECA's generated stream);
* ``layer1`` .. ``layer4`` shared, last stride 1 or 2;
* optional AGW non-local blocks after the last 2 blocks of ``layer2`` and the last 3 of
  ``layer3`` (``non_local``; MCE, PECA);
* optional MPANet/SAAI MAM blocks after ``layer3`` and ``layer4`` (``mam``; SAAI's SYSU config);
* GeM pooling, fixed or learnable ``p`` (LbA: fixed 3; MCE: learnable from 3);
* a BNNeck: ``BatchNorm1d`` with its bias frozen at 0, then an optional bias-free
  classifier (LbA's initialisation: BN weight ~ N(1, 0.01), classifier ~ N(0, 0.001)).

The training forward takes an ordered mapping ``modality -> images`` and runs every
modality through its stem, then the concatenated ``[m1; m2; ...]`` batch through the
shared layers, so BatchNorm statistics are those of the whole mixed batch as in the
community code.

``depth`` 10/18/34/50/101 and ``width`` (stem channels; torchvision: 64) pick the size:
ResNet-50 at width 64 is the papers'; depth 10 at width 16 with stem stride 1 is the
CPU-sized network of the synthetic configs.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Mapping, NamedTuple, Optional

import torch
from torch import nn

from .non_local import NonLocalBlock, non_local_positions
from .resnet import DEPTHS, Stem, init_resnet, make_layer
from .safl import MAM

MODALITIES = ("visible", "infrared", "auxiliary")
# "extras": the recipe's own descriptor (``model.extras.describe(layer4 map, modality)``, e.g. SAAI's)
DESCRIPTORS = ("pooled", "bnneck", "extras")
# AGW placement: non-local blocks after the last 2 blocks of layer2 and the last 3 of layer3.
NON_LOCAL_LAYOUT = {2: 2, 3: 3}


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
    """BatchNorm1d (bias frozen at 0) -> optional Linear without bias; LbA's initialisation."""

    def __init__(self, dim: int, num_classes: int, classifier: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)
        nn.init.normal_(self.bn.weight, 1.0, 0.01)
        nn.init.zeros_(self.bn.bias)
        self.classifier = None
        if classifier:
            self.classifier = nn.Linear(dim, num_classes, bias=False)
            nn.init.normal_(self.classifier.weight, 0.0, 0.001)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.logits(self.bn(pooled))

    def logits(self, bn: torch.Tensor) -> Optional[torch.Tensor]:
        return None if self.classifier is None else self.classifier(bn)


class ModelOutput(NamedTuple):
    feat3: torch.Tensor  # layer3 map (B, C3, h, w): LbA conv4-6
    feat4: torch.Tensor  # layer4 map (B, C4, h, w): LbA conv5-3
    pooled: torch.Tensor  # GeM(feat4) (B, C4)
    logits: Optional[torch.Tensor]  # classifier(BN(pooled)), None without a classifier
    bn: Optional[torch.Tensor]  # BN(pooled): the BNNeck feature (B, C4), None without the BNNeck
    extras: Any = None  # model.extras(output, layout): a recipe's head, run inside forward (DDP sees it)


class ReIDBackbone(nn.Module):
    def __init__(self, num_classes: int, depth: int = 50, width: int = 64, last_stride: int = 1,
                 stem_stride: int = 2, maxpool: bool = True, gem_p: float = 3.0, gem_learnable: bool = False,
                 stems: int = 2, non_local: bool = False, classifier: bool = True, mam: bool = False,
                 bnneck: bool = True):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"model.depth: expected one of {sorted(DEPTHS)}, got {depth}")
        if stems not in (1, 2, 3):
            raise ValueError(f"model.stems: expected 1, 2 or 3 modality-specific stems, got {stems}")
        block, counts = DEPTHS[depth]
        self.depth, self.width, self.num_stems, self.num_classes = depth, width, stems, num_classes
        # Creation order fixes the random initialisation: stems, layers, init, pool, head, then
        # the optional non-local blocks -- so a 2-stem model without them is initialised exactly
        # as the original two-stream network (the LbA demo's numbers are unchanged).
        for name in self.stem_names():
            setattr(self, name, Stem(width, stem_stride, maxpool))
        planes = [width, width * 2, width * 4, width * 8]
        inplanes = width
        strides = [1, 2, 2, last_stride]
        for i, (p, n, s) in enumerate(zip(planes, counts, strides), start=1):
            setattr(self, f"layer{i}", make_layer(block, inplanes, p, n, s))
            inplanes = p * block.expansion
        self.feat3_dim = planes[2] * block.expansion
        self.feat_dim = feature_dim(depth, width)
        init_resnet(self)
        self.pool = GeM(gem_p, gem_learnable)
        # Without the BNNeck (a recipe with its own head, e.g. SAAI's dual BNNeck) every parameter
        # still takes part in each step, as DDP requires.
        self.head = BNNeckHead(self.feat_dim, num_classes, classifier) if bnneck else None
        self.non_local: Dict[int, List[int]] = {}
        if non_local:
            for stage, count in NON_LOCAL_LAYOUT.items():
                positions = non_local_positions(counts[stage - 1], count)
                channels = planes[stage - 1] * block.expansion
                setattr(self, f"nl{stage}", nn.ModuleList(NonLocalBlock(channels) for _ in positions))
                self.non_local[stage] = positions
        self.has_mam = bool(mam)
        if mam:
            self.mam3, self.mam4 = MAM(self.feat3_dim), MAM(self.feat_dim)

    # --- stems --------------------------------------------------------------------------------
    def stem_names(self) -> List[str]:
        return {1: ["stem"], 2: ["visible_stem", "infrared_stem"],
                3: ["visible_stem", "infrared_stem", "auxiliary_stem"]}[self.num_stems]

    def stem_for(self, modality: str) -> nn.Module:
        if modality not in MODALITIES:
            raise ValueError(f"modality: expected one of {MODALITIES}, got {modality!r}")
        if self.num_stems == 1:
            return self.stem
        if modality == "auxiliary" and self.num_stems == 2:
            return self.visible_stem  # derived from visible images: their stem
        return getattr(self, f"{modality}_stem")

    # --- parameter groups: LbA trains the backbone at lr and the rest at 10x lr -----------------
    def backbone_parameters(self):
        for name, param in self.named_parameters():
            if not name.startswith(("head.", "pool.")) and param.requires_grad:
                yield param

    def head_parameters(self):
        for name, param in self.named_parameters():
            if name.startswith(("head.", "pool.")) and param.requires_grad:
                yield param

    # --- forward --------------------------------------------------------------------------------
    def _stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        layer = getattr(self, f"layer{index}")
        positions = self.non_local.get(index)
        if not positions:
            return layer(x)
        blocks = getattr(self, f"nl{index}")
        for i, block in enumerate(layer):
            x = block(x)
            if i in positions:
                x = blocks[positions.index(i)](x)
        return x

    def shared(self, x: torch.Tensor):
        f3 = self._stage(3, self._stage(2, self._stage(1, x)))
        if self.has_mam:
            f3 = self.mam3(f3)
        f4 = self._stage(4, f3)
        return f3, self.mam4(f4) if self.has_mam else f4

    def forward(self, images: Mapping[str, torch.Tensor]) -> ModelOutput:
        """Training forward of ``{modality: images}``: the rows of the outputs follow the
        mapping's order (``[visible; infrared; ...]``)."""
        if not images:
            raise ValueError("images: expected a mapping modality -> (B, 3, H, W) tensor, got an empty one")
        x = torch.cat([self.stem_for(m)(x) for m, x in images.items()], 0)
        f3, f4 = self.shared(x)
        pooled = self.pool(f4)
        bn = self.head.bn(pooled) if self.head is not None else None
        logits = self.head.logits(bn) if self.head is not None else None
        out = ModelOutput(f3, f4, pooled, logits, bn)
        extras = getattr(self, "extras", None)
        if extras is None:
            return out
        layout = tuple((m, x.shape[0]) for m, x in images.items())
        return out._replace(extras=extras(out, layout))

    def extract(self, x: torch.Tensor, modality: str, descriptor: str = "pooled") -> torch.Tensor:
        """Test descriptor of a single-modality batch: ``"pooled"`` GeM(layer4) (LbA),
        ``"bnneck"`` the BNNeck output (MCE's released code) or ``"extras"`` the recipe's
        ``model.extras.describe(layer4 map, modality)`` (SAAI's dual-BNNeck descriptor)."""
        if descriptor not in DESCRIPTORS:
            raise ValueError(f"descriptor: expected one of {DESCRIPTORS}, got {descriptor!r}")
        _, f4 = self.shared(self.stem_for(modality)(x))
        if descriptor == "extras":
            return self.extras.describe(f4, modality)
        pooled = self.pool(f4)
        if descriptor == "bnneck" and self.head is None:
            raise ValueError("descriptor: 'bnneck' needs the backbone's BNNeck, but this model was built without it")
        return pooled if descriptor == "pooled" else self.head.bn(pooled)

    def feature_maps(self, x: torch.Tensor, modality: str):
        return self.shared(self.stem_for(modality)(x))


def feature_dim(depth: int, width: int) -> int:
    """Channels of the ``layer4`` map (the pooled feature) of a ResNet of ``depth`` and stem ``width``."""
    block, _ = DEPTHS[depth]
    return width * 8 * block.expansion


def feature_map_size(cfg: dict, height: int, width: int):
    """(h, w) of the ``layer4`` map for an input of ``height`` x ``width`` (the ``model`` config):
    every stride-2 convolution and the max-pool of a ResNet round up, ``ceil(n / 2)``."""
    def down(n: int, stride: int) -> int:
        return -(-n // stride)

    sizes = []
    for n in (height, width):
        n = down(n, cfg["stem_stride"])
        if cfg["maxpool"]:
            n = down(n, 2)
        n = down(down(n, 2), 2)  # layer2, layer3
        sizes.append(down(n, cfg["last_stride"]))
    return tuple(sizes)


def build_model(cfg: dict, num_classes: int, classifier: bool = True, log=print, bnneck: bool = True) -> ReIDBackbone:
    """The backbone of ``cfg`` (the ``model`` config section)."""
    m = cfg
    model = ReIDBackbone(num_classes, depth=m["depth"], width=m["width"], last_stride=m["last_stride"],
                         stem_stride=m["stem_stride"], maxpool=m["maxpool"], gem_p=m["gem_p"],
                         gem_learnable=m["gem_learnable"], stems=m.get("stems", 2),
                         non_local=m.get("non_local", False), classifier=classifier, mam=m.get("mam", False),
                         bnneck=bnneck)
    if m.get("pretrained"):
        load_pretrained(model, m["pretrained"], log)
    else:
        warnings.warn("model.pretrained not set: training from scratch (ImageNet weights are never downloaded; "
                      "pass --pretrained PATH to a torchvision ResNet state_dict)", stacklevel=2)
    return model


def load_pretrained(model: ReIDBackbone, path: str, log=print) -> Dict[str, int]:
    """Load a torchvision-format ResNet state_dict into every stem and the shared layers.

    Non-local blocks, the pooling and the BNNeck are not in a torchvision ResNet and keep
    their initialisation. A missing file raises :class:`FileNotFoundError` naming it; a file of a different architecture raises naming the first
    mismatching tensor.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.pretrained: file not found: {path} (nothing is ever downloaded)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    own = model.state_dict()
    stems = model.stem_names()
    loaded, skipped = 0, []
    for name, tensor in state.items():
        name = name[len("module."):] if name.startswith("module.") else name
        targets = ([f"{stem}.{name}" for stem in stems] if name.startswith(("conv1.", "bn1."))
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
