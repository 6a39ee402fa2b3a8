"""Ranking metrics of the VI-ReID community evaluation code (CMC, mAP, mINP), vectorised in torch.

The numbers reproduce the AGW cross-modal baseline's ``eval_sysu`` / ``eval_regdb``
(reused by LbA, MCE and others) without a Python loop per
query:

``protocol="sysu"``
    * same-location rule: for a query from camera 3, gallery images from camera 2
      are discarded (cam2 and cam3 film the same room);
    * CMC on the filtered ranking with repeated gallery identities collapsed to
      their first occurrence (the "author's released code" CMC of that lineage);
    * mAP and mINP on the full filtered ranking.
``protocol="regdb"``
    no camera filter, plain CMC (no collapsing); cameras are ignored.

In both, queries with no true match left in the (filtered) gallery are skipped and
every denominator is the number of valid queries, as in the community code.

Ties
    Gallery items at exactly the same distance are ranked by ascending gallery
    index (a stable sort), so results never depend on the sort algorithm. The
    community code uses ``np.argsort`` (introsort, not stable) and so orders ties
    arbitrarily; on tie-free distance matrices both give the same ranking. Ties are
    not rare: float32 cosine distances of ~3,000 gallery items tie somewhere in most
    rows, so exact agreement with that code is only defined (and tested) where no
    tie involves a true match -- e.g. with float64 distances.

Algorithm
    No per-row sort: a true match's rank is 1 + the number of kept gallery items
    closer than it, found by bucketing every distance among the (few) sorted match
    distances of its row (``searchsorted``) and counting; the collapsed SYSU rank is
    1 + the number of identities whose closest kept item is closer than the query
    identity's. Rows where a distance equals a match's distance, or with infinite
    distances, are re-ranked by an explicit stable sort. Queries are processed in
    blocks of ``block_elements`` (query x gallery) entries.

Exactness (tested in tests/test_metrics.py against a per-query numpy reference)
    ``cmc`` is ``count / num_valid`` in float64; cast to float32 it is bit-identical
    to the float32 array of the community code. Per-query AP and INP are the same
    float64 quotients; AP's inner sum runs in another order, so mAP agrees to about
    1e-15 relative, mINP exactly.

Differences from the community code, all where that code fails or misleads
    * ``cmc`` always has ``max_rank`` entries; ranks beyond the end of the ranking
      repeat the last value (the community code truncates to the gallery size, and
      the SYSU variant crashes when fewer than ``max_rank`` identities remain);
    * NaN distances, mismatched lengths, an empty gallery, or no valid query at all
      raise ``ValueError`` instead of producing a number.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import numpy as np
import torch

from ._validate import check_int

__all__ = ["RankingResult", "evaluate_ranking", "PROTOCOLS"]

PROTOCOLS = ("sysu", "regdb")

# SYSU-MM01 same-location rule: queries from this camera ignore gallery images of the other.
_SYSU_QUERY_CAM = 3
_SYSU_DISCARDED_GALLERY_CAM = 2

# Elements per (query chunk x gallery) block: bounds the working memory (~10 int64/bool
# matrices of this size) independently of the number of queries.
_DEFAULT_BLOCK_ELEMENTS = 1 << 22

ArrayLike = Union[np.ndarray, torch.Tensor, list, tuple]


class RankingResult(NamedTuple):
    """Result of :func:`evaluate_ranking`. All rates are fractions in [0, 1]."""

    cmc: np.ndarray
    """float64 array of length ``max_rank``: ``cmc[k]`` = fraction of valid queries matched within rank k+1."""
    mAP: float
    mINP: float
    num_valid: int
    """Queries with at least one true match in the (filtered) gallery; the others are skipped."""
    num_queries: int

    def rank(self, k: int) -> float:
        """CMC at rank ``k`` (1-based), e.g. ``result.rank(1)`` is Rank-1."""
        k = check_int("k", k, 1, len(self.cmc))  # at most max_rank
        return float(self.cmc[k - 1])

    def __str__(self) -> str:
        ranks = [k for k in (1, 5, 10, 20) if k <= len(self.cmc)]
        parts = [f"R{k} {100 * self.rank(k):.2f}" for k in ranks]
        parts += [f"mAP {100 * self.mAP:.2f}", f"mINP {100 * self.mINP:.2f}"]
        return " | ".join(parts) + f"  ({self.num_valid}/{self.num_queries} valid queries)"


def _as_tensor(name: str, value, device: Optional[torch.device]) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    elif isinstance(value, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(value))
    elif isinstance(value, (list, tuple)):
        tensor = torch.as_tensor(np.asarray(value))
    else:
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(value).__name__}")
    return tensor if device is None else tensor.to(device)


def _as_distances(distmat, device: Optional[torch.device]) -> torch.Tensor:
    dist = _as_tensor("distmat", distmat, device)
    if dist.dim() != 2:
        raise ValueError(f"distmat: expected a 2-D (num_query, num_gallery) matrix, got shape {tuple(dist.shape)}")
    if dist.dtype == torch.bool or dist.is_complex():
        raise TypeError(f"distmat: expected real distances, got dtype {dist.dtype}")
    if dist.shape[0] == 0:
        raise ValueError(f"distmat: expected at least one query, got shape {tuple(dist.shape)}")
    if dist.shape[1] == 0:
        raise ValueError(f"distmat: the gallery is empty (shape {tuple(dist.shape)})")
    if not dist.is_floating_point():
        dist = dist.to(torch.float64)
    elif dist.dtype in (torch.float16, torch.bfloat16):
        dist = dist.float()
    nan_count = int(torch.isnan(dist).sum())
    if nan_count:
        raise ValueError(f"distmat: expected no NaN distances, got {nan_count} NaN entries")
    return dist


def _as_labels(name: str, value, length: int, length_of: str, device: torch.device) -> torch.Tensor:
    labels = _as_tensor(name, value, device)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name}: expected integer labels, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.numel() != length:
        raise ValueError(f"{name}: expected shape ({length},) (one per {length_of}), got {tuple(labels.shape)}")
    return labels.to(torch.int64)


def _check_max_rank(max_rank) -> int:
    return check_int("max_rank", max_rank, 1)


def evaluate_ranking(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: Optional[ArrayLike] = None,
    g_camids: Optional[ArrayLike] = None,
    max_rank: int = 20,
    protocol: str = "sysu",
    *,
    device: Optional[Union[str, torch.device]] = None,
    block_elements: int = _DEFAULT_BLOCK_ELEMENTS,
) -> RankingResult:
    """CMC, mAP and mINP of a query-gallery distance matrix (smaller = more similar).

    Args:
        distmat: (num_query, num_gallery) distances, numpy array or torch tensor
            (CPU or CUDA). Computation runs where the tensor lives, or on ``device``.
        q_pids, g_pids: integer person ids of queries / gallery items.
        q_camids, g_camids: integer camera ids (SYSU-MM01 numbering 1..6); required
            for ``protocol="sysu"``, ignored for ``"regdb"``.
        max_rank: length of the returned CMC curve.
        protocol: ``"sysu"`` or ``"regdb"`` (see the module docstring).
        device: optional device to compute on (e.g. ``"cuda"`` for numpy inputs).
        block_elements: queries are processed in blocks of about this many
            (query x gallery) elements, bounding memory use.

    Returns:
        :class:`RankingResult` ``(cmc, mAP, mINP, num_valid, num_queries)``.

    Raises:
        ValueError / TypeError naming the argument on bad input (NaN distances,
        length mismatches, empty gallery, no query with a match in the gallery).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
    max_rank = _check_max_rank(max_rank)
    block_elements = check_int("block_elements", block_elements, 1)
    dist = _as_distances(distmat, None if device is None else torch.device(device))
    num_q, num_g = dist.shape
    dev = dist.device
    q_pid = _as_labels("q_pids", q_pids, num_q, "query (distmat row)", dev)
    g_pid = _as_labels("g_pids", g_pids, num_g, "gallery item (distmat column)", dev)
    sysu = protocol == "sysu"
    if sysu:
        if q_camids is None or g_camids is None:
            raise ValueError("q_camids/g_camids: required for protocol='sysu' (the same-location camera rule)")
        q_cam = _as_labels("q_camids", q_camids, num_q, "query (distmat row)", dev)
        g_cam = _as_labels("g_camids", g_camids, num_g, "gallery item (distmat column)", dev)

    # Dense identity codes: gallery identities 0..U-1; a query whose identity is not in
    # the gallery gets -1, matches nothing and is skipped as in the community code.
    gallery_ids, g_code = torch.unique(g_pid, sorted=True, return_inverse=True)
    pos = torch.searchsorted(gallery_ids, q_pid).clamp_max(gallery_ids.numel() - 1)
    q_code = torch.where(gallery_ids[pos] == q_pid, pos, torch.full_like(pos, -1))

    infinite = torch.isinf(dist)
    has_inf = infinite.any(1) if bool(infinite.any()) else None
    del infinite
    rows = max(1, min(num_q, block_elements // num_g))
    num_ids = gallery_ids.numel()
    cmc_rank, ap, inp = [], [], []
    for start in range(0, num_q, rows):
        block = slice(start, min(num_q, start + rows))
        d_b, q_b = dist[block], q_code[block]
        g_cam_b = g_cam if sysu else None
        discard_cam2 = (q_cam[block] == _SYSU_QUERY_CAM) if sysu else None
        inf_rows = has_inf[block] if has_inf is not None else torch.zeros(d_b.shape[0], dtype=torch.bool, device=dev)
        r, a, i, tied = _rank_block_counting(d_b, q_b, g_code, g_cam_b, discard_cam2, num_ids, sysu, inf_rows)
        if bool(tied.any()):
            # rows where a distance ties with a true match's: rank them by an explicit stable sort
            t = tied.nonzero().squeeze(1)
            r[t], a[t], i[t] = _rank_block(d_b[t], q_b[t], g_code, g_cam_b,
                                           None if discard_cam2 is None else discard_cam2[t], num_ids, sysu)
        cmc_rank.append(r)
        ap.append(a)
        inp.append(i)
    cmc_rank = torch.cat(cmc_rank).cpu().numpy()
    ap = torch.cat(ap).cpu().numpy()
    inp = torch.cat(inp).cpu().numpy()

    valid = cmc_rank > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(
            "q_pids: no query has a true match in the gallery"
            + (" after the SYSU same-location filter" if sysu else "")
            + "; check that query and gallery ids use the same numbering"
        )
    counts = np.bincount(np.minimum(cmc_rank[valid], max_rank + 1), minlength=max_rank + 2)
    cmc = np.cumsum(counts[1 : max_rank + 1]) / num_valid
    # np.mean over the per-query array in query order, like the community code.
    return RankingResult(
        cmc=cmc.astype(np.float64),
        mAP=float(np.mean(ap[valid])),
        mINP=float(np.mean(inp[valid])),
        num_valid=num_valid,
        num_queries=num_q,
    )


def _rank_block_counting(dist, q_code, g_code, g_cam, discard_cam2, num_ids, collapse, row_has_inf):
    """Per-query (cmc rank, AP, INP, tied) without sorting the gallery.

    The rank of a true match is 1 + the number of kept gallery items with a smaller
    distance: the true matches' distances are sorted (few per query), every gallery
    distance is bucketed among them with ``searchsorted`` and the buckets are counted.
    The collapsed SYSU CMC rank is 1 + the number of identities whose closest kept item
    is closer than the query identity's. This equals the stable-sort ranking whenever
    no gallery distance equals a true match's distance; rows where one does (or with
    infinite distances) are flagged ``tied`` and re-done by :func:`_rank_block`.
    """
    rows, num_g = dist.shape
    dev = dist.device
    relevant = g_code[None, :] == q_code[:, None]
    if discard_cam2 is not None:
        keep = ~(discard_cam2[:, None] & (g_cam == _SYSU_DISCARDED_GALLERY_CAM)[None, :])
        relevant &= keep
    else:
        keep = None
    num_rel = relevant.sum(1)
    valid = num_rel > 0
    width = max(1, int(num_rel.max()))
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dev)
    # ascending distances of each query's true matches, padded with +inf
    match_dist = torch.topk(torch.where(relevant, dist, inf), width, dim=1, largest=False, sorted=True).values
    # bucket[g] = number of matches at distance <= d_g; item g is strictly closer than the
    # (r+1)-th match iff bucket[g] <= r
    bucket = torch.searchsorted(match_dist, dist, right=True, out_int32=True)
    # A kept item at exactly a match's distance (besides the match itself), two matches at one
    # distance, or an infinite distance: ties, left to the sorting path.
    at_match = (bucket > 0) & (match_dist.gather(1, (bucket.long() - 1).clamp_min(0)) == dist)
    if keep is not None:
        at_match &= keep
    padded = torch.arange(width, device=dev)[None, :] >= num_rel[:, None]
    repeated = _matches_share_a_distance(match_dist, padded)
    tied = valid & ((at_match.sum(1) > num_rel) | repeated | row_has_inf)

    # histogram of buckets over kept items (discarded ones go to an extra bin), per row
    bins = width + 2
    flat = bucket.long()
    if keep is not None:
        flat = torch.where(keep, flat, torch.full_like(flat, width + 1))
    flat += (torch.arange(rows, device=dev) * bins)[:, None]
    hist = torch.bincount(flat.view(-1), minlength=rows * bins).view(rows, bins)
    closer = hist.cumsum(1)[:, :width]
    position = (closer + 1).double()  # 1-based rank of each match in the filtered ranking
    hits = torch.arange(1, width + 1, device=dev, dtype=torch.float64)[None, :]
    precision = torch.where(padded, torch.zeros_like(position), hits / position)
    ap = precision.sum(1) / num_rel.clamp_min(1).double()
    last = position.gather(1, (num_rel - 1).clamp_min(0)[:, None]).squeeze(1)
    inp = num_rel.double() / last

    if collapse:
        kept_dist = dist if keep is None else torch.where(keep, dist, inf)
        closest = torch.full((rows, num_ids), float("inf"), dtype=dist.dtype, device=dev)
        closest.scatter_reduce_(1, g_code[None, :].expand(rows, num_g), kept_dist, reduce="amin",
                                include_self=True)
        cmc_rank = (closest < match_dist[:, :1]).sum(1) + 1
    else:
        cmc_rank = closer[:, 0] + 1
    cmc_rank = torch.where(valid, cmc_rank, torch.zeros_like(cmc_rank))
    return cmc_rank, ap, inp, tied


def _matches_share_a_distance(match_dist: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
    """Rows where two true matches have one distance: counting would give both the rank of the
    first (``searchsorted`` puts them in one bucket), the stable sort ranks the second after it."""
    return ((match_dist[:, 1:] == match_dist[:, :-1]) & ~padded[:, 1:]).any(1)


def _rank_block(dist, q_code, g_code, g_cam, discard_cam2, num_ids, collapse):
    """Per-query (cmc rank, AP, INP) for one block of queries by a stable sort; cmc rank 0 = invalid."""
    big = dist.shape[1] + 1
    # Stable sort: ties are ranked by ascending gallery index (documented order).
    order = torch.sort(dist, dim=1, stable=True).indices
    codes = g_code[order]
    relevant = codes == q_code[:, None]
    if discard_cam2 is not None:
        keep = ~(discard_cam2[:, None] & (g_cam[order] == _SYSU_DISCARDED_GALLERY_CAM))
        relevant &= keep
        rank = keep.cumsum(1)  # 1-based rank in the filtered ranking (where keep)
    else:
        keep = None
        rank = torch.arange(1, dist.shape[1] + 1, device=dist.device).expand_as(order)

    num_rel = relevant.sum(1)
    valid = num_rel > 0
    hits = relevant.cumsum(1)
    precision = hits.double() / rank.clamp_min(1).double()
    ap = torch.where(relevant, precision, torch.zeros_like(precision)).sum(1) / num_rel.clamp_min(1).double()
    last_rank = torch.where(relevant, rank, torch.zeros_like(rank)).amax(1)
    inp = num_rel.double() / last_rank.clamp_min(1).double()

    rel_rank = torch.where(relevant, rank, torch.full_like(rank, big))
    first_hit = rel_rank.amin(1)
    if collapse:
        # Rank among identities ordered by first (kept) occurrence: 1 + the number of
        # identities whose first kept occurrence precedes the query identity's.
        kept_rank = rank if keep is None else torch.where(keep, rank, torch.full_like(rank, big))
        first_seen = torch.full((dist.shape[0], num_ids), big, dtype=rank.dtype, device=dist.device)
        first_seen.scatter_reduce_(1, codes, kept_rank, reduce="amin", include_self=True)
        cmc_rank = (first_seen < first_hit[:, None]).sum(1) + 1
    else:
        cmc_rank = first_hit
    cmc_rank = torch.where(valid, cmc_rank, torch.zeros_like(cmc_rank))
    return cmc_rank, ap, inp
