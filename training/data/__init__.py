"""Datasets, transforms and the cross-modality sampler.

Data flows dataset -> sampler -> model: :func:`load_trainset` reads a dataset's file
lists, :class:`CrossModalityIdentitySampler` draws slots, :class:`ModalityDataset` turns
each slot into the images of the modalities a recipe's :class:`BatchSpec` asks for
(derived ones included), :func:`collate_batch` stacks them into a :class:`Batch`.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from .batch import (DERIVATIONS, PAIRED_DERIVATIONS, Batch, BatchSpec, ModalityDataset, channel_exchange, collate_batch,
                    rows_of)
from .ical import ICAL_VARIANTS, ical_image, ical_mix
from .common import DatasetError, ImageList, TrainSet, load_image
from .root import resolve_data_root
from .regdb import load_regdb
from .sampler import CrossModalityIdentitySampler
from .sysu import load_sysu
from .transforms import TrainTransform, build_train_transform, normalize, resize_to_tensor

__all__ = [
    "Batch", "BatchSpec", "CrossModalityIdentitySampler", "DERIVATIONS", "DatasetError", "ICAL_VARIANTS",
    "ImageCache", "ImageList", "ModalityDataset", "PAIRED_DERIVATIONS", "TrainSet", "TrainTransform",
    "build_train_transform", "channel_exchange", "collate_batch", "ical_image", "ical_mix", "load_image",
    "load_trainset", "normalize", "resolve_data_root", "rows_of",
]

DATASETS = ("sysu", "regdb", "synth")


def load_trainset(name: str, root: str, trial: int = 1) -> TrainSet:
    """Training lists of ``name`` (synthetic data uses the SYSU-MM01 layout and loader)."""
    if name in ("sysu", "synth"):
        trainset = load_sysu(root)
        if name == "synth":
            trainset.name = "synthetic (SYSU-MM01 layout)"
        return trainset
    if name == "regdb":
        return load_regdb(root, trial)
    raise ValueError(f"data.dataset: expected one of {DATASETS}, got {name!r}")


_SHARED_STORES: Dict[Tuple[int, int], Dict[str, torch.Tensor]] = {}


class ImageCache:
    """Decoded, resized uint8 images, optionally kept in memory (worth it for small sets)."""

    def __init__(self, height: int, width: int, keep: bool):
        self.height, self.width, self.keep = height, width, keep
        # One store per image size shared by every cache in the process (the demo trains several rows).
        self._store: Dict[str, torch.Tensor] = _SHARED_STORES.setdefault((height, width), {}) if keep else {}

    def get(self, path: str) -> torch.Tensor:
        hit = self._store.get(path)
        if hit is not None:
            return hit
        tensor = resize_to_tensor(load_image(path), self.height, self.width)
        if self.keep:
            self._store[path] = tensor
        return tensor
