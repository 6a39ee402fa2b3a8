"""The recipe interface: everything a training method declares, so the engine knows no method.

A recipe is a class with

* ``name`` and ``DEFAULTS``: its config defaults, a nested mapping merged over the
  global defaults before the YAML file -- its ``loss`` section (validated by its
  ``LOSS_SPEC``), and its ``model``, ``optim`` (SGD or Adam, warm-up, decays) and
  ``train`` defaults;
* :meth:`Recipe.uses_classifier` and :meth:`Recipe.build_extras`: what it adds to the
  shared backbone (a classifier; heads, prototypes ... as ``model.extras``);
  backbone options -- stems, non-local blocks, GeM, BNNeck -- are ``model`` config keys;
* :meth:`Recipe.batch_spec`: the modalities it trains on, derived ones included;
* :meth:`Recipe.losses`: model output -> (total loss, {name: value}), each term logged
  under its own name;
* hooks :meth:`on_train_start`, :meth:`on_epoch_start`, :meth:`after_step`, which get a
  :class:`TrainContext` from the engine (the model, the training set, a full-pass feature
  extractor, the epoch);
* :meth:`Recipe.test_descriptor`: which feature the test protocol ranks; the test-time
  post-process is ``eval.rerank`` (``none``, ``k_reciprocal``, ``aim``, ``aim-paper``),
  available to every recipe;
* :meth:`state_dict` / :meth:`load_state_dict`: everything beyond the model and the
  optimiser that ``--resume`` needs to continue bit-exactly (generators, banks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple

import torch

from ..data import Batch, BatchSpec

Logs = Dict[str, torch.Tensor]


@dataclass
class TrainContext:
    """What the engine hands a recipe's hooks.

    ``extract(modality, descriptor, derivation=None, seed=0)`` runs the model in eval mode
    over every training image of ``modality`` (``"visible"`` or ``"infrared"``; a
    ``derivation`` such as ``"channel_exchange"`` is applied to each image with a
    generator seeded from ``seed`` and the image index) and returns ``(features (N, d)
    float32 on the training device, labels (N,) int64 on the same device)``: batched,
    ``torch.inference_mode``, AMP on CUDA, DataLoader workers.
    """

    model: torch.nn.Module
    device: torch.device
    trainset: Any
    cfg: dict
    epoch: int = 0
    step: int = 0
    log: Callable[[str], None] = print
    extract: Optional[Callable[..., Tuple[torch.Tensor, torch.Tensor]]] = None


class Recipe:
    """Base class: override what the method needs; the defaults do nothing."""

    name: ClassVar[str] = ""
    DEFAULTS: ClassVar[Dict[str, Dict[str, Any]]] = {"loss": {}}
    LOSS_SPEC: ClassVar[Dict[str, Callable[[Any], Optional[str]]]] = {}

    def __init__(self, cfg: dict, num_classes: int, seed: int = 0):
        self.cfg = cfg
        self.loss_cfg = cfg["loss"]
        self.num_classes = num_classes
        self.seed = int(seed)

    # --- what it adds to the backbone ---------------------------------------------------------
    @classmethod
    def uses_classifier(cls, cfg: dict) -> bool:
        """Whether the BNNeck carries an identity classifier (unused parameters break DDP)."""
        return True

    @classmethod
    def uses_bnneck(cls, cfg: dict) -> bool:
        """Whether the backbone keeps its BNNeck (False when the method brings its own head)."""
        return True

    @classmethod
    def build_extras(cls, cfg: dict, backbone: torch.nn.Module) -> Optional[torch.nn.Module]:
        """Trainable modules the method adds, attached as ``model.extras``; None: nothing.

        ``extras(output, layout)`` -- the backbone's :class:`ModelOutput` and the batch's
        ``((modality, rows), ...)`` -- runs inside the model's forward (so DDP sees its parameters
        used) and its result is ``ModelOutput.extras``; ``extras.describe(layer4 map, modality)`` gives the test
        descriptor when :meth:`test_descriptor` is ``"extras"``.
        """
        return None

    @classmethod
    def test_descriptor(cls, cfg: dict) -> str:
        """``"pooled"`` (GeM of layer4) or ``"bnneck"`` (BN output)."""
        return "pooled"

    @classmethod
    def check_config(cls, cfg: dict) -> Optional[str]:
        """Cross-key checks of a validated config: an error message naming the key, or None."""
        return None

    # --- data ---------------------------------------------------------------------------------
    def batch_spec(self) -> BatchSpec:
        return BatchSpec()

    # --- losses -------------------------------------------------------------------------------
    def losses(self, model: torch.nn.Module, batch: Batch, out) -> Tuple[torch.Tensor, Logs]:
        raise NotImplementedError

    # --- hooks --------------------------------------------------------------------------------
    def on_train_start(self, ctx: TrainContext) -> None:
        pass

    def on_epoch_start(self, ctx: TrainContext) -> Optional[Dict[str, float]]:
        """Runs before the epoch's first step; may return figures to log (e.g. seconds)."""
        return None

    def after_step(self, ctx: TrainContext) -> None:
        pass

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model
