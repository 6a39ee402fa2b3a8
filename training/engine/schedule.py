"""Optimisers and the per-epoch learning-rate schedule.

Two parameter groups (backbone / BNNeck, pooling and recipe extras), each with its own
base learning rate; ``optim.name`` picks SGD (LbA: Nesterov, momentum 0.9) or Adam (MCE,
SAAI: betas (0.9, 0.999)). The learning rate is set once per epoch, as the community code
does: ``(e + 1) / warmup`` during the warm-up, then ``gamma ** (milestones passed)``.
"""
from __future__ import annotations

from typing import Dict

import torch

from ..recipes import unwrap


def lr_factor(epoch: int, warmup_epochs: int, milestones, gamma: float) -> float:
    """``(e + 1) / warmup`` during warm-up, then ``gamma ** (#milestones passed)``."""
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    return gamma ** sum(1 for m in milestones if epoch >= m)


class EpochSchedule:
    """Sets each parameter group's lr to ``base_lr * lr_factor(epoch)``; state = the epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: dict):
        self.optimizer = optimizer
        self.cfg = cfg
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        f = lr_factor(epoch, self.cfg["warmup_epochs"], self.cfg["milestones"], self.cfg["gamma"])
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * f

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state) -> None:
        self.set_epoch(int(state["epoch"]))


def parameter_groups(model, cfg: dict):
    inner = unwrap(model)
    o = cfg["optim"]
    head = list(inner.head_parameters())
    extras = getattr(inner, "extras", None)
    if extras is not None:  # a recipe's new layers train at the head's rate
        head += [p for p in extras.parameters() if p.requires_grad]
    extra_ids = {id(p) for p in head}
    backbone = [p for p in inner.backbone_parameters() if id(p) not in extra_ids]
    return [{"params": backbone, "base_lr": o["lr_backbone"], "lr": o["lr_backbone"]},
            {"params": head, "base_lr": o["lr_head"], "lr": o["lr_head"]}]


def build_optimizer(model, cfg: dict) -> torch.optim.Optimizer:
    o = cfg["optim"]
    groups = parameter_groups(model, cfg)
    if o["name"] == "adam":
        return torch.optim.Adam(groups, lr=o["lr_backbone"], weight_decay=o["weight_decay"])
    return torch.optim.SGD(groups, lr=o["lr_backbone"], momentum=o["momentum"], weight_decay=o["weight_decay"],
                           nesterov=o["nesterov"] and o["momentum"] > 0)
