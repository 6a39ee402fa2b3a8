"""PECA -- "Partial Enhancement and Channel Aggregation for Visible-Infrared Person
Re-Identification" (Jing and Li, IEICE Trans. Inf. & Syst., 2024).

No official code exists: the paper's text is the specification, and each reading of an
ambiguous passage is named here (``[reading]``), with the alternative as an option where the
text supports two.

* **Encoder** (the paper's three-stream network): a modality-specific first layer (the ResNet
  stem) for visible, generated and infrared images -- ``model.stems: 3``, the generated images
  being the ``auxiliary`` modality -- and everything after it shared, on AGW's options
  (non-local blocks, GeM p = 3, BNNeck with an identity classifier, last stride 1).
  [reading] "all features are normalized": the global feature ``f`` of the metric terms
  (``L_ins``, ``L_mod``, ``L_mix``) and of the memory is the L2-normalised BNNeck feature -- AGW's
  test descriptor, ranked by cosine -- (``loss.feature: pooled`` takes the GeM feature, where
  AGW applies its triplet; on the synthetic set its non-negative entries leave every cosine
  near 1 and ``L_ins`` at chance); the classifier sees the BNNeck feature; GSL maps the GeM
  feature, the kind of feature its parts give.
* **ICAL** (eqs. 2-3): per visible image, one generated image mixed from it and the slot's
  infrared image (a random infrared image of the same identity: the sampler pairs them), one
  of the six channel variants uniformly (:mod:`training.data.ical`);
  ``L_mix`` = :func:`reid_kernels.losses.channel_mix_margin` (hinge reading ``[D - m]_+`` of the
  printed ``|D - m|``; m = 0.7) on the normalised features of the visible, infrared and
  generated rows of each slot.
* **GSL** (eq. 1): the upper, middle and lower parts of every visible and infrared image go
  through the encoder without gradient; three separate MLPs map the global feature into the
  three local spaces; ``L_sim = -cos([MLP_u(f); MLP_m(f); MLP_l(f)], sg([f^u; f^m; f^l]))``,
  averaged over the visible and infrared rows. [reading] the MLP is FC-BN-ReLU-FC
  (``loss.gsl_mlp: bn``; the SimSiam predictor shape, hidden width ``gsl_hidden`` x d, 1/4 as
  SimSiam) -- ``linear`` gives two bare FC layers; parts are three crops of height
  ``floor(H/3)`` at the top, centre and bottom, encoded at their own size
  (``gsl_resize: true`` resizes them to H x W first); the part forward uses batch statistics
  as the training forward does, and leaves the model's running statistics untouched (it is a
  stop-gradient target, it changes nothing).
* **Centroid memory** (eqs. 7-9): per-identity visible and infrared centroids of the
  normalised global features, initialised by the class means of a full pass of the initial
  encoder before the first step ([reading] of eqs. 7-8), then updated for every visible /
  infrared sample of each step, in batch order, with ``m <- (1 - alpha) m + alpha f``
  (alpha = 0.8 weights the NEW sample): ``MemoryBank(convention="new", mode="sequential")``;
  [readings] after the optimiser step, with the step's (pre-step) features; generated images
  update no centroid; rows not re-normalised (eq. 9 as printed; ``memory_normalize: true``
  re-normalises).
* **L_imcl = L_ins + lambda_m L_mod** (eqs. 5, 6, 10): ``L_ins`` =
  :func:`reid_kernels.losses.hard_instance_contrastive` (|Q| = 50, tau_ins = 0.15) and ``L_mod``
  = :func:`reid_kernels.losses.modality_centroid_contrastive` (tau_mod = 0.10), lambda_m = 0.5,
  both over the visible and infrared rows ([reading]: a generated image has no centroid, so it
  enters neither).
* **L_ce** (eq. 4): the mean cross-entropy of the visible rows plus that of the infrared rows
  ([reading]: generated images are not classified; ``ce_generated: true`` adds their mean).
* **Total** (eq. 11): ``L_ce + L_sim + L_mix + L_ins + lambda_m L_mod``.
* **Ablation** (the paper's Table 3, :data:`ABLATION`): M1 = CE + triplet (the CAJ setting:
  AGW's weighted regularised triplet, :func:`weighted_regularized_triplet`), M2 replaces the
  triplet by ``L_ins``, M3 adds ``L_mod``, M4 adds GSL, M5 = M3 + ICAL, M6 = PECA (everything).
  Without ICAL there is no generated stream: ``model.stems`` must then be 2.

Training set-up (the paper's): SGD lr 0.1, warm-up over 10 epochs, 100 epochs, 8 identities x
(4 visible + 4 infrared) images plus one generated image per visible image, CAJ channel
exchange and random erasing. [reading] momentum 0.9, weight decay 5e-4, Nesterov and the
decays x0.1 at epochs 20 and 50 are AGW's (the paper states none).
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from reid_kernels import losses as rk_losses
from reid_kernels.nn import MemoryBank

from .. import validators as v
from ..data import Batch, BatchSpec, rows_of
from ..models import feature_dim
from .base import Recipe, TrainContext, unwrap
from .mce import class_means

REAL = ("visible", "infrared")
PART_NAMES = ("upper", "middle", "lower")
# The paper's Table 3: which terms each model of the ablation trains with.
ABLATION: Dict[str, Dict[str, bool]] = {
    "M1": {"triplet": True, "ins": False, "mod": False, "gsl": False, "ical": False},
    "M2": {"triplet": False, "ins": True, "mod": False, "gsl": False, "ical": False},
    "M3": {"triplet": False, "ins": True, "mod": True, "gsl": False, "ical": False},
    "M4": {"triplet": False, "ins": True, "mod": True, "gsl": True, "ical": False},
    "M5": {"triplet": False, "ins": True, "mod": True, "gsl": False, "ical": True},
    "M6": {"triplet": False, "ins": True, "mod": True, "gsl": True, "ical": True},
}


def ablation_updates(model: str) -> Dict[str, object]:
    """Config updates (dotted keys) of ablation ``model`` (``"M1"`` ... ``"M6"``), stems included."""
    if model not in ABLATION:
        raise ValueError(f"model: expected one of {list(ABLATION)}, got {model!r}")
    switches = ABLATION[model]
    return {**{f"loss.{k}": on for k, on in switches.items()}, "model.stems": 3 if switches["ical"] else 2}


# --- losses of the recipe ---------------------------------------------------------------------


def _softmax_weights(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax of ``values`` over the entries where ``mask`` is 1, row-wise (AGW's form, +1e-6)."""
    top = (values * mask).max(dim=1, keepdim=True).values
    e = torch.exp(values - top) * mask
    return e / (e.sum(dim=1, keepdim=True) + 1e-6)


def weighted_regularized_triplet(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AGW's weighted regularised triplet ("Deep Learning for Person Re-identification: A Survey
    and Outlook", TPAMI 2021), the triplet of CAJ's setting that PECA's M1 baseline follows.

    For each anchor: the softmax(distance)-weighted mean distance to its positives (itself
    included, as AGW's mask) and the softmax(-distance)-weighted mean distance to its
    negatives; ``softplus(positive - negative)`` (``SoftMarginLoss`` with target 1), mean over
    anchors. Euclidean distances ``sqrt(max(|x|^2 + |y|^2 - 2 x.y, 1e-12))``."""
    x = features if features.dtype == torch.float64 else features.float()
    sq = (x * x).sum(dim=1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * x @ x.t()).clamp_min(1e-12).sqrt()
    positive = (labels[:, None] == labels[None, :]).float()
    negative = 1.0 - positive
    dist_ap, dist_an = dist * positive, dist * negative
    furthest_positive = (dist_ap * _softmax_weights(dist_ap, positive)).sum(dim=1)
    closest_negative = (dist_an * _softmax_weights(-dist_an, negative)).sum(dim=1)
    return F.softplus(furthest_positive - closest_negative).mean()


def similarity_loss(projected: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Eq. 1: ``-cos(f^g, sg(f^s))`` averaged over rows; ``local`` carries no gradient."""
    return -(F.normalize(projected.float(), dim=1) * F.normalize(local.detach().float(), dim=1)).sum(dim=1).mean()


# --- GSL: part crops and the global-to-local MLPs ---------------------------------------------


def part_crops(images: torch.Tensor, resize: bool = False) -> Tuple[torch.Tensor, ...]:
    """The upper, middle and lower parts of (B, 3, H, W) images: crops of height ``floor(H/3)``
    at rows ``0``, ``(H - h) // 2`` and ``H - h`` (equal thirds when 3 divides H), resized back to
    H x W (bilinear) when ``resize``."""
    height, width = images.shape[-2:]
    h = height // 3
    if h < 1:
        raise ValueError(f"images: expected a height of at least 3 rows to cut into parts, got {height}")
    crops = tuple(images[..., top:top + h, :] for top in (0, (height - h) // 2, height - h))
    if resize:
        crops = tuple(F.interpolate(c, size=(height, width), mode="bilinear", align_corners=False) for c in crops)
    return crops


@contextlib.contextmanager
def running_statistics_kept(model: nn.Module):
    """Within: training-mode BatchNorm forwards use the batch's statistics and leave the running
    statistics alone (no in-place update, which would also break the pending backward of the
    step's forward, whose graph holds those buffers)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


@torch.no_grad()
def local_features(model: nn.Module, batch: Batch, resize: bool = False) -> torch.Tensor:
    """``f^s = [f^u; f^m; f^l]`` (rows: the visible then the infrared images of ``batch``; columns:
    the GeM features of the three parts), computed without gradient through the encoder."""
    net = unwrap(model)
    rows = []
    with running_statistics_kept(net):
        for modality in (m for m in batch.modalities if m in REAL):
            crops = part_crops(batch.images[modality], resize)
            stem = net.stem_for(modality)
            parts = [net.pool(net.shared(stem(c))[1]) for c in crops]
            rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows).float()


class GlobalToLocal(nn.Module):
    """GSL's three separate MLPs: the global feature -> each part's feature space (eq. 1's f^g)."""

    def __init__(self, dim: int, hidden: int, kind: str = "bn"):
        super().__init__()

        def mlp() -> nn.Sequential:
            if kind == "bn":  # FC-BN-ReLU-FC: "two FC layers, excluding BN and ReLU"
                return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                     nn.Linear(hidden, dim))
            return nn.Sequential(nn.Linear(dim, hidden), nn.Linear(hidden, dim))

        self.parts = nn.ModuleList(mlp() for _ in PART_NAMES)

    def forward(self, out, layout) -> Dict[str, torch.Tensor]:
        real = rows_of(layout, "visible", out.pooled.device) | rows_of(layout, "infrared", out.pooled.device)
        f = out.pooled[real]
        return {"projected": torch.cat([mlp(f) for mlp in self.parts], dim=1)}


# --- the recipe -------------------------------------------------------------------------------


class PECARecipe(Recipe):
    name = "peca"
    DEFAULTS = {
        "loss": {
            "triplet": False, "ins": True, "mod": True, "gsl": True, "ical": True,
            "num_negatives": 50, "tau_ins": 0.15, "tau_mod": 0.10, "lambda_mod": 0.5, "alpha": 0.8,
            "memory_normalize": False, "mix_margin": 0.7, "lambda_mix": 1.0, "lambda_sim": 1.0,
            "gsl_mlp": "bn", "gsl_hidden": 0.25, "gsl_resize": False, "ce_generated": False, "feature": "bnneck",
        },
        # AGW's options on three stems (visible, infrared, generated).
        "model": {"stems": 3, "non_local": True, "gem_learnable": False, "gem_p": 3.0},
        "optim": {"name": "sgd", "lr_backbone": 0.1, "lr_head": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                  "nesterov": True, "warmup_epochs": 10, "milestones": [20, 50], "gamma": 0.1},
        "train": {"epochs": 100},
        # CAJ channel augmentation and channel erasing (the community code erases every image).
        "data": {"channel_aug": "exchange", "erasing": 0.5},
    }
    LOSS_SPEC = {
        "triplet": v.boolean, "ins": v.boolean, "mod": v.boolean, "gsl": v.boolean, "ical": v.boolean,
        "num_negatives": v.integer(1), "tau_ins": v.number(0, lo_open=True), "tau_mod": v.number(0, lo_open=True),
        "lambda_mod": v.number(0), "alpha": v.number(0, 1), "memory_normalize": v.boolean,
        "mix_margin": v.number(0), "lambda_mix": v.number(0), "lambda_sim": v.number(0),
        "gsl_mlp": v.choice("bn", "linear"), "gsl_hidden": v.number(0, lo_open=True), "gsl_resize": v.boolean,
        "ce_generated": v.boolean, "feature": v.choice("bnneck", "pooled"),
    }

    def __init__(self, cfg: dict, num_classes: int, seed: int = 0):
        super().__init__(cfg, num_classes, seed)
        c = self.loss_cfg
        self.modalities = ("visible", "infrared", "auxiliary") if c["ical"] else REAL
        self.uses_memory = bool(c["mod"])
        self.memory = MemoryBank(num_classes, feature_dim(cfg["model"]["depth"], cfg["model"]["width"]),
                                 names=("v", "ir"), momentum=c["alpha"], mode="sequential",
                                 normalize=c["memory_normalize"], convention="new", history=False, sync_ddp=True)
        self.initialized = False
        self._pending: Optional[Tuple[torch.Tensor, ...]] = None  # this step's samples for the memory

    @classmethod
    def check_config(cls, cfg: dict) -> Optional[str]:
        c, stems = cfg["loss"], cfg["model"]["stems"]
        expected = 3 if c["ical"] else 2
        if stems != expected:
            why = "a stem for the generated images" if c["ical"] else "no generated stream without loss.ical"
            return f"model.stems: PECA with loss.ical={str(c['ical']).lower()} has {why}; expected {expected}, got {stems}"
        return None

    @classmethod
    def build_extras(cls, cfg: dict, backbone: nn.Module):
        c = cfg["loss"]
        if not c["gsl"]:
            return None  # no MLPs (unused parameters would break DDP)
        hidden = max(1, int(round(backbone.feat_dim * c["gsl_hidden"])))
        return GlobalToLocal(backbone.feat_dim, hidden, c["gsl_mlp"])

    @classmethod
    def test_descriptor(cls, cfg: dict) -> str:
        return "bnneck"  # AGW's test feature

    def batch_spec(self) -> BatchSpec:
        return BatchSpec(self.modalities, "ical" if "auxiliary" in self.modalities else None)

    # --- centroid memory ----------------------------------------------------------------------
    def centroids(self) -> torch.Tensor:
        """(2, num_classes, d): the visible and the infrared centroids (a copy: the in-place
        updates after the step never touch a tensor the loss saved)."""
        return torch.stack([self.memory.memory("v"), self.memory.memory("ir")])

    def on_train_start(self, ctx: TrainContext) -> None:
        self.memory.to(ctx.device)

    def on_epoch_start(self, ctx: TrainContext) -> Optional[Dict[str, float]]:
        """Before the first step: every centroid <- the class mean of the initial encoder's normalised
        global features (eqs. 7-8). A resumed run has its memory from the checkpoint."""
        if not self.uses_memory or self.initialized:
            return None
        start = time.time()
        for bank, modality in (("v", "visible"), ("ir", "infrared")):
            feats, labels = ctx.extract(modality, self.loss_cfg["feature"])
            means = class_means(F.normalize(feats, dim=1), labels, self.num_classes)  # eqs. 7-8
            if self.loss_cfg["memory_normalize"]:
                means = F.normalize(means, dim=1)
            self.memory.memory(bank).copy_(means)
        self.initialized = True
        seconds = time.time() - start
        ctx.log(f"epoch {ctx.epoch + 1}: centroid memory initialised by a full pass in {seconds:.1f}s")
        return {"memory_init_seconds": seconds}

    def after_step(self, ctx: TrainContext) -> None:
        """Eq. 9 for every visible and infrared sample of the step, in batch order."""
        if self._pending is None:
            return
        f_v, y_v, f_ir, y_ir = self._pending
        self._pending = None
        self.memory.update_("v", f_v, y_v)
        self.memory.update_("ir", f_ir, y_ir)

    # --- losses -------------------------------------------------------------------------------
    def losses(self, model, batch: Batch, out) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        c = self.loss_cfg
        labels = batch.all_labels()
        layout, device = batch.layout(), labels.device
        vis, ir = rows_of(layout, "visible", device), rows_of(layout, "infrared", device)
        gen = rows_of(layout, "auxiliary", device)
        real = vis | ir
        f = F.normalize((out.bn if c["feature"] == "bnneck" else out.pooled).float(), dim=1)
        logits = out.logits.float()
        ce = F.cross_entropy(logits[vis], labels[vis]) + F.cross_entropy(logits[ir], labels[ir])
        if c["ce_generated"] and bool(gen.any()):
            ce = ce + F.cross_entropy(logits[gen], labels[gen])
        total, logs = ce, {"ce": ce.detach()}

        def add(name: str, value: torch.Tensor, weight: float = 1.0) -> None:
            nonlocal total
            total = total + weight * value
            logs[name] = value.detach()

        if c["triplet"]:
            add("tri", weighted_regularized_triplet(out.pooled[real], labels[real]))
        if c["ins"]:
            add("ins", rk_losses.hard_instance_contrastive(f[real], labels[real], c["num_negatives"], c["tau_ins"]))
        if c["mod"]:
            modality = ir[real].long()  # 0 visible, 1 infrared
            add("mod", rk_losses.modality_centroid_contrastive(f[real], labels[real], modality, self.centroids(),
                                                               c["tau_mod"]), c["lambda_mod"])
            self._pending = (f[vis].detach(), labels[vis], f[ir].detach(), labels[ir])
        if c["gsl"]:
            local = local_features(model, batch, c["gsl_resize"])
            add("sim", similarity_loss(out.extras["projected"], local), c["lambda_sim"])
        if c["ical"]:
            add("mix", rk_losses.channel_mix_margin(f[vis], f[ir], f[gen], c["mix_margin"]), c["lambda_mix"])
        logs["loss"] = total.detach()
        return total, logs

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self):
        return {"memory": {k: t.detach().cpu().clone() for k, t in self.memory.state_dict().items()},
                "initialized": self.initialized}

    def load_state_dict(self, state) -> None:
        self.memory.load_state_dict(state["memory"])
        self.initialized = bool(state["initialized"])
