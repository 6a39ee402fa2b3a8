"""Batched feature extraction with the model in eval mode: the test protocols and the recipes'
full passes over the training set (e.g. MCE's epoch-start centroid refresh) use this one path.

``torch.inference_mode``, AMP (bf16) on CUDA, images decoded by DataLoader workers; each
image is resized and normalised as at test time, then optionally derived (a channel
exchange for MCE's auxiliary modality) with a generator seeded per image, so a pass is
reproducible whatever the worker count.
"""
from __future__ import annotations

import zlib
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .data import DERIVATIONS, ImageCache, normalize


class _Images(Dataset):
    def __init__(self, paths: Sequence[str], height: int, width: int, derivation: Optional[str], seed, cache: bool,
                 first_index: int):
        self.paths = list(paths)
        self.first_index = first_index
        self.images = ImageCache(height, width, keep=cache)
        self.derive = DERIVATIONS[derivation] if derivation else None
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        x = normalize(self.images.get(self.paths[index]))
        if self.derive is not None:
            g = torch.Generator().manual_seed(image_seed(self.seed, self.first_index + index))
            x = self.derive(x, g)
        return x


def image_seed(seed, index: int) -> int:
    """A 63-bit seed from (``seed``, image index); ``seed`` may be an int or a tuple of ints."""
    parts = seed if isinstance(seed, (tuple, list)) else (seed,)
    text = ",".join(str(int(p)) for p in (*parts, index))
    return zlib.crc32(text.encode()) | (zlib.adler32(text.encode()) << 32)


def extract_features(model, paths: Sequence[str], modality: str, *, height: int, width: int,
                     descriptor: str = "pooled", batch_size: int = 128, workers: int = 0,
                     derivation: Optional[str] = None, seed=0, device=None, cache: bool = False,
                     first_index: int = 0) -> torch.Tensor:
    """(N, D) float32 descriptors of the images at ``paths``, all of ``modality``, on ``device``
    (default: the model's). ``cache`` keeps the decoded images in the process-wide store the
    training loader shares (``data.cache``). ``first_index`` is the index of ``paths[0]`` in the
    whole list the derivation seeds are numbered by (a shard of a pass). The model's train/eval
    mode is restored afterwards."""
    inner = model.module if hasattr(model, "module") else model
    device = torch.device(device) if device is not None else next(inner.parameters()).device
    if not len(paths):
        return torch.zeros(0, inner.feat_dim, device=device)
    loader = DataLoader(_Images(paths, height, width, derivation, seed, cache, first_index), batch_size=batch_size,
                        num_workers=workers, shuffle=False, pin_memory=device.type == "cuda")
    was_training = inner.training
    inner.eval()
    chunks = []
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                    enabled=device.type == "cuda"):
            for x in loader:
                chunks.append(inner.extract(x.to(device, non_blocking=True), modality, descriptor).float())
    finally:
        inner.train(was_training)
    return torch.cat(chunks).clone()  # clone: a normal tensor, usable outside inference mode
