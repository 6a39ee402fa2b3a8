"""MCE -- "Cross-Modality Person Re-identification with Memory-Based Contrastive Embedding"
(Cheng et al., AAAI 2023), and its released code (IDLNL/MCE).

Objective (eqs. 4, 8, 9 and the total loss): ``L = L_W + lambda1 * L_MI + lambda2 * L_GC`` on the L2-normalised
BNNeck features ``f`` of a weight-sharing backbone (one stem, AGW non-local blocks,
learnable GeM), over three input modalities: visible ``v``, infrared ``r`` and the auxiliary
``a`` made from each visible image by channel exchange.

* Memories (eqs. 1-3): four identity banks on :class:`reid_kernels.nn.MemoryBank` --
  modality-aware ``v``, ``r``, ``a`` (mean update, gamma 0.25 as the released code;
  the paper prints 0.3) and modality-agnostic ``u`` (the code's "hard" update: the
  batch sample least similar to the row, gamma 0.1; the paper's mean update as an
  option); rows re-normalised; updated inside backward, so a step's logits use the
  pre-update banks (the released code).
* ``L_W`` (eq. 2, 4): cluster-contrast cross-entropies ``L^u`` (every feature against
  ``u``) ``+ L^v + L^r + 0.4 L^a`` -- the code's weights; the paper's eq. 4 weights all
  four by 1 (``loss.lambda_aux=1``).
* Historical centroids ``C`` (the paper's section on historical proxies): at every epoch start every training image is
  re-encoded by the current model in eval mode (the auxiliary copies with a seeded
  channel exchange); the L2-normalised class means become both the banks ``W^{v,r,a}``
  and the frozen ``C^{v,r,a}``; ``W^u = C^u`` is the average of the modality centroids
  (not re-normalised), as the code does.
* ``L_MI`` (eqs. 5-8): KL divergences between proxy softmaxes (tau = 0.05), target side
  without gradient. ``mi_pairing="code"`` (default, the released code): under one
  centroid set, the RGB sample's distribution is pulled toward that of the IR sample at
  the same batch position and vice versa, plus the auxiliary sample under ``C^a``
  toward itself under ``C^r``; ``batchmean`` over all those rows.
  ``mi_pairing="paper"``: eq. 7 read as full-distribution KL of one feature under the
  two centroid sets, ``KL(p(f_v|C^r) || p(f_v|C^v)) + KL(p(f_r|C^v) || p(f_r|C^r))``
  plus the ``a <-> r`` pair built the same way (eq. 8), each ``batchmean``.
* ``L_GC`` (eq. 9): :func:`reid_kernels.losses.centroid_triplet` of every feature to
  ``C^u``, margin 0.3, hardest negative among the identities of the batch (code;
  ``gc_negatives="all"``: every centroid, the paper).
* Table 3 switches: ``channels`` 2 or 3; ``memory_agnostic`` (``L^u``), ``memory_aware``
  (``L^{v,r,a}``), ``mi``, ``gc``, ``ce`` (identity cross-entropy on a BNNeck classifier:
  the "CE" row); ``mi_centroids`` / ``gc_centroids`` = ``"bank"`` for the D variants (the
  up-to-date banks, as they were at the start of the step, instead of ``C``).
"""
from __future__ import annotations

import time
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from reid_kernels import losses as rk_losses
from reid_kernels.nn import MemoryBank

from .. import validators as v
from ..data import Batch, BatchSpec
from ..models import feature_dim
from .base import Recipe, TrainContext

BANKS = ("v", "r", "a", "u")
MODALITY_BANK = {"visible": "v", "infrared": "r", "auxiliary": "a"}


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class means of ``features`` (rows of absent classes: zero), not re-normalised."""
    sums = features.new_zeros((num_classes, features.shape[1])).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).unsqueeze(1).to(sums.dtype)
    return sums / counts


def class_centroids(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """L2-normalised per-class means (eq. 1); rows of absent classes are zero."""
    return F.normalize(class_means(features.float(), labels, num_classes), dim=1)


def proxy_kl(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(target) || softmax(logits))`` summed over classes, mean over rows (batchmean);
    the target carries no gradient."""
    return F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(target_logits.detach(), dim=1), log_target=True,
                    reduction="batchmean")


class MCERecipe(Recipe):
    name = "mce"
    DEFAULTS = {
        "loss": {
            "channels": 3, "memory_agnostic": True, "memory_aware": True, "mi": True, "gc": True, "ce": False,
            "mi_centroids": "historical", "gc_centroids": "historical", "mi_pairing": "code",
            "gc_negatives": "batch", "agnostic_update": "hard",
            "temperature": 0.05, "momentum_aware": 0.25, "momentum_agnostic": 0.1,
            "lambda_mi": 1.2, "lambda_gc": 1.0, "lambda_aware": 1.0, "lambda_aux": 0.4, "gc_margin": 0.3,
        },
        # Released code: one shared stem, AGW non-local blocks, learnable GeM (p0 = 3), BNNeck.
        "model": {"stems": 1, "non_local": True, "gem_learnable": True, "gem_p": 3.0},
        # Adam 3.5e-4 (weight decay 5e-4) for every parameter, linear warm-up over 10 epochs, then
        # x0.1 and x0.01: the code's `epoch > 20` / `epoch >= 40` (SYSU) is milestones [21, 40].
        "optim": {"name": "adam", "lr_backbone": 3.5e-4, "lr_head": 3.5e-4, "weight_decay": 5e-4,
                  "warmup_epochs": 10, "milestones": [21, 40], "gamma": 0.1},
        "train": {"epochs": 80},
    }
    LOSS_SPEC = {
        "channels": v.choice(2, 3), "memory_agnostic": v.boolean, "memory_aware": v.boolean, "mi": v.boolean,
        "gc": v.boolean, "ce": v.boolean,
        "mi_centroids": v.choice("historical", "bank"), "gc_centroids": v.choice("historical", "bank"),
        "mi_pairing": v.choice("code", "paper"), "gc_negatives": v.choice("batch", "all"),
        "agnostic_update": v.choice("hard", "mean"),
        "temperature": v.number(0, lo_open=True), "momentum_aware": v.number(0, 1),
        "momentum_agnostic": v.number(0, 1), "lambda_mi": v.number(0), "lambda_gc": v.number(0),
        "lambda_aware": v.number(0), "lambda_aux": v.number(0), "gc_margin": v.number(0),
    }

    def __init__(self, cfg: dict, num_classes: int, seed: int = 0):
        super().__init__(cfg, num_classes, seed)
        c = self.loss_cfg
        self.modalities = ("visible", "infrared", "auxiliary") if c["channels"] == 3 else ("visible", "infrared")
        self.uses_memory = c["memory_agnostic"] or c["memory_aware"] or c["mi"] or c["gc"]
        aware = c["momentum_aware"]
        self.memory = MemoryBank(
            num_classes, feature_dim(cfg["model"]["depth"], cfg["model"]["width"]), names=BANKS,
            momentum={"v": aware, "r": aware, "a": aware, "u": c["momentum_agnostic"]},
            mode={"v": "mean", "r": "mean", "a": "mean", "u": c["agnostic_update"]},
            normalize=True, convention="old", temperature=c["temperature"], history=True, sync_ddp=True)

    @classmethod
    def uses_classifier(cls, cfg: dict) -> bool:
        return bool(cfg["loss"]["ce"])

    @classmethod
    def test_descriptor(cls, cfg: dict) -> str:
        return "bnneck"  # the released code: the BNNeck output, L2-normalised by the cosine distance

    @classmethod
    def check_config(cls, cfg: dict) -> Optional[str]:
        c = cfg["loss"]
        if not any(c[k] for k in ("memory_agnostic", "memory_aware", "mi", "gc", "ce")):
            return "loss: expected at least one of memory_agnostic, memory_aware, mi, gc, ce to be true, got none"
        return None

    def batch_spec(self) -> BatchSpec:
        return BatchSpec(self.modalities, "channel_exchange" if "auxiliary" in self.modalities else None)

    # --- hooks --------------------------------------------------------------------------------
    def on_train_start(self, ctx: TrainContext) -> None:
        self.memory.to(ctx.device)

    def on_epoch_start(self, ctx: TrainContext) -> Optional[Dict[str, float]]:
        """Re-extract the historical centroids by a full pass and re-initialise the banks."""
        if not self.uses_memory:
            return None
        start = time.time()
        centroids = self.refresh_centroids(ctx)
        self.load_centroids(centroids)
        seconds = time.time() - start
        ctx.log(f"epoch {ctx.epoch + 1}: centroids of {len(centroids)} modalities re-extracted in {seconds:.1f}s")
        return {"refresh_seconds": seconds}

    def refresh_centroids(self, ctx: TrainContext) -> Dict[str, torch.Tensor]:
        """{bank: (num_classes, d) normalised class means of the current model's features}."""
        out = {}
        for modality in self.modalities:
            source = "visible" if modality == "auxiliary" else modality
            derivation = "channel_exchange" if modality == "auxiliary" else None
            # The run's seed, not the per-rank one: every DDP rank derives the same auxiliary images,
            # so every rank's banks stay identical.
            feats, labels = ctx.extract(source, "bnneck", derivation=derivation,
                                        seed=(self.cfg["seed"], ctx.epoch))
            # The released code's eval forward returns normalize(BN(f)); the means are normalised again.
            out[MODALITY_BANK[modality]] = class_centroids(F.normalize(feats, dim=1), labels, self.num_classes)
        return out

    @torch.no_grad()
    def load_centroids(self, centroids: Dict[str, torch.Tensor]) -> None:
        """Banks and history <- the centroids; ``u`` <- their average (not re-normalised)."""
        for name, c in centroids.items():
            self.memory.memory(name).copy_(c)
            self.memory.set_history_(name, c.to(self.memory.history(name)))
        agnostic = torch.stack(list(centroids.values())).mean(0)
        self.memory.memory("u").copy_(agnostic)
        self.memory.set_history_("u", agnostic.to(self.memory.history("u")))

    # --- losses -------------------------------------------------------------------------------
    def losses(self, model, batch: Batch, out) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        c = self.loss_cfg
        labels = batch.all_labels()
        feats = F.normalize(out.bn.float(), dim=1)
        parts = dict(zip(batch.modalities, feats.split(batch.sizes())))
        part_labels = {m: batch.labels[m] for m in batch.modalities}
        # D variants read the banks as they are before this step's updates (which run in backward).
        snapshot = {n: self.memory.memory(n).clone() for n in BANKS} if self._needs_snapshot() else {}
        total = feats.new_zeros(())
        logs: Dict[str, torch.Tensor] = {}
        if c["ce"]:
            ce = F.cross_entropy(out.logits.float(), labels)
            total, logs["ce"] = total + ce, ce.detach()
        if c["memory_agnostic"]:
            mem_u = self.memory.contrast_loss(feats, labels, "u", update_in_backward=True)
            total, logs["mem_u"] = total + mem_u, mem_u.detach()
        if c["memory_aware"]:
            for modality, f in parts.items():
                bank = MODALITY_BANK[modality]
                term = self.memory.contrast_loss(f, part_labels[modality], bank, update_in_backward=True)
                weight = c["lambda_aware"] * (c["lambda_aux"] if bank == "a" else 1.0)
                total, logs[f"mem_{bank}"] = total + weight * term, term.detach()
        if c["mi"]:
            mi = self.mutual_information(parts, snapshot)
            total, logs["mi"] = total + c["lambda_mi"] * mi, mi.detach()
        if c["gc"]:
            centers = snapshot["u"] if c["gc_centroids"] == "bank" else self.memory.history("u")
            gc = rk_losses.centroid_triplet(feats, labels, centers, margin=c["gc_margin"],
                                            negatives=c["gc_negatives"])
            total, logs["gc"] = total + c["lambda_gc"] * gc, gc.detach()
        logs["loss"] = total.detach()
        return total, logs

    def _needs_snapshot(self) -> bool:
        c = self.loss_cfg
        return (c["mi"] and c["mi_centroids"] == "bank") or (c["gc"] and c["gc_centroids"] == "bank")

    def _centroids(self, bank: str, snapshot: Dict[str, torch.Tensor]) -> torch.Tensor:
        return snapshot[bank] if self.loss_cfg["mi_centroids"] == "bank" else self.memory.history(bank)

    def mutual_information(self, parts: Dict[str, torch.Tensor], snapshot: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``L_MI`` (eqs. 5-8) in the configured pairing; see the module docstring."""
        tau = self.loss_cfg["temperature"]
        cv, cr = self._centroids("v", snapshot), self._centroids("r", snapshot)
        fv, fr = parts["visible"], parts["infrared"]
        fa = parts.get("auxiliary")
        if self.loss_cfg["mi_pairing"] == "code":
            # Rows k of the RGB and IR blocks share an identity (the sampler's layout).
            logits = [fv @ cv.t(), fr @ cr.t()]
            targets = [fr @ cv.t(), fv @ cr.t()]
            if fa is not None:
                ca = self._centroids("a", snapshot)
                logits.append(fa @ ca.t())
                targets.append(fa @ cr.t())
            return proxy_kl(torch.cat(logits) / tau, torch.cat(targets) / tau)
        mi = proxy_kl(fv @ cv.t() / tau, fv @ cr.t() / tau) + proxy_kl(fr @ cr.t() / tau, fr @ cv.t() / tau)
        if fa is not None:
            ca = self._centroids("a", snapshot)
            mi = mi + proxy_kl(fa @ ca.t() / tau, fa @ cr.t() / tau) + proxy_kl(fr @ cr.t() / tau, fr @ ca.t() / tau)
        return mi

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self):
        return {"memory": {k: t.detach().cpu().clone() for k, t in self.memory.state_dict().items()}}

    def load_state_dict(self, state) -> None:
        self.memory.load_state_dict(state["memory"])
