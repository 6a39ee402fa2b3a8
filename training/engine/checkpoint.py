"""Checkpoint files: atomic writes, RNG state, and reading a checkpoint back into a model.

A training checkpoint holds the model, optimiser, schedule, sampler, recipe state (its
generators, banks ...), gradient scaler, every RNG state, the epoch, step, history and
the config, so ``--resume`` continues bit-exactly from an epoch boundary.
"""
from __future__ import annotations

import os
import random
import warnings
from typing import Dict

import numpy as np
import torch

from ..errors import CheckpointError  # noqa: F401 (re-exported)
from ..recipes import build_model
from .durable import atomic_write

FORMAT = "reid_kernels.training/1"


def rng_state() -> Dict[str, object]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, object]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_save(obj, path: str) -> None:
    """``torch.save`` through :func:`~.durable.atomic_write`: never a half-written checkpoint,
    not even after a power cut."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_checkpoint(path: str, what: str = "--checkpoint") -> dict:
    """A checkpoint written by ``training.train``; anything else raises :class:`CheckpointError`
    naming ``what`` and the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what}: file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated, text, foreign pickles: one message, whatever the cause
        raise CheckpointError(f"{what}: {path} is not a checkpoint written by training.train "
                              f"(cannot be read: {type(error).__name__})") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{what}: {path} is not a checkpoint written by training.train")
    return state


def load_model_from_checkpoint(state: dict, cfg: dict):
    """The model of a checkpoint (built as its recipe builds it), weights loaded."""
    cfg = dict(cfg, model=dict(cfg["model"], pretrained=None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(cfg, state["num_classes"], log=lambda *_: None)
    model.load_state_dict(state["model"])
    return model
