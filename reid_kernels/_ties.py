"""Exact ties that no thread count, blocking or CPU can break: identical rows and a stable top-k.

A blocked, threaded matrix product does not give two identical rows bit-identical results: the
copies land in different tiles (edge kernels, another thread's partition, another call when the
caller blocks), so their distances can differ in the last bit, and a tie rule ("equal values by
index") then sees no tie. Re-ranking and search with a gallery of duplicate images would depend on
the thread count and the CPU. The cure used here is structural: the distinct rows are found first
(:func:`identical_rows`), every product is computed on distinct rows only, and the copies get the
one computed value by a gather -- identical bits by construction, whatever the product's order.
Values of *different* rows still carry the product's rounding (~1e-7 relative in float32), which
depends on the blocking and the CPU; their order can only change where they are that close.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

_HASH_ROWS = 1 << 14  # rows hashed per chunk: bounds the (rows x D) int64 temporary


class RowGroups(NamedTuple):
    """Identical rows of a matrix ``x``: ``x == x[first][inverse]`` elementwise (bit patterns)."""

    first: torch.Tensor
    """(G,) index of each distinct row's first occurrence, ascending (so the distinct rows keep
    the order of their first copies, and ties by distinct position are ties by lowest index)."""
    inverse: torch.Tensor
    """(N,) the distinct row (0..G-1) of every row."""
    counts: torch.Tensor
    """(G,) how many rows each distinct row stands for."""


def _bit_patterns(x: torch.Tensor) -> torch.Tensor:
    """The rows' bit patterns as int64 words: 8 bytes at a time when a row's bytes allow it (the
    hash then has half or a quarter of the multiplications), one element per word otherwise.
    -0.0 and 0.0 count as different: a missed merge only costs the guarantee for those rows."""
    x = x.contiguous()
    per_word = max(1, 8 // x.element_size())
    if x.shape[1] % per_word == 0 and x.storage_offset() % per_word == 0:  # (a view of int64 words)
        return x.view(torch.int64)
    return x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]).long()


def identical_rows(x: torch.Tensor) -> Optional[RowGroups]:
    """The groups of bit-identical rows of a 2-D ``x``, or ``None`` when all rows are distinct.

    A hash of each row's bits (a random linear form modulo 2^64, so O(N D)) proposes the groups;
    every row is then compared with its group's first row, and a hash collision (never seen in
    practice) falls back to an exact lexicographic ``torch.unique``.
    """
    n = x.shape[0]
    if n < 2:
        return None
    bits = _bit_patterns(x)
    weights = _hash_weights(bits.shape[1]).to(x.device)
    # integer arithmetic (wrapping): exact, so copies hash alike whatever the order of the sum
    hashes = torch.cat([(bits[s : s + _HASH_ROWS] * weights).sum(1) for s in range(0, n, _HASH_ROWS)])
    _, inverse = torch.unique(hashes, return_inverse=True)
    groups = _first_occurrence_groups(inverse, n)
    if groups is None:
        return None
    source = groups.first[groups.inverse]
    chunks = range(0, n, _HASH_ROWS)
    if not all(bool((bits[s : s + _HASH_ROWS] == bits[source[s : s + _HASH_ROWS]]).all()) for s in chunks):
        # a collision: sort the rows themselves
        _, inverse = torch.unique(bits, dim=0, return_inverse=True)
        groups = _first_occurrence_groups(inverse, n)
    return groups


def _hash_weights(width: int) -> torch.Tensor:
    """Fixed odd random multipliers of the row hash (a fixed seed: the same groups on every run)."""
    gen = torch.Generator().manual_seed(0x5EED)
    return torch.randint(-(1 << 62), 1 << 62, (width,), generator=gen, dtype=torch.int64) | 1


def _first_occurrence_groups(inverse: torch.Tensor, n: int) -> Optional[RowGroups]:
    """Relabel group ids 0..G-1 in order of their first row; None when every group has one row."""
    num = int(inverse.max()) + 1
    if num == n:
        return None
    positions = torch.arange(n, device=inverse.device)
    first = torch.full((num,), n, dtype=torch.long, device=inverse.device)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    order = torch.argsort(first)
    relabel = torch.empty_like(order)
    relabel[order] = torch.arange(num, device=inverse.device)
    inverse = relabel[inverse]
    return RowGroups(first[order], inverse, torch.bincount(inverse, minlength=num))


def stable_smallest(key: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the positions of the k smallest keys in ascending order, equal keys by position --
    the first k of a stable argsort, without sorting the row. (torch.topk alone would keep an
    arbitrary one of the items tied at the k-th key, and order ties arbitrarily.)"""
    wide = min(k + 1, key.shape[1])
    vals, idx = torch.topk(key, wide, dim=1, largest=False, sorted=True)
    # Only rows whose (k+1)-th key equals the k-th (a tie across the k-th place) need a choice; redo those.
    rows = (vals[:, k] == vals[:, k - 1]).nonzero().squeeze(1) if wide > k else vals.new_zeros(0, dtype=torch.long)
    vals, idx = vals[:, :k], idx[:, :k]
    kth = vals[:, -1:]
    if rows.numel():
        sub, sub_kth = key[rows], kth[rows]
        room = k - (sub < sub_kth).sum(dim=1, keepdim=True)  # how many of the items tied at the k-th key fit
        tied = sub == sub_kth
        keep = (sub < sub_kth) | (tied & (tied.cumsum(dim=1) <= room))  # the lowest-position tied ones
        idx[rows] = torch.topk(torch.where(keep, sub, torch.full_like(sub, float("inf"))), k, dim=1,
                               largest=False).indices
    return order_by_key_then_index(key.gather(1, idx), idx)


def order_by_key_then_index(vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``idx`` reordered per row by (value, index): a stable sort by index, then by value."""
    by_index = torch.sort(idx, dim=1, stable=True)
    vals, idx = vals.gather(1, by_index.indices), by_index.values
    return idx.gather(1, torch.sort(vals, dim=1, stable=True).indices)


def expand_copies(key: torch.Tensor, distinct: torch.Tensor, groups: RowGroups,
                  k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k smallest items of each row by (key, index), from candidate distinct rows: ``key`` and
    ``distinct`` (rows, m) must include each row's best min(k, G) distinct rows by (key, first index).

    Each distinct row stands for its copies (ascending indices) at one key; the answer is the
    first k of all those candidates by (key, index). That is exact: the k best items are copies
    of at most k distinct rows, and among rows tied at one key, the lowest indices belong to the
    rows with the lowest first indices, which the ranking of distinct rows keeps.
    """
    dev = key.device
    counts = groups.counts.to(dev)[distinct]  # (rows, k_distinct)
    members = torch.argsort(groups.inverse.to(dev), stable=True)  # indices grouped by distinct row, ascending
    starts = (groups.counts.to(dev).cumsum(0) - groups.counts.to(dev))[distinct]
    width = int(counts.clamp_max(k).max())  # no more than k copies of one row can be needed
    offset = torch.arange(width, device=dev)
    take = offset < counts[..., None]  # (rows, k_distinct, width)
    where = (starts[..., None] + offset).clamp_max(members.numel() - 1)
    ids = torch.where(take, members[where], torch.full_like(where, members.numel())).flatten(1)
    keys = torch.where(take, key[..., None], torch.full_like(key[..., None], float("inf"))).flatten(1)
    by_index = torch.sort(ids, dim=1, stable=True)  # then by key, stably: (key, index) order
    keys, ids = keys.gather(1, by_index.indices), by_index.values
    by_key = torch.sort(keys, dim=1, stable=True)
    return by_key.values[:, :k], ids.gather(1, by_key.indices[:, :k])
