"""Image transforms of the VI-ReID community code, written on uint8/float tensors.

Every random decision draws from an explicit ``torch.Generator`` seeded per sample
(by the sampler), so augmentation is reproducible whatever the number of loader
workers and bit-exact across a checkpoint resume.

Train: resize (at load) -> [channel augmentation] -> horizontal flip -> pad + random
crop -> normalise (ImageNet mean/std) -> [random erasing]. Test: resize -> normalise.

Channel augmentation: ``grayscale`` (luma) and ``exchange`` (CAJ: one channel into all three)
apply to visible images only; ``copy`` (SAAI's released code: with probability
``channel_prob``, 3/11 there, one of R/G/B copied into all three) applies to every image.
Padding is zeros or ``symmetric`` (mirrored with the edge, SAAI's code); erasing fills with
zeros (the normalised mean) or ``random`` standard-normal values (torchvision's
``value='random'``, SAAI's code).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
CHANNEL_AUGS = ("none", "grayscale", "exchange", "copy")
ERASING_VALUES = ("zero", "random")
PAD_MODES = ("zero", "symmetric")


def resize_to_tensor(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """PIL image -> (3, H, W) uint8 tensor at the training size (bilinear, as the community code)."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    array = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 normalised with ImageNet statistics."""
    return (x.float() / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def luma(x: torch.Tensor) -> torch.Tensor:
    """(H, W) uint8 ITU-R 601 luma of a (3, H, W) uint8 image, as PIL's ``convert("L")``."""
    return (0.299 * x[0].float() + 0.587 * x[1].float() + 0.114 * x[2].float()).round().to(torch.uint8)


def _uniform(g: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


@dataclass
class TrainTransform:
    """Training augmentation; ``visible`` selects whether channel augmentation applies."""

    flip: float = 0.5
    pad: int = 0
    erasing: float = 0.0
    channel_aug: str = "none"
    channel_prob: float = 0.5
    erasing_value: str = "zero"
    pad_mode: str = "zero"

    def __call__(self, image: torch.Tensor, g: torch.Generator, visible: bool) -> torch.Tensor:
        x = image
        applies = self.channel_aug == "copy" or (visible and self.channel_aug != "none")
        if applies and _uniform(g) < self.channel_prob:
            x = self._channel(x, g)
        if _uniform(g) < self.flip:
            x = x.flip(-1)
        if self.pad > 0:
            x = self._pad_crop(x, g)
        x = normalize(x)
        if self.erasing > 0 and _uniform(g) < self.erasing:
            x = self._erase(x, g, self.erasing_value == "random")
        return x

    def _channel(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.channel_aug == "grayscale":
            return luma(x).expand(3, -1, -1).contiguous()
        c = int(torch.randint(3, (), generator=g))  # CAJ exchange / SAAI copy: one channel -> all three
        return x[c].expand(3, -1, -1).contiguous()

    def _pad_crop(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        _, h, w = x.shape
        if self.pad_mode == "symmetric":
            rows = _symmetric_index(h, self.pad)
            cols = _symmetric_index(w, self.pad)
            padded = x[:, rows][:, :, cols]
        else:
            padded = torch.nn.functional.pad(x, (self.pad,) * 4)
        top = int(torch.randint(2 * self.pad + 1, (), generator=g))
        left = int(torch.randint(2 * self.pad + 1, (), generator=g))
        return padded[:, top: top + h, left: left + w]

    @staticmethod
    def _erase(x: torch.Tensor, g: torch.Generator, random_values: bool = False) -> torch.Tensor:
        """Random erasing (Zhong et al.): a rectangle of 2-40 % area, aspect 0.3-3.3, set to 0 (the
        mean) or to standard-normal values."""
        _, h, w = x.shape
        for _ in range(10):
            area = _uniform(g, 0.02, 0.4) * h * w
            aspect = math.exp(_uniform(g, math.log(0.3), math.log(1 / 0.3)))
            eh = int(round(math.sqrt(area * aspect)))
            ew = int(round(math.sqrt(area / aspect)))
            if 0 < eh < h and 0 < ew < w:
                top = int(torch.randint(h - eh + 1, (), generator=g))
                left = int(torch.randint(w - ew + 1, (), generator=g))
                x = x.clone()
                if random_values:
                    x[:, top: top + eh, left: left + ew] = torch.randn((x.shape[0], eh, ew), generator=g)
                else:
                    x[:, top: top + eh, left: left + ew] = 0
                return x
        return x


def _symmetric_index(n: int, pad: int) -> torch.Tensor:
    """Indices of a length-``n`` axis padded by ``pad`` mirrored samples on each side, the edge
    sample repeated (numpy/torchvision ``symmetric``); folds again when ``pad`` > ``n``."""
    i = torch.arange(-pad, n + pad)
    period = 2 * n
    i = i % period
    return torch.where(i < n, i, period - 1 - i)


def build_train_transform(cfg: dict) -> TrainTransform:
    return TrainTransform(flip=cfg["flip"], pad=cfg["pad"], erasing=cfg["erasing"],
                          channel_aug=cfg["channel_aug"], channel_prob=cfg["channel_prob"],
                          erasing_value=cfg.get("erasing_value", "zero"), pad_mode=cfg.get("pad_mode", "zero"))
