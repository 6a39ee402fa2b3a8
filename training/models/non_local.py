"""AGW's non-local block (Ye et al., "Deep Learning for Person Re-identification: A Survey and
Outlook", TPAMI 2021), as the MCE and PECA backbones insert it.

``z = x + BN(W(y))`` with ``y = (theta(x)^T phi(x) / n) g(x)``: a dot-product affinity over
the ``n = h*w`` positions divided by ``n`` (no softmax), an embedding width of one channel
(the community code's ``reduc_ratio // reduc_ratio``), and the output BatchNorm initialised
to zero so that a freshly inserted block is the identity.
"""
from __future__ import annotations

import torch
from torch import nn


class NonLocalBlock(nn.Module):
    def __init__(self, channels: int, inter_channels: int = 1):
        super().__init__()
        self.inter_channels = inter_channels
        self.g = nn.Conv2d(channels, inter_channels, 1)
        self.theta = nn.Conv2d(channels, inter_channels, 1)
        self.phi = nn.Conv2d(channels, inter_channels, 1)
        self.W = nn.Sequential(nn.Conv2d(inter_channels, channels, 1), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.W[1].weight)  # the block starts as the identity (AGW)
        nn.init.zeros_(self.W[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        g = self.g(x).flatten(2).transpose(1, 2)            # (B, n, c')
        theta = self.theta(x).flatten(2).transpose(1, 2)    # (B, n, c')
        phi = self.phi(x).flatten(2)                        # (B, c', n)
        affinity = theta @ phi / (h * w)                    # (B, n, n), divided by n
        y = (affinity @ g).transpose(1, 2).reshape(b, self.inter_channels, h, w)
        return x + self.W(y)


def non_local_positions(num_blocks: int, count: int):
    """Indices of the blocks of a stage that are followed by a non-local block: the last
    ``count`` (AGW: the last 2 of ``layer2``, the last 3 of ``layer3``); a stage with fewer
    blocks gets one after each of its blocks."""
    count = min(count, num_blocks)
    return list(range(num_blocks - count, num_blocks))
