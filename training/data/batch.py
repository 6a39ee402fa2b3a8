"""Sampler slots -> training batches of the modalities a recipe asks for.

A recipe declares its :class:`BatchSpec`: the modalities it trains on, in order, and how
each derived one is made. ``visible`` and ``infrared`` are the sampler's images;
``auxiliary`` is derived, per slot, from the slot's visible image by one of
:data:`DERIVATIONS` (``channel_exchange``: MCE's auxiliary modality), or from the slot's visible
*and* infrared images (one identity: the sampler pairs them) by one of
:data:`PAIRED_DERIVATIONS` (``ical``: PECA's generated images). Every random
decision of a slot -- each modality's augmentation and the derivation -- draws from one
``torch.Generator`` seeded with the slot's seed, in the fixed order visible, infrared,
auxiliary, so a batch is reproducible whatever the loader's worker count, and adding a
derived modality leaves the visible and infrared images of a slot unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from .common import TrainSet
from .ical import ical_image
from .transforms import TrainTransform

BASE_MODALITIES = ("visible", "infrared")


def channel_exchange(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """CAJ channel exchange (MCE's ``ChannelExchange(gray=2)``): one of the three channels,
    chosen uniformly, copied into all three -- applied to the normalised image, as the
    released code does (it runs after ``Normalize``)."""
    c = int(torch.randint(3, (), generator=g))
    return x[c].expand(3, -1, -1).contiguous()


DERIVATIONS: Dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "channel_exchange": channel_exchange,
}
# (visible uint8, infrared uint8, generator) -> uint8 image, made before augmentation and then
# augmented as an infrared image (no channel augmentation, which would undo the mix).
PAIRED_DERIVATIONS: Dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]] = {
    "ical": ical_image,
}


@dataclass(frozen=True)
class BatchSpec:
    """What a recipe needs from the data pipeline.

    ``modalities``: the order of the blocks of a batch (and of the model's output rows);
    ``auxiliary``: the derivation of the ``auxiliary`` modality, when it is asked for.
    """

    modalities: Tuple[str, ...] = BASE_MODALITIES
    auxiliary: Optional[str] = None

    def __post_init__(self):
        allowed = BASE_MODALITIES + ("auxiliary",)
        if not self.modalities or len(set(self.modalities)) != len(self.modalities) or any(
                m not in allowed for m in self.modalities):
            raise ValueError(f"modalities: expected distinct names among {allowed}, got {self.modalities}")
        if ("auxiliary" in self.modalities) != (self.auxiliary is not None):
            raise ValueError("auxiliary: a derivation is needed exactly when the 'auxiliary' modality is asked for, "
                             f"got modalities {self.modalities} and auxiliary={self.auxiliary!r}")
        known = sorted(DERIVATIONS) + sorted(PAIRED_DERIVATIONS)
        if self.auxiliary is not None and self.auxiliary not in known:
            raise ValueError(f"auxiliary: expected one of {known}, got {self.auxiliary!r}")

    @property
    def paired(self) -> bool:
        """Whether the derived modality is made from the slot's visible and infrared images."""
        return self.auxiliary in PAIRED_DERIVATIONS


def rows_of(layout, modality: str, device=None) -> torch.Tensor:
    """(B,) bool mask of the rows of ``modality`` in a batch laid out as ``((modality, rows), ...)``
    (the order of :class:`Batch` and of the model's output rows)."""
    mask = torch.cat([torch.full((rows,), m == modality, dtype=torch.bool) for m, rows in layout])
    return mask.to(device) if device is not None else mask


@dataclass
class Batch:
    """``images[m]`` (B, 3, H, W) and ``labels[m]`` (B,) per modality, in the spec's order."""

    images: Dict[str, torch.Tensor]
    labels: Dict[str, torch.Tensor]

    @property
    def modalities(self) -> Tuple[str, ...]:
        return tuple(self.images)

    def all_labels(self) -> torch.Tensor:
        """The labels of the concatenated batch ``[m1; m2; ...]`` (the model's output rows)."""
        return torch.cat([self.labels[m] for m in self.images])

    def sizes(self) -> Tuple[int, ...]:
        return tuple(x.shape[0] for x in self.images.values())

    def layout(self) -> Tuple[Tuple[str, int], ...]:
        """``((modality, rows), ...)`` in batch order (what the model's ``extras`` receive)."""
        return tuple(zip(self.images, self.sizes()))

    def num_images(self) -> int:
        return sum(self.sizes())

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch({m: x.to(device, non_blocking=non_blocking) for m, x in self.images.items()},
                     {m: y.to(device, non_blocking=non_blocking) for m, y in self.labels.items()})

    def pin_memory(self) -> "Batch":  # DataLoader(pin_memory=True) calls this
        return Batch({m: x.pin_memory() for m, x in self.images.items()},
                     {m: y.pin_memory() for m, y in self.labels.items()})


class ModalityDataset(torch.utils.data.Dataset):
    """Indexed by sampler slots ``(visible_index, infrared_index, seed)``; returns one
    ``(image, label)`` per modality of ``spec``."""

    def __init__(self, trainset: TrainSet, transform: TrainTransform, images, spec: BatchSpec = BatchSpec()):
        self.trainset, self.transform, self.images, self.spec = trainset, transform, images, spec

    def __len__(self) -> int:
        return max(len(self.trainset.visible), len(self.trainset.infrared))

    def __getitem__(self, slot: Tuple[int, int, int]):
        vis_index, ir_index, seed = slot
        g = torch.Generator().manual_seed(int(seed))
        vis, ir = self.trainset.visible, self.trainset.infrared
        wanted = set(self.spec.modalities)
        made = {}
        # Fixed draw order (visible, infrared, auxiliary) whatever the spec's order.
        if "visible" in wanted or "auxiliary" in wanted:
            vis_image = self.images.get(vis.paths[vis_index])
            made["visible"] = (self.transform(vis_image, g, visible=True), int(vis.labels[vis_index]))
        if "infrared" in wanted or self.spec.paired:
            ir_image = self.images.get(ir.paths[ir_index])
            made["infrared"] = (self.transform(ir_image, g, visible=False), int(ir.labels[ir_index]))
        if "auxiliary" in wanted and self.spec.paired:
            # Mixed from the raw pair, then augmented on its own draws.
            mixed = PAIRED_DERIVATIONS[self.spec.auxiliary](vis_image, ir_image, g)
            made["auxiliary"] = (self.transform(mixed, g, visible=False), int(vis.labels[vis_index]))
        elif "auxiliary" in wanted:
            # An independently augmented copy of the slot's visible image, then the derivation.
            x = self.transform(vis_image, g, visible=True)
            made["auxiliary"] = (DERIVATIONS[self.spec.auxiliary](x, g), int(vis.labels[vis_index]))
        return tuple(made[m] for m in self.spec.modalities), self.spec.modalities


def collate_batch(items: Sequence[tuple]) -> Batch:
    """Stack dataset items into a :class:`Batch`."""
    modalities = items[0][1]
    images = {m: torch.stack([item[0][i][0] for item in items]) for i, m in enumerate(modalities)}
    labels = {m: torch.tensor([item[0][i][1] for item in items]) for i, m in enumerate(modalities)}
    return Batch(images, labels)
