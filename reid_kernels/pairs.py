"""Anchor/positive/negative pairing of an LbA batch: Learning by Aligning (ICCV 2021) and its released code."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._validate import check_choice, check_generator, check_int

NEGATIVE_DRAWS = ("independent", "lba-code")


def lba_pairs(
    num_ids: int,
    num_pos: int,
    generator: Optional[torch.Generator] = None,
    *,
    negative_draw: str = "independent",
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
      replacement only when ``num_ids - 1 < num_pos``), and an image of each,
      chosen by ``negative_draw``:

      ``"independent"`` (default) -- each anchor's negative image is drawn
        uniformly from its identity's ``num_pos`` images, independently (with
        replacement: two anchors may get the same image position);
      ``"lba-code"`` -- the released LbA code's draw: the anchors of an identity
        take a random permutation of the ``num_pos`` image positions
        (``random.sample(range(num_pos), num_pos)`` there), so their negatives
        sit at distinct positions within their blocks. The LbA training recipe
        uses this one.

    Returns ``(pos_idx, neg_idx)``, int64 tensors of length ``B`` (on the CPU).
    The draws come from ``generator`` (a CPU ``torch.Generator``) when given, so
    a seeded generator reproduces them. Cost: O(B * num_pos) work in a fixed
    number of tensor operations (independent of ``num_ids``).
    """
    num_ids = check_int("num_ids", num_ids, 2)
    num_pos = check_int("num_pos", num_pos, 1)
    generator = check_generator("generator", generator)
    check_choice("negative_draw", negative_draw, NEGATIVE_DRAWS)
    half = num_ids * num_pos
    # One row per anchor block: (anchor half, identity); rows 0..num_ids-1 are the visible anchors.
    blocks = 2 * num_ids
    identity = torch.arange(num_ids).repeat(2)  # (blocks,)
    other_half = torch.tensor([half, 0]).repeat_interleave(num_ids)  # where the partners live

    own_images = _row_permutations(blocks, num_pos, generator)
    pos = other_half[:, None] + identity[:, None] * num_pos + own_images

    neg_identity = _other_identities(identity, num_ids, num_pos, generator)
    if negative_draw == "lba-code":
        neg_images = _row_permutations(blocks, num_pos, generator)
    else:
        neg_images = torch.randint(num_pos, (blocks, num_pos), generator=generator)
    neg = other_half[:, None] + neg_identity * num_pos + neg_images
    return pos.reshape(-1), neg.reshape(-1)


def _row_permutations(rows: int, width: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``rows`` independent uniform permutations of ``range(width)`` (argsort of i.i.d. uniforms)."""
    return torch.rand(rows, width, generator=generator, dtype=torch.float64).argsort(dim=1)


def _uniform_below(bound: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One uniform integer in ``[0, bound_r)`` per entry of ``bound`` (int64, every bound >= 1)."""
    draw = torch.rand(bound.shape, generator=generator, dtype=torch.float64)
    return torch.minimum((draw * bound).long(), bound - 1)  # the min guards a draw rounding up to bound


def _other_identities(identity: torch.Tensor, num_ids: int, count: int,
                      generator: Optional[torch.Generator]) -> torch.Tensor:
    """For each row's ``identity``, ``count`` identities != it: a uniformly random ordered draw
    without replacement from the other ``num_ids - 1`` when there are enough, with replacement
    otherwise.  (rows, count) int64.

    Without replacement, draw t is uniform over the ``num_ids - 1 - t`` identities not yet
    excluded (the row's own and the t already drawn): draw a rank r below that count and map it
    to the r-th identity not excluded by stepping over the excluded ones in increasing order.
    O(rows * count^2) work, never O(num_ids) per row.
    """
    rows = identity.shape[0]
    if num_ids - 1 < count:  # too few other identities: with replacement
        rank = _uniform_below(torch.full((rows, count), num_ids - 1), generator)
        return rank + (rank >= identity[:, None]).long()
    excluded = identity[:, None].clone()  # (rows, 1 + t), kept sorted per row
    drawn = []
    for t in range(count):
        choice = _uniform_below(torch.full((rows,), num_ids - 1 - t), generator)
        for column in range(excluded.shape[1]):  # ascending: each step over an excluded id shifts by one
            choice = choice + (choice >= excluded[:, column]).long()
        drawn.append(choice)
        excluded = torch.cat([excluded, choice[:, None]], dim=1).sort(dim=1).values
    return torch.stack(drawn, dim=1)
