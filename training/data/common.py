"""What every VI-ReID training set provides: two image lists (visible, infrared) with labels."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DatasetError  # noqa: F401 (re-exported)


@dataclass
class ImageList:
    """Absolute paths with dense labels (0..C-1), original person ids and camera ids."""

    paths: List[str]
    labels: np.ndarray
    pids: np.ndarray
    cams: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def indices_by_label(self) -> Dict[int, np.ndarray]:
        order = np.argsort(self.labels, kind="stable")
        labels = self.labels[order]
        bounds = np.flatnonzero(np.diff(labels)) + 1
        return {int(labels[g[0]]): g for g in np.split(order, bounds) if len(g)}


@dataclass
class TrainSet:
    """A cross-modality training set: ``visible`` and ``infrared`` share the label space."""

    name: str
    root: str
    visible: ImageList
    infrared: ImageList
    num_classes: int
    info: Dict[str, object] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{self.name} at {self.root}: {self.num_classes} identities, "
                f"{len(self.visible)} visible + {len(self.infrared)} infrared training images")


def load_image(path: str) -> Image.Image:
    """Open an image as RGB; a missing or corrupt file raises :class:`DatasetError` naming it."""
    if not os.path.isfile(path):
        raise DatasetError(f"image file missing: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"corrupt or unreadable image: {path} ({error})") from error


def relabel(pids: Sequence[int], extra: Optional[Sequence[int]] = None) -> Dict[int, int]:
    """Map sorted unique person ids (of both modalities) to 0..C-1."""
    everything = set(int(p) for p in pids) | set(int(p) for p in (extra or ()))
    return {pid: label for label, pid in enumerate(sorted(everything))}


def make_list(entries: Sequence[tuple], mapping: Dict[int, int]) -> ImageList:
    """``entries`` = (path, pid, cam) triples."""
    paths = [e[0] for e in entries]
    pids = np.asarray([e[1] for e in entries], dtype=np.int64)
    cams = np.asarray([e[2] for e in entries], dtype=np.int64)
    labels = np.asarray([mapping[int(p)] for p in pids], dtype=np.int64)
    return ImageList(paths, labels, pids, cams)
