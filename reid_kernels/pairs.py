"""Anchor/positive/negative pairing of an LbA batch (the released code of Learning by Aligning, ICCV 2021)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._validate import check_int


def lba_pairs(
    num_ids: int, num_pos: int, generator: Optional[torch.Generator] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative partner indices for a batch laid out as LbA lays it out.

    The batch has ``B = 2 * num_ids * num_pos`` images: the visible half first,
    then the infrared half, each identity-major (``num_pos`` images of identity
    0, then of identity 1, ...), with the same identity order in both halves.

    Every anchor gets, in the *other* modality,

    * a positive of its own identity: the ``num_pos`` anchors of an identity
      take a random permutation of that identity's ``num_pos`` images, so every
      positive is a different image;
    * a negative of another identity: the ``num_pos`` anchors of an identity
      draw distinct identities among the other ``num_ids - 1`` (with
      replacement only when ``num_ids - 1 < num_pos``), and a random image of
      each.

    Returns ``(pos_idx, neg_idx)``, int64 tensors of length ``B`` (on the CPU).
    The draws come from ``generator`` when given, so a seeded generator
    reproduces them.
    """
    check_int("num_ids", num_ids, 2)
    check_int("num_pos", num_pos, 1)
    half = num_ids * num_pos
    pos = torch.empty(2 * half, dtype=torch.long)
    neg = torch.empty(2 * half, dtype=torch.long)
    for anchor_half, other_half in ((0, half), (half, 0)):
        for identity in range(num_ids):
            first = anchor_half + identity * num_pos
            anchors = slice(first, first + num_pos)
            own_block = other_half + identity * num_pos
            pos[anchors] = own_block + torch.randperm(num_pos, generator=generator)

            others = torch.tensor([i for i in range(num_ids) if i != identity], dtype=torch.long)
            if others.numel() >= num_pos:
                chosen = others[torch.randperm(others.numel(), generator=generator)[:num_pos]]
            else:
                chosen = others[torch.randint(others.numel(), (num_pos,), generator=generator)]
            image = torch.randint(num_pos, (num_pos,), generator=generator)
            neg[anchors] = other_half + chosen * num_pos + image
    return pos, neg
