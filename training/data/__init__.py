"""Datasets, transforms and the cross-modality sampler.

Data flows dataset -> sampler -> model: :func:`load_trainset` reads a dataset's file
lists, :class:`PairedDataset` turns sampler slots into (visible, infrared) image pairs,
:func:`collate_pairs` stacks a batch as ``[visible block ; infrared block]``.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch

from .common import DatasetError, ImageList, TrainSet, load_image
from .regdb import load_regdb
from .sampler import CrossModalityIdentitySampler
from .sysu import load_sysu
from .transforms import TrainTransform, build_train_transform, normalize, resize_to_tensor

__all__ = [
    "DatasetError", "ImageList", "TrainSet", "PairedDataset", "CrossModalityIdentitySampler", "TrainTransform",
    "ImageCache", "collate_pairs", "load_trainset", "load_image", "build_train_transform", "normalize",
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


class PairedDataset(torch.utils.data.Dataset):
    """Indexed by sampler slots ``(visible_index, infrared_index, seed)``."""

    def __init__(self, trainset: TrainSet, transform: TrainTransform, height: int, width: int, cache: bool):
        self.trainset = trainset
        self.transform = transform
        self.images = ImageCache(height, width, cache)

    def __len__(self) -> int:
        return max(len(self.trainset.visible), len(self.trainset.infrared))

    def __getitem__(self, slot: Tuple[int, int, int]):
        vis_index, ir_index, seed = slot
        g = torch.Generator().manual_seed(int(seed))
        vis = self.trainset.visible
        ir = self.trainset.infrared
        x_vis = self.transform(self.images.get(vis.paths[vis_index]), g, visible=True)
        x_ir = self.transform(self.images.get(ir.paths[ir_index]), g, visible=False)
        return x_vis, x_ir, int(vis.labels[vis_index]), int(ir.labels[ir_index])


def collate_pairs(items: Sequence[tuple]):
    """-> (visible images (B,3,H,W), infrared images (B,3,H,W), visible labels, infrared labels)."""
    vis, ir, lv, li = zip(*items)
    return torch.stack(vis), torch.stack(ir), torch.tensor(lv), torch.tensor(li)
