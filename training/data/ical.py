"""ICAL's generated images: a visible image with one or two of its colour channels replaced by
an infrared image of the same identity.

"Partial Enhancement and Channel Aggregation for Visible-Infrared Person Re-Identification"
(IEICE Trans. Inf. & Syst., 2024), eq. 2. The variant's name lists the visible channels kept;
every other channel takes the infrared image:

=======  ======================
variant  channels (R, G, B)
=======  ======================
``RG``   (v_r, v_g, ir)
``RB``   (v_r, ir, v_b)
``GB``   (ir, v_g, v_b)
``R``    (v_r, ir, ir)
``G``    (ir, v_g, ir)
``B``    (ir, ir, v_b)
=======  ======================

Readings taken where the paper is silent: the variant is drawn uniformly per generated image
(one generated image per visible image); the infrared image is the single-channel luma of the
stored 3-channel infrared image (ITU-R 601, as PIL's ``convert("L")``: the channel itself when
the three are equal, as in SYSU-MM01 and RegDB); the two images are mixed as they are, without
spatial alignment (different shots), on the resized uint8 images *before* augmentation, so
the visible image's channel augmentation never undoes the mix.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from .transforms import luma

# variant -> for each output channel R, G, B: the visible channel kept (0, 1, 2) or None for infrared
ICAL_VARIANTS: Dict[str, Tuple] = {
    "RG": (0, 1, None),
    "RB": (0, None, 2),
    "GB": (None, 1, 2),
    "R": (0, None, None),
    "G": (None, 1, None),
    "B": (None, None, 2),
}
VARIANT_NAMES = tuple(ICAL_VARIANTS)


def infrared_channel(infrared: torch.Tensor) -> torch.Tensor:
    """(H, W) uint8 luma of a (3, H, W) uint8 infrared image (its channel when all three agree)."""
    if infrared.dtype != torch.uint8 or infrared.dim() != 3 or infrared.shape[0] != 3:
        raise ValueError(f"infrared: expected a (3, H, W) uint8 image, got {tuple(infrared.shape)} {infrared.dtype}")
    return luma(infrared)


def ical_mix(visible: torch.Tensor, infrared: torch.Tensor, variant: str) -> torch.Tensor:
    """The generated image of eq. 2 for ``variant``: (3, H, W) uint8 from two (3, H, W) uint8 images
    of the same size."""
    if variant not in ICAL_VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANT_NAMES}, got {variant!r}")
    if visible.dtype != torch.uint8 or visible.shape != infrared.shape or visible.dim() != 3 or visible.shape[0] != 3:
        raise ValueError(f"visible, infrared: expected two (3, H, W) uint8 images of one size, got "
                         f"{tuple(visible.shape)} {visible.dtype} and {tuple(infrared.shape)} {infrared.dtype}")
    ir = infrared_channel(infrared)
    return torch.stack([ir if keep is None else visible[keep] for keep in ICAL_VARIANTS[variant]])


def ical_image(visible: torch.Tensor, infrared: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One generated image: a variant drawn uniformly from ``g``, then :func:`ical_mix`."""
    variant = VARIANT_NAMES[int(torch.randint(len(VARIANT_NAMES), (), generator=g))]
    return ical_mix(visible, infrared, variant)
