"""PEA -- a recipe of OUR DESIGN from the abstract of "Proxy-Based Embedding Alignment for
RGB-Infrared Person Re-Identification" (Tsinghua Science and Technology, 2025).

Only the abstract of that paper could be found: no equation, hyperparameter or code. What the
abstract states -- modality-specific identity proxies, and intra-modality, inter-modality and
cycle alignment between samples and proxies -- is formalised here as follows; every form,
weight and temperature is our choice, NOT a reproduction:

* proxies ``W^V``, ``W^I`` (identities x d), learnable parameters; similarity = cosine
  ``s(x, y)``, temperature ``tau``;
* ``L_intra``: each sample against its own modality's proxies, a proxy-softmax cross-entropy
  ``-log softmax_k(s(f_i, w^m_k) / tau)[y_i]``, mean over the batch;
* ``L_inter``: the same against the other modality's proxies;
* ``L_cyc``: :func:`reid_kernels.losses.proxy_cycle` in both directions, IR -> RGB -> IR
  (``proxy_cycle(W^I, W^V)``) and RGB -> IR -> RGB (``proxy_cycle(W^V, W^I)``);
* total ``L = CE + L_tri + lambda1 L_intra + lambda2 L_inter + lambda3 L_cyc`` with the identity
  cross-entropy of the BNNeck classifier and the batch-hard triplet (0.3) on the pooled
  features, as the LbA recipe's ID loss; the proxies see the BNNeck features.

Defaults lambda1 = lambda2 = lambda3 = 1 and tau = 0.5, chosen on the synthetic set (tau: the
best full-design mAP at one training seed among 0.05 ... 1.0; see ``pea_synth.yaml``).
Switches ``loss.intra``, ``loss.inter``, ``loss.cycle``. ``L_cyc`` alone cannot change the
features -- only the proxies enter it -- so it acts through ``L_intra`` / ``L_inter``.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from reid_kernels import losses as rk_losses

from .. import validators as v
from ..data import Batch, rows_of
from .base import Recipe, unwrap
from .lba import identity_losses


class ModalityProxies(nn.Module):
    """``W^V``, ``W^I``; in the model's forward, the cosine logits of every BNNeck feature against
    both sets (so DDP sees the proxies used)."""

    def __init__(self, num_classes: int, dim: int, temperature: float):
        super().__init__()
        self.visible = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.infrared = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.temperature = temperature

    def forward(self, out, layout) -> Dict[str, torch.Tensor]:
        f = F.normalize(out.bn.float(), dim=1)
        return {"to_visible": f @ F.normalize(self.visible, dim=1).t() / self.temperature,
                "to_infrared": f @ F.normalize(self.infrared, dim=1).t() / self.temperature}


class PEARecipe(Recipe):
    name = "pea"
    DEFAULTS = {
        "loss": {"intra": True, "inter": True, "cycle": True, "lambda_intra": 1.0, "lambda_inter": 1.0,
                 "lambda_cycle": 1.0, "temperature": 0.5, "triplet_margin": 0.3},
        "model": {"stems": 2, "non_local": False, "gem_learnable": False},
        "optim": {"name": "sgd", "lr_backbone": 0.01, "lr_head": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                  "nesterov": True, "warmup_epochs": 10, "milestones": [20, 50], "gamma": 0.1},
        "train": {"epochs": 81},
    }
    LOSS_SPEC = {
        "intra": v.boolean, "inter": v.boolean, "cycle": v.boolean, "lambda_intra": v.number(0),
        "lambda_inter": v.number(0), "lambda_cycle": v.number(0), "temperature": v.number(0, lo_open=True),
        "triplet_margin": v.number(0),
    }

    @classmethod
    def build_extras(cls, cfg: dict, backbone: nn.Module):
        c = cfg["loss"]
        if not (c["intra"] or c["inter"] or c["cycle"]):
            return None  # the baseline: no proxies (unused parameters would break DDP)
        return ModalityProxies(backbone.num_classes, backbone.feat_dim, c["temperature"])

    @classmethod
    def test_descriptor(cls, cfg: dict) -> str:
        return "bnneck"  # the features the proxies align

    def losses(self, model, batch: Batch, out) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        c = self.loss_cfg
        labels = batch.all_labels()
        total, logs = identity_losses(out, labels, c["triplet_margin"])
        if c["intra"] or c["inter"]:
            infrared = rows_of(batch.layout(), "infrared", labels.device)
            to_v, to_i = out.extras["to_visible"], out.extras["to_infrared"]
            own = torch.where(infrared[:, None], to_i, to_v)     # each sample against its modality's proxies
            other = torch.where(infrared[:, None], to_v, to_i)   # ... and against the other modality's
        if c["intra"]:
            intra = F.cross_entropy(own, labels)
            total, logs["intra"] = total + c["lambda_intra"] * intra, intra.detach()
        if c["inter"]:
            inter = F.cross_entropy(other, labels)
            total, logs["inter"] = total + c["lambda_inter"] * inter, inter.detach()
        if c["cycle"]:
            proxies = unwrap(model).extras
            cycle = (rk_losses.proxy_cycle(proxies.infrared, proxies.visible, c["temperature"])
                     + rk_losses.proxy_cycle(proxies.visible, proxies.infrared, c["temperature"]))
            total, logs["cycle"] = total + c["lambda_cycle"] * cycle, cycle.detach()
        logs["loss"] = total.detach()
        return total, logs
