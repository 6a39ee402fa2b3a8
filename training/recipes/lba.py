"""LbA -- "Learning by Aligning: Visible-Infrared Person Re-identification using Cross-Modal
Correspondences" (Park et al., ICCV 2021), and its released code.

Total loss (eq. 8): ``L = L_ID + lambda_IC * L_IC + lambda_DT * L_DT`` with

* ``L_ID``: cross-entropy of the BNNeck classifier on GeM(layer4) features, plus a
  batch-hard triplet loss (margin 0.3, Euclidean, mined over both modalities) on the
  pooled features before BN (the released code);
* ``L_IC``: the same classifier on pooled *positive reconstructions* (eq. 3) -- at the
  conv4 site (layer3 map) the reconstruction is passed through ``layer4`` first -- with
  the anchor's identity as the target, summed over sites (the released code);
* ``L_DT``: the co-attention-weighted dense triplet loss (eqs. 10-11) of
  :func:`reid_kernels.cmalign`, summed over sites.

The Table-3 switches are config options: ``ic``, ``dt``, ``coattention`` (off = every
position weighted 1: the dense triplet of cmalign's reconstructions with uniform
weights) and ``sites`` (subset of [4, 5]; 4 = layer3 / conv4-6, 5 = layer4 / conv5-3).
Partners are drawn with :func:`reid_kernels.lba_pairs` from the recipe's own seeded
generator, separately at each site and every step. ``loss.negative_draw`` defaults to
``"lba-code"``: the released LbA code's convention (the anchors of an identity take a
permutation of the image positions of their negative identities, ``random.sample`` there),
which produced the published numbers of Learning by Aligning (ICCV 2021);
``"independent"`` (the library's default) draws each negative image independently.
Likewise ``loss.dt_weighting`` defaults to ``"lba-code"``, the released code's dense-triplet
weighting as it ran on torch 1.7 (which produced the published numbers): per position, the
batch-mean co-attention times the batch-mean hinge; ``"paper"`` weights each anchor's hinge by
its own co-attention (eq. 10). ``loss.dt_eps`` = 1e-6 is the released code's distance
(``TripletMarginLoss`` adds it to every difference); 0 is the paper's.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

import reid_kernels
from reid_kernels.dense_triplet import masked_dense_triplet

from .. import validators as v
from ..data import Batch
from .base import Recipe, unwrap


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Hermans et al.: for every anchor the farthest positive and nearest negative (Euclidean)."""
    dist = torch.cdist(features.float(), features.float()).clamp_min(1e-12)
    same = labels[:, None] == labels[None, :]
    hardest_pos = dist.masked_fill(~same, float("-inf")).max(1).values
    hardest_neg = dist.masked_fill(same, float("inf")).min(1).values
    return F.relu(hardest_pos - hardest_neg + margin).mean()  # MarginRankingLoss(y=1), mean over anchors


def identity_losses(out, labels: torch.Tensor, margin: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """LbA's ID loss: CE of the BNNeck classifier + batch-hard triplet on the pooled features;
    returns (their sum, {"ce", "tri"}). PEA's design reuses it."""
    ce = F.cross_entropy(out.logits.float(), labels)
    tri = batch_hard_triplet(out.pooled, labels, margin)
    return ce + tri, {"ce": ce.detach(), "tri": tri.detach()}


class LbARecipe(Recipe):
    """LbA's losses from a model output; owns the pair-drawing generator."""

    name = "lba"
    SITES = (4, 5)
    DEFAULTS = {
        "loss": {"ic": True, "dt": True, "coattention": True, "sites": [4, 5], "lambda_ic": 1.0, "lambda_dt": 0.5,
                 "beta": 50.0, "dt_margin": 0.3, "triplet_margin": 0.3, "negative_draw": "lba-code",
                 "dt_weighting": "lba-code", "dt_eps": 1e-6},
        # LbA's settings: two-stream (stem-specific) ResNet-50, fixed GeM p = 3, pooled test descriptor.
        "model": {"stems": 2, "non_local": False, "gem_learnable": False},
        # SGD (Nesterov) backbone 0.01 / head 0.1, warm-up 10 epochs, x0.1 at 20 and 50, 81 epochs.
        "optim": {"name": "sgd", "lr_backbone": 0.01, "lr_head": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                  "nesterov": True, "warmup_epochs": 10, "milestones": [20, 50], "gamma": 0.1},
        "train": {"epochs": 81},
    }
    LOSS_SPEC = {
        "ic": v.boolean, "dt": v.boolean, "coattention": v.boolean,
        "sites": v.listof(v.integer(), allowed=(4, 5), increasing=True),
        "lambda_ic": v.number(0), "lambda_dt": v.number(0), "beta": v.number(0, lo_open=True),
        "dt_margin": v.number(0), "triplet_margin": v.number(0),
        "negative_draw": v.choice(*reid_kernels.pairs.NEGATIVE_DRAWS),
        "dt_weighting": v.choice("paper", "lba-code"), "dt_eps": v.number(0),
    }

    def __init__(self, cfg: dict, num_classes: int, seed: int = 0):
        super().__init__(cfg, num_classes, seed)
        self.num_ids, self.num_pos = cfg["sampler"]["num_ids"], cfg["sampler"]["num_pos"]
        self.generator = torch.Generator().manual_seed(int(seed) + 7919)
        sites = list(self.loss_cfg["sites"])
        if not sites or any(s not in self.SITES for s in sites):
            raise ValueError(f"loss.sites: expected a non-empty subset of {list(self.SITES)}, got {sites}")
        self.sites = sorted(set(sites))
        self.needs_alignment = bool(self.loss_cfg["ic"] or self.loss_cfg["dt"])

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state) -> None:
        self.generator.set_state(state["generator"])

    def losses(self, model, batch: Batch, out) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        cfg = self.loss_cfg
        labels = batch.all_labels()
        total, logs = identity_losses(out, labels, cfg["triplet_margin"])
        if self.needs_alignment:
            ic_total, dt_total = self._alignment_losses(model, out, labels, logs)
            if cfg["ic"]:
                total = total + cfg["lambda_ic"] * ic_total
            if cfg["dt"]:
                total = total + cfg["lambda_dt"] * dt_total
        logs["loss"] = total.detach()
        return total, logs

    def _alignment_losses(self, model, out, labels, logs):
        cfg = self.loss_cfg
        ic_total = out.pooled.new_zeros((), dtype=torch.float32)
        dt_total = out.pooled.new_zeros((), dtype=torch.float32)
        inner = unwrap(model)
        for site in self.sites:
            fmap = (out.feat3 if site == 4 else out.feat4).float()
            pos_idx, neg_idx = reid_kernels.lba_pairs(self.num_ids, self.num_pos, self.generator,
                                                      negative_draw=cfg["negative_draw"])
            pos_idx, neg_idx = pos_idx.to(fmap.device), neg_idx.to(fmap.device)
            # CMAlign in float32 even under AMP: beta = 50 sharpens the softmax past bf16/fp16 precision.
            with torch.autocast(fmap.device.type, enabled=False):
                aligned = reid_kernels.cmalign(fmap, pos_idx, neg_idx, cfg["beta"], cfg["dt_margin"],
                                               weighting=cfg["dt_weighting"], eps=cfg["dt_eps"])
            if cfg["dt"]:
                if cfg["coattention"]:
                    dt = aligned.loss  # eqs. 10-11, weighted by the co-attention A (eq. 9)
                else:  # Table 3 "A off": every position weighted 1
                    ones = torch.ones_like(aligned.comask)
                    with torch.autocast(fmap.device.type, enabled=False):
                        dt = masked_dense_triplet(fmap, aligned.recon_pos, aligned.recon_neg, ones,
                                                  cfg["dt_margin"], eps=cfg["dt_eps"])
                dt_total = dt_total + dt
                logs[f"dt{site}"] = dt.detach()
            if cfg["ic"]:
                recon = aligned.recon_pos.to(out.feat4.dtype)
                if site == 4:  # conv4 reconstruction goes through layer4 first (official code)
                    recon = inner.layer4(recon)
                logits = inner.head(inner.pool(recon))
                ic = F.cross_entropy(logits.float(), labels)
                ic_total = ic_total + ic
                logs[f"ic{site}"] = ic.detach()
        return ic_total, dt_total
