"""SAAI -- "Visible-Infrared Person Re-Identification via Semantic Alignment and Affinity
Inference" (Fang, Yang, Fu, ICCV 2023), and its released code (xiaoye-hhh/SAAI).

Total loss (eq. 11 in the released code's form): ``L = L_id + L_cs + lambda_pd * L_pd``.

* Descriptor (SAFL, eqs. 1-3): ``[p_1 .. p_p, avg(F)]`` of ``(p + 1) * c`` dimensions from the
  ``layer4`` map of a weight-sharing backbone (:class:`training.models.SAFL`: p = 7 shared
  prototypes, a position embedding in the similarity only, sigmoid similarity, parts from
  the raw tokens), then a dual BNNeck (one BatchNorm1d per modality, bias frozen at 0),
  chosen by modality in training and at test time.
* ``L_id`` -- the released code's composite (the paper defers it to a supplement): CE of a
  shared classifier on every BNNeck feature, CE of a visible-only classifier on the visible
  rows and of an infrared-only one on the infrared rows, and soft-label mutual learning:
  the visible rows' visible-classifier logits against the softmax of an EMA copy of the
  *infrared* classifier on the same rows, and vice versa (EMA rate 0.02, the code's CLI
  default; the copies are updated before use, each step, as the code does).
* ``L_cs`` (eq. 5): :func:`reid_kernels.losses.center_separation` on the pre-BN descriptors,
  rho1 = 0.01, rho2 = 0.7, centres = batch means over both modalities (the code's reading).
* ``L_pd`` (eq. 4): :func:`reid_kernels.losses.part_diversity` on the sigmoid maps (the code's
  bounded RMS form); effective weight 0.25 as in the code (which applies 0.5 twice), 0.5 as
  printed (``loss.lambda_pd=0.5``).
* Table 4 switches: ``loss.parts`` (off: the descriptor is the global average only -- our
  baseline; the paper's baseline uses horizontal stripes), ``loss.pd``, ``loss.cs``; AIM at
  test time is ``eval.rerank=aim`` (the default of the SAAI configs: the published numbers).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from reid_kernels import losses as rk_losses

from .. import validators as v
from ..data import Batch, rows_of
from ..models import SAFL, DualBNNeck, feature_map_size
from .base import Recipe, unwrap


class SAAIHead(nn.Module):
    """SAFL descriptor, dual BNNeck and the three identity classifiers (+ EMA copies)."""

    def __init__(self, channels: int, map_size: Tuple[int, int], num_classes: int, parts: int, use_parts: bool):
        super().__init__()
        self.safl = SAFL(channels, map_size[0] * map_size[1], parts, map_size) if use_parts else None
        self.dim = (parts + 1) * channels if use_parts else channels
        self.bnneck = DualBNNeck(self.dim)
        self.classifier = nn.Linear(self.dim, num_classes, bias=False)
        self.visible_classifier = nn.Linear(self.dim, num_classes, bias=False)
        self.infrared_classifier = nn.Linear(self.dim, num_classes, bias=False)
        # EMA copies of the modality classifiers (mutual learning targets); start equal, no gradient
        self.register_buffer("visible_ema", self.visible_classifier.weight.detach().clone())
        self.register_buffer("infrared_ema", self.infrared_classifier.weight.detach().clone())

    def descriptor(self, fmap: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Pre-BN descriptor ``[parts..., global average]`` (B, dim) and the similarity maps (or None)."""
        pooled = fmap.mean((2, 3))
        if self.safl is None:
            return pooled, None
        parts, similarity = self.safl(fmap)
        return torch.cat([parts.flatten(1), pooled], 1), similarity

    def forward(self, out, layout) -> Dict[str, torch.Tensor]:
        """Training forward (inside the model's): descriptors, dual-BNNeck features and every
        classifier's logits of the ``layer4`` maps of a batch laid out as ``layout`` =
        ((modality, rows), ...)."""
        fmap = out.feat4
        infrared = rows_of(layout, "infrared", fmap.device)
        feats, similarity = self.descriptor(fmap)
        bn = self.bnneck(feats, infrared)
        return {"feats": feats, "similarity": similarity, "bn": bn, "infrared": infrared,
                "logits": self.classifier(bn), "logits_v": self.visible_classifier(bn[~infrared]),
                "logits_i": self.infrared_classifier(bn[infrared])}

    def describe(self, fmap: torch.Tensor, modality: str) -> torch.Tensor:
        """The test descriptor: the BNNeck branch of the images' modality."""
        feats, _ = self.descriptor(fmap)
        infrared = torch.full((feats.shape[0],), modality == "infrared", dtype=torch.bool, device=feats.device)
        return self.bnneck(feats, infrared)

    @torch.no_grad()
    def update_ema(self, rate: float) -> None:
        self.visible_ema.mul_(1 - rate).add_(self.visible_classifier.weight, alpha=rate)
        self.infrared_ema.mul_(1 - rate).add_(self.infrared_classifier.weight, alpha=rate)


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """``mean_i -sum_k q_ik log p_ik`` with ``q = softmax(target)`` (no gradient), ``p = softmax(logits)``."""
    return -(target_logits.detach().softmax(1) * logits.log_softmax(1)).sum(1).mean()


class SAAIRecipe(Recipe):
    name = "saai"
    DEFAULTS = {
        "loss": {"parts": True, "num_parts": 7, "pd": True, "cs": True, "lambda_pd": 0.25, "lambda_cs": 1.0,
                 "rho1": 0.01, "rho2": 0.7, "ema_rate": 0.02},
        # Released code: one shared ResNet-50, last stride 1, no non-local blocks; MAM blocks on SYSU.
        "model": {"stems": 1, "non_local": False, "gem_learnable": False, "mam": False},
        # Adam 3.5e-4 (wd 5e-4), warm-up (e + 1) / 10 for 10 epochs, x0.1 at 80, x0.01 at 120, 160 epochs.
        "optim": {"name": "adam", "lr_backbone": 3.5e-4, "lr_head": 3.5e-4, "weight_decay": 5e-4,
                  "warmup_epochs": 10, "milestones": [80, 120], "gamma": 0.1},
        "train": {"epochs": 160},
        "eval": {"rerank": "aim"},
    }
    LOSS_SPEC = {
        "parts": v.boolean, "num_parts": v.integer(2), "pd": v.boolean, "cs": v.boolean,
        "lambda_pd": v.number(0), "lambda_cs": v.number(0), "rho1": v.number(0), "rho2": v.number(0),
        "ema_rate": v.number(0, 1),
    }

    @classmethod
    def uses_classifier(cls, cfg: dict) -> bool:
        return False  # SAAI's classifiers live in its head

    @classmethod
    def uses_bnneck(cls, cfg: dict) -> bool:
        return False  # its own dual BNNeck replaces the backbone's

    @classmethod
    def build_extras(cls, cfg: dict, backbone: nn.Module) -> nn.Module:
        d, c = cfg["data"], cfg["loss"]
        size = feature_map_size(cfg["model"], d["height"], d["width"])
        return SAAIHead(backbone.feat_dim, size, backbone.num_classes, c["num_parts"], c["parts"])

    @classmethod
    def test_descriptor(cls, cfg: dict) -> str:
        return "extras"  # the dual-BNNeck output of SAAIHead.describe

    @classmethod
    def check_config(cls, cfg: dict) -> Optional[str]:
        if cfg["loss"]["pd"] and not cfg["loss"]["parts"]:
            return "loss.pd: the part-diversity loss needs the part features (loss.parts=true), got loss.parts=false"
        return None

    def losses(self, model, batch: Batch, out) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        c = self.loss_cfg
        head: SAAIHead = unwrap(model).extras
        x = out.extras  # SAAIHead.forward, run inside the model's forward
        labels = batch.all_labels()
        feats, similarity, bn, infrared = x["feats"], x["similarity"], x["bn"], x["infrared"]
        logs: Dict[str, torch.Tensor] = {}
        ce = F.cross_entropy(x["logits"].float(), labels)
        vis, ir = ~infrared, infrared
        logits_v, logits_i = x["logits_v"].float(), x["logits_i"].float()
        ce_modal = F.cross_entropy(logits_v, labels[vis]) + F.cross_entropy(logits_i, labels[ir])
        head.update_ema(c["ema_rate"])
        with torch.no_grad():  # the opposite modality's EMA classifier on the same rows
            targets = torch.cat([bn[vis] @ head.infrared_ema.t().to(bn.dtype),
                                 bn[ir] @ head.visible_ema.t().to(bn.dtype)]).float()
        mutual = soft_cross_entropy(torch.cat([logits_v, logits_i]), targets)
        total = ce + ce_modal + mutual
        logs.update(ce=ce.detach(), ce_modal=ce_modal.detach(), mutual=mutual.detach())
        if c["cs"]:
            cs = rk_losses.center_separation(feats.float(), labels, rho1=c["rho1"], rho2=c["rho2"])
            total, logs["cs"] = total + c["lambda_cs"] * cs, cs.detach()
        if c["pd"]:
            pd = rk_losses.part_diversity(similarity.float())
            total, logs["pd"] = total + c["lambda_pd"] * pd, pd.detach()
        logs["loss"] = total.detach()
        return total, logs
