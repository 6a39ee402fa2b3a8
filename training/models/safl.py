"""SAAI's building blocks ("Visible-Infrared Person Re-Identification via Semantic Alignment and
Affinity Inference", ICCV 2023, and its released code xiaoye-hhh/SAAI):

* :class:`SAFL` -- semantic-aligned feature learning, eqs. 1-3: learnable prototypes shared by
  both modalities, a learnable position embedding that enters only the similarity (the
  code's reading of the paper's ambiguity), sigmoid prototype-pixel similarity, part features
  as the similarity-weighted mean of the raw tokens;
* :class:`DualBNNeck` -- one BatchNorm1d per modality (bias frozen at 0), rows routed by modality;
* :class:`MAM` -- the MPANet "modality alleviation" block the released SYSU config inserts after
  ``layer3`` and ``layer4``: channel attention blending the map with its InstanceNorm.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


class SAFL(nn.Module):
    """``S = sigmoid(P (T + E)^T)`` (eq. 1), ``p_i = (1/n) sum_j S_ij T_j`` (eq. 2).

    ``forward(fmap)`` with ``fmap`` (B, c, h, w) returns ``(parts (B, p, c), S (B, p, n))``.
    ``E`` has one row per map position: the released code hard-wires 18x9 (288x144 input at
    stride 16); here ``positions`` follows the configured input size, and a map of another size
    is refused naming both. ``P`` and ``E`` are Kaiming-normal initialised, as the code does.
    """

    def __init__(self, channels: int, positions: int, parts: int = 7, map_size: Tuple[int, int] = None):
        super().__init__()
        if parts < 2:
            raise ValueError(f"loss.num_parts: expected at least 2 prototypes, got {parts}")
        self.prototypes = nn.Parameter(nn.init.kaiming_normal_(torch.empty(parts, channels)))
        self.position = nn.Parameter(nn.init.kaiming_normal_(torch.empty(positions, channels)))
        self.map_size = map_size

    def forward(self, fmap: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = fmap.shape
        if h * w != self.position.shape[0]:
            expected = f"{self.map_size[0]}x{self.map_size[1]}" if self.map_size else f"{self.position.shape[0]} positions"
            raise ValueError(f"SAFL: the feature map is {h}x{w} ({h * w} positions) but the position embedding "
                             f"was built for {expected}, i.e. for the configured data.height x data.width; "
                             "extract at the training input size")
        tokens = fmap.flatten(2).transpose(1, 2)                            # T: (B, n, c)
        similarity = torch.sigmoid((tokens + self.position) @ self.prototypes.t()).transpose(1, 2)  # (B, p, n)
        parts = similarity @ tokens / (h * w)                               # (B, p, c), raw tokens
        return parts, similarity


class DualBNNeck(nn.Module):
    """Visible rows through ``bn_v``, infrared rows through ``bn_i`` (both bias-free at 0)."""

    def __init__(self, dim: int):
        super().__init__()
        self.bn_v = nn.BatchNorm1d(dim)
        self.bn_i = nn.BatchNorm1d(dim)
        for bn in (self.bn_v, self.bn_i):
            nn.init.zeros_(bn.bias)
            bn.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor, infrared: torch.Tensor) -> torch.Tensor:
        """``infrared``: (B,) bool, True for the rows of infrared images."""
        out = torch.empty_like(x)
        if bool(infrared.any()):
            out[infrared] = self.bn_i(x[infrared])
        if bool((~infrared).any()):
            out[~infrared] = self.bn_v(x[~infrared])
        return out


class MAM(nn.Module):
    """``x * m + IN(x) * (1 - m)`` with channel attention ``m = sigmoid(W2 relu(W1 avg(x)))``."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.attention = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(inplace=True),
                                       nn.Conv2d(hidden, channels, 1, bias=False), nn.Sigmoid())
        self.norm = nn.InstanceNorm2d(channels, track_running_stats=False)
        for m in self.attention:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.attention(x.mean((2, 3), keepdim=True))
        return x * mask + self.norm(x) * (1 - mask)
