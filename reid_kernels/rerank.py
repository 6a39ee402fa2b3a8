"""Re-ranking post-processes: k-reciprocal re-ranking (Zhong et al., CVPR 2017) and SAAI's AIM.

k-reciprocal re-ranking
    :func:`k_reciprocal_rerank` -- the algorithm every ReID toolkit ships (k1=20, k2=6,
    lambda=0.3), computed from a k-nearest-neighbour graph: memory O(N * k) plus one
    (query block x gallery) tile, so it runs far beyond the N^2 limit of the usual
    code. The graph is an exact torch top-k over tiles (``knn="torch"``, CPU or CUDA) or
    an exact FAISS flat index (``"faiss"``, CPU). Both need one N^2 D pass (the row
    maxima of the distance normalisation are part of the algorithm), so 50k+ items
    want a GPU. (An HNSW graph was tried: its maximum-inner-product row maxima were
    too inaccurate -- errors up to 0.26 in the final distance at 5k items -- so it is not
    offered.)
    :func:`k_reciprocal_rerank_dense` -- the classic dense algorithm written plainly
    (N x N matrices, a loop per item); the oracle of the tests, fine for small sets.

    Conventions (the toolkit version): the original distance of all N = Nq + Ng items
    is the squared Euclidean distance of the features, each row divided by its maximum;
    k-reciprocal sets use the first k1+1 neighbours (the item itself included), their
    expansion the first round(k1/2)+1 with the 2/3 overlap rule; weights exp(-d)
    normalised per row; query expansion averages the rows of the first k2 neighbours
    (skipped when k2 == 1); final = (1-lambda) * Jaccard + lambda * original, for the
    query rows and gallery columns. V is kept in float32 (the first public version; some
    toolkits store it in float16 to save memory). Neighbours are ranked by the normalised
    distance, equal values by index (a stable argsort; the public code's default argsort
    leaves their order unspecified), in both implementations -- including which of the
    items tied at the k-th place are kept. Both agree with a transcription of the public
    ``re_ranking`` to float32 rounding (tests/test_rerank.py), for any k1, k2.

    Duplicates (the same image twice in the gallery, or a query also in the gallery): both
    versions compute the distances on the distinct rows only and give every copy the computed
    values (reid_kernels._ties), so copies tie exactly -- not merely to the last bit of a blocked,
    threaded product -- and the neighbour ranking, hence every set the algorithm builds, is the
    same for every thread count, block size and CPU. What still depends on them is the float32
    rounding of the values (~1e-7), and with it the order of two *different* items closer than that.

AIM (SAAI: Visible-Infrared Person Re-Identification via Semantic Alignment and Affinity
    Inference, ICCV 2023; eqs. 6-10), :func:`aim`
    A_qg, A_gg cosine similarities of the L2-normalised features; eq. 6 keeps, in each
    row, the entries >= the row's k1-th largest value (ties kept, as the released code
    does); eq. 7 averages the rows of the k2 most similar gallery items (the item itself
    first). Two forms:

    ``form="code"`` (default: the released code, which produced the published numbers)
        d = -A_qg - rn(Â_qg) rn(Ã_gg)^T, rn = row L2-normalisation;
    ``form="paper"`` (eqs. 8-10 as printed)
        d = (1 - A_qg) - Â_qg Ã_gg.

    ``method="dense"`` builds the Ng x Ng matrix; ``method="knn"`` keeps only each gallery
    row's top-k1 (a kNN graph; O(Ng * k1 * k2) memory; exactly k1 entries per row, so it
    can differ from the dense form only when a row has ties at its k1-th value);
    ``"auto"`` picks dense up to 8,192 gallery items.
    :func:`aim_parameters` gives the per-protocol k1/k2.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ._ties import RowGroups, expand_copies, identical_rows, order_by_key_then_index, stable_smallest
from ._validate import check_float_in, check_int
from .retrieval import exact_search

__all__ = ["aim", "aim_parameters", "k_reciprocal_rerank", "k_reciprocal_rerank_dense", "AIM_PARAMETERS"]

# (k1, k2) per setting. "paper": SAAI (ICCV 2023), implementation details ("SYSU single-shot 4/1, multi-shot 20/6, RegDB 8/2").
# "code": the released SAAI configuration (indoor single-shot 2/2 is only there).
AIM_PARAMETERS = {
    "paper": {("sysu", "all", "single"): (4, 1), ("sysu", "indoor", "single"): (4, 1),
              ("sysu", "all", "multi"): (20, 6), ("sysu", "indoor", "multi"): (20, 6), ("regdb",): (8, 2)},
    "code": {("sysu", "all", "single"): (4, 1), ("sysu", "indoor", "single"): (2, 2),
             ("sysu", "all", "multi"): (20, 6), ("sysu", "indoor", "multi"): (20, 6), ("regdb",): (8, 2)},
}
_AIM_DENSE_MAX_GALLERY = 8192


def aim_parameters(dataset: str, mode: Optional[str] = None, shot: Optional[str] = None,
                   source: str = "code") -> Tuple[int, int]:
    """(k1, k2) of AIM for a protocol setting: ``("sysu", "all"|"indoor", "single"|"multi")`` or ``("regdb",)``.

    ``source="code"`` (default) -- the released configuration that produced the
    published numbers; ``source="paper"`` -- the values printed in the paper.
    """
    if source not in AIM_PARAMETERS:
        raise ValueError(f"source: expected one of {tuple(AIM_PARAMETERS)}, got {source!r}")
    key = ("regdb",) if dataset == "regdb" else (dataset, mode, shot)
    table = AIM_PARAMETERS[source]
    if key not in table:
        raise ValueError(f"dataset/mode/shot: expected 'regdb' or ('sysu', 'all'|'indoor', 'single'|'multi'), "
                         f"got {key}")
    return table[key]


def _features(name: str, value, dim: Optional[int] = None) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch tensor or numpy array, got {type(value).__name__}")
    value = value.detach()
    if value.dim() != 2 or value.shape[0] == 0 or value.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty (N, D) feature matrix, got shape {tuple(value.shape)}")
    if dim is not None and value.shape[1] != dim:
        raise ValueError(f"{name}: expected {dim} columns (like the queries), got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected floating-point features, got dtype {value.dtype}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name}: expected finite features, got NaN/inf entries")
    if value.dtype in (torch.float16, torch.bfloat16):
        value = value.float()
    return value


def _positive_int(name: str, value) -> int:
    return check_int(name, value, 1)


# ======================================================================================
# AIM
# ======================================================================================
def _keep_top(similarity: torch.Tensor, k1: int) -> torch.Tensor:
    """Eq. 6: zero every entry below its row's k1-th largest value (ties at the threshold kept)."""
    threshold = similarity.topk(k1, dim=1).values[:, -1:]
    return torch.where(similarity >= threshold, similarity, torch.zeros_like(similarity))


@torch.no_grad()
def aim(qf, gf, k1: int = 4, k2: int = 1, *, form: str = "code", method: str = "auto",
        query_block: int = 4096) -> torch.Tensor:
    """SAAI's affinity inference: a (Nq, Ng) distance matrix (smaller = more similar).

    ``qf`` (Nq, D) and ``gf`` (Ng, D) are L2-normalised inside. ``k1`` is clamped to
    Ng; ``k2`` must not exceed ``k1``. Computed on the device of ``qf``.

    Duplicates: identical gallery rows get bit-identical similarities, so they tie exactly at
    eq. 6's threshold (both kept) and in eq. 7's ranking (equal similarities by lowest index),
    for every query block, thread count and CPU; the products are computed on the distinct
    gallery rows and gathered, so with ``method="dense"`` (and ``"knn"`` in the code form) their
    columns of the result are bit-identical too. Other values carry the products' float
    rounding (which depends on the blocking and the CPU).
    """
    if form not in ("code", "paper"):
        raise ValueError(f"form: expected 'code' (released code) or 'paper' (eqs. 8-10), got {form!r}")
    if method not in ("auto", "dense", "knn"):
        raise ValueError(f"method: expected 'auto', 'dense' or 'knn', got {method!r}")
    q = F.normalize(_features("qf", qf), dim=1)
    g_raw = _features("gf", gf, q.shape[1]).to(device=q.device, dtype=q.dtype)
    g_raw_distinct, groups = _distinct(g_raw)
    gu = F.normalize(g_raw_distinct, dim=1)  # distinct rows normalised once: copies get equal bits
    num_g = g_raw.shape[0]
    k1 = min(_positive_int("k1", k1), num_g)
    k2 = _positive_int("k2", k2)
    query_block = _positive_int("query_block", query_block)
    if k2 > k1:
        raise ValueError(f"k2: expected k2 <= k1 = {k1} (neighbours come from the top-k1 ranking), got {k2}")
    if method == "auto":
        method = "dense" if num_g <= _AIM_DENSE_MAX_GALLERY else "knn"

    # Ã_gg (eq. 7), for the distinct gallery rows (dense) or all rows (sparse COO, k2 neighbours averaged).
    if method == "dense":
        a_gg = _spread(gu @ gu.T, groups, 1)  # (distinct, Ng)
        neighbours = stable_smallest(-a_gg, k2)  # the k2 most similar, equal values by index
        rows = neighbours if groups is None else groups.inverse[neighbours]
        expanded = _keep_top(a_gg, k1)[rows].mean(dim=1)  # (distinct, Ng)
        if form == "code":  # amendment[i, j] = sum_l rn(Â_qg)[i, l] rn(Ã_gg)[j, l], j distinct
            right = F.normalize(expanded, dim=1).T
        else:  # amendment[i, j] = sum_l Â_qg[i, l] Ã_gg[l, j], j distinct
            right = _spread(expanded if groups is None else expanded[:, groups.first], groups, 0)
    else:
        expanded = _aim_expanded_sparse(_spread(gu, groups, 0), k1, k2)
        if form == "code":
            right = _row_normalise_sparse(expanded)
            if groups is not None:  # copies have equal rows of Ã (exact_search's duplicate rule)
                right = right.index_select(0, groups.first).coalesce()
        else:  # Ã's columns: copies can differ where one is cut at a row's k1-th place
            right = _transpose_sparse(expanded)
    right_is_distinct = groups is not None and (method == "dense" or form == "code")

    out = []
    for start in range(0, q.shape[0], query_block):
        a_qg = _spread(q[start : start + query_block] @ gu.T, groups, 1)
        sparse_qg = _keep_top(a_qg, k1)
        if form == "code":
            sparse_qg = F.normalize(sparse_qg, dim=1)
        if method == "dense":
            amendment = sparse_qg @ right
        else:
            amendment = torch.sparse.mm(right, sparse_qg.T).T
        if right_is_distinct:
            amendment = _spread(amendment, groups, 1)
        base = -a_qg if form == "code" else 1.0 - a_qg
        out.append(base - amendment)
    return torch.cat(out)


def _aim_expanded_sparse(g: torch.Tensor, k1: int, k2: int) -> torch.Tensor:
    """Ã_gg from the top-k1 kNN graph of the gallery: sparse COO (Ng, Ng), <= k1*k2 entries per row."""
    values, neighbours = exact_search(g, g, k1)  # each row: its k1 largest cosines, descending
    n = g.shape[0]
    # Row i of Ã = mean over l in neighbours[i, :k2] of Â row l (Â row l: values[l] at neighbours[l]).
    rows = torch.arange(n, device=g.device).repeat_interleave(k2 * k1)
    sources = neighbours[:, :k2].reshape(-1)  # l, per (i, position)
    cols = neighbours[sources].reshape(-1)
    vals = (values[sources] / k2).reshape(-1)
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, n), check_invariants=False).coalesce()


def _row_normalise_sparse(matrix: torch.Tensor) -> torch.Tensor:
    idx, val = matrix.indices(), matrix.values()
    norms = torch.zeros(matrix.shape[0], dtype=val.dtype, device=val.device).index_add_(0, idx[0], val * val)
    val = val / norms.sqrt().clamp_min(1e-12)[idx[0]]
    return torch.sparse_coo_tensor(idx, val, matrix.shape, check_invariants=False).coalesce()


def _transpose_sparse(matrix: torch.Tensor) -> torch.Tensor:
    idx = matrix.indices()
    return torch.sparse_coo_tensor(idx.flip(0), matrix.values(), matrix.shape[::-1], check_invariants=False).coalesce()


# ======================================================================================
# k-reciprocal re-ranking
# ======================================================================================
def _check_rerank_args(qf, gf, k1, k2, lambda_value):
    q = _features("qf", qf)
    g = _features("gf", gf, q.shape[1]).to(device=q.device, dtype=q.dtype)
    k1 = _positive_int("k1", k1)
    k2 = _positive_int("k2", k2)
    lambda_value = check_float_in("lambda_value", lambda_value, 0.0, 1.0)
    return q, g, k1, k2, lambda_value


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a_i - b_j|^2 by the matmul expansion (the toolkit formula), clamped at 0."""
    d = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return d.clamp_(min=0)


def _distinct(x: torch.Tensor) -> Tuple[torch.Tensor, Optional[RowGroups]]:
    """The distinct rows of ``x`` (all of ``x`` when there are no copies) and their groups."""
    groups = identical_rows(x)
    return (x, None) if groups is None else (x[groups.first], groups)


def _spread(d: torch.Tensor, groups: Optional[RowGroups], dim: int) -> torch.Tensor:
    """Values computed for distinct rows, given to every copy along ``dim`` (a gather: equal bits)."""
    return d if groups is None else d.index_select(dim, groups.inverse)


def _all_squared_distances(x: torch.Tensor) -> torch.Tensor:
    """The (N, N) squared distances, computed on the distinct rows in one product and gathered, so
    that copies of a row have bit-identical distances (exact ties) whatever the product's blocking."""
    distinct, groups = _distinct(x)
    return _spread(_spread(_squared_distances(distinct, distinct), groups, 0), groups, 1)


@torch.no_grad()
def k_reciprocal_rerank_dense(qf, gf, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    """Classic dense k-reciprocal re-ranking (plain loops, N x N memory). Returns (Nq, Ng) float32.

    The distances come from one product over the distinct rows, gathered for their copies (exact
    ties for duplicates, see the module docstring)."""
    q, g, k1, k2, lam = _check_rerank_args(qf, gf, k1, k2, lambda_value)
    x = torch.cat([q, g]).float()
    num_q, n = q.shape[0], x.shape[0]
    dist = _all_squared_distances(x).cpu().numpy()
    original = np.transpose(dist / np.max(dist, axis=0)).astype(np.float32)
    rank = np.argsort(original, axis=1, kind="stable")
    kk = min(k1 + 1, n)
    half = min(int(np.around(k1 / 2.0)) + 1, n)

    def reciprocal(i, width):
        forward = rank[i, :width]
        backward = rank[forward, :width]
        return forward[np.where(backward == i)[0]]

    V = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        k_rec = reciprocal(i, kk)
        expansion = k_rec
        for candidate in k_rec:
            cand_rec = reciprocal(candidate, half)
            if len(np.intersect1d(cand_rec, k_rec)) > 2.0 / 3 * len(cand_rec):
                expansion = np.append(expansion, cand_rec)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        V[i, expansion] = weight / np.sum(weight)
    if k2 != 1:
        V = np.stack([V[rank[i, :k2]].mean(axis=0) for i in range(n)]).astype(np.float32)
    # Jaccard through an inverted index (items with V[j, c] != 0 for each c), as the classic code
    inverted = [np.where(V[:, c] != 0)[0] for c in range(n)]
    jaccard = np.zeros((num_q, n), dtype=np.float32)
    for i in range(num_q):
        shared = np.zeros(n, dtype=np.float32)  # sum_c min(V[i, c], V[j, c]) for every j
        for c in np.where(V[i] != 0)[0]:
            shared[inverted[c]] += np.minimum(V[i, c], V[inverted[c], c])
        jaccard[i] = 1 - shared / (2.0 - shared)
    final = jaccard * (1 - lam) + original[:num_q] * lam
    return final[:, num_q:]


def _knn_and_row_max(distinct: torch.Tensor, groups: Optional[RowGroups], k: int,
                     block: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact k nearest (squared L2, ascending; equal distances by index) and each row's max distance.

    Computed in (block x N) tiles over the *distinct* rows of the N items (``distinct``, ``groups``
    from :func:`_distinct`; copies get the rows, hence the bits, of their distinct row, see
    reid_kernels._ties), so identical items tie exactly for every
    block size, thread count and CPU. Rows are ranked by the *normalised* distance d / max_row d,
    as the reference ranks its ``original_dist`` (a division can round two distances to one
    value); among items tied at the k-th place the lowest indices are kept, as a stable argsort does.
    """
    n = distinct.shape[0] if groups is None else groups.inverse.numel()
    k = min(k, n)
    ids_out, dist_out, max_out = [], [], []
    for start in range(0, distinct.shape[0], block):
        d = _spread(_squared_distances(distinct[start : start + block], distinct), groups, 1)
        row_max = d.max(dim=1).values
        max_out.append(row_max)
        order = stable_smallest(d / row_max.clamp_min(torch.finfo(d.dtype).tiny)[:, None], k)
        ids_out.append(order)
        dist_out.append(d.gather(1, order))
    return tuple(_spread(torch.cat(out), groups, 0) for out in (ids_out, dist_out, max_out))


def _reciprocal_mask(neighbours: torch.Tensor, width: int, block: int) -> torch.Tensor:
    """mask[i, p]: item i is among the first ``width`` neighbours of its p-th neighbour."""
    nbr = neighbours[:, :width]
    masks = []
    for start in range(0, nbr.shape[0], block):
        rows = torch.arange(start, min(start + block, nbr.shape[0]), device=nbr.device)
        back = nbr[nbr[rows]]  # (b, width, width)
        masks.append((back == rows[:, None, None]).any(dim=2))
    return torch.cat(masks)


@torch.no_grad()
def _knn_and_row_max_faiss(distinct: torch.Tensor, groups: Optional[RowGroups],
                           k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kNN graph and row maxima from exact FAISS flat indexes (CPU), over the distinct rows
    (so copies tie exactly, as in the torch path) and spread to their copies.

    Neighbours: ``IndexFlatL2``. Row maximum of |x_i - x_j|^2 = |x_i|^2 + max_j
    (|x_j|^2 - 2 x_i.x_j): a maximum-inner-product search of [-2 x_i, 1] against
    [x_j, |x_j|^2].
    """
    from .retrieval import import_faiss

    faiss = import_faiss()
    data = distinct.detach().cpu().float().contiguous().numpy()
    m, dim = data.shape
    n = m if groups is None else groups.inverse.numel()
    k = min(k, n)
    index = faiss.IndexFlatL2(dim)
    index.add(data)
    dist, idx = _faiss_search_past_ties(index, data, min(k, m))
    norms = (data.astype(np.float64) ** 2).sum(1)
    augmented = np.concatenate([data, norms[:, None].astype(np.float32)], axis=1)
    probe = np.concatenate([-2.0 * data, np.ones((m, 1), np.float32)], axis=1)
    far = faiss.IndexFlatIP(dim + 1)
    far.add(augmented)
    best, _ = far.search(probe, 1)
    row_max = torch.from_numpy((norms + best[:, 0]).astype(np.float32)).clamp_min(0)
    dist, idx = torch.from_numpy(dist), torch.from_numpy(idx).long()
    if groups is None:  # equal distances ordered by index, the lowest indices kept at the k-th place
        order = order_by_key_then_index(dist, idx)[:, :k]
    else:
        order = expand_copies(dist, idx, groups, k)[1]
    return _spread(order, groups, 0).to(distinct.device), _spread(row_max, groups, 0).to(distinct.device)


def _faiss_search_past_ties(index, data: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """A search for more than k neighbours, widened until every item tied with a row's k-th
    distance is among the results (so the lowest-index ones can be kept)."""
    n = data.shape[0]
    width = min(n, 2 * k)
    while True:
        dist, idx = index.search(data, width)
        if width == n or bool((dist[:, -1] > dist[:, k - 1]).all()):
            return dist, idx
        width = min(n, 2 * width)


KNN_BACKENDS = ("torch", "faiss")


@torch.no_grad()
def k_reciprocal_rerank(qf, gf, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, *,
                        knn: str = "torch", block: int = 2048) -> torch.Tensor:
    """k-reciprocal re-ranking from a kNN graph (memory O(N*k) + one block x N tile).

    ``knn`` builds the graph of the N = Nq + Ng items: ``"torch"`` (exact, tiled, CPU or
    CUDA) or ``"faiss"`` (exact flat FAISS indexes, CPU).

    Returns the (Nq, Ng) re-ranked distances (float32, on the device of ``qf``).
    Agrees with :func:`k_reciprocal_rerank_dense` to float32 tolerance (measured <= 3.4e-7),
    also when ``k2 > k1 + 1`` (the graph then keeps k2 neighbours for the query expansion) and
    with duplicated rows (copies have bit-identical distances by construction; ties at the k-th
    neighbour keep the lowest indices), at every ``block`` and thread count. With
    ``knn="faiss"`` distances come from FAISS's own arithmetic (on the distinct rows too), so
    near-ties between different items may rank differently.
    """
    q, g, k1, k2, lam = _check_rerank_args(qf, gf, k1, k2, lambda_value)
    block = _positive_int("block", block)
    if knn not in KNN_BACKENDS:
        raise ValueError(f"knn: expected one of {KNN_BACKENDS}, got {knn!r}")
    x = torch.cat([q, g]).float()
    num_q, n = q.shape[0], x.shape[0]
    dev = x.device
    kk = min(k1 + 1, n)
    half = min(int(np.around(k1 / 2.0)) + 1, n)

    # The query expansion averages the first k2 neighbours, which may be more than the k1 + 1 of
    # the reciprocal sets: the graph keeps max(k1 + 1, k2) neighbours, the sets use the first k1 + 1.
    width = min(max(kk, k2), n)
    distinct, groups = _distinct(x)
    if knn == "torch":
        neighbours, _, row_max = _knn_and_row_max(distinct, groups, width, block)
    else:
        neighbours, row_max = _knn_and_row_max_faiss(distinct, groups, width)
    row_max = row_max.clamp_min(torch.finfo(torch.float32).tiny)
    recip = _reciprocal_mask(neighbours, kk, block)  # (n, kk)
    recip_half = _reciprocal_mask(neighbours, half, block)  # (n, half)

    # Candidate expansion: for each k-reciprocal neighbour c of i, c's half-width reciprocal set
    # joins i's set when more than 2/3 of it already lies in i's k-reciprocal set.
    pair_rows, pair_cols = [], []
    for start in range(0, n, block):
        rows = torch.arange(start, min(start + block, n), device=dev)
        cand = neighbours[rows, :kk]  # (b, kk): c = own candidates (valid where recip)
        own = torch.where(recip[rows], cand, torch.full_like(cand, -1))  # (b, kk)
        cand_set = neighbours[cand][:, :, :half]  # (b, kk, half)
        cand_valid = recip_half[cand]  # (b, kk, half)
        inside = (cand_set[..., None] == own[:, None, None, :]).any(-1) & cand_valid
        size = cand_valid.sum(-1).double()
        accept = recip[rows] & (inside.sum(-1).double() > (2.0 / 3) * size)
        # members: own k-reciprocal neighbours, plus accepted candidates' sets
        r_own = rows[:, None].expand_as(own)[own >= 0]
        c_own = own[own >= 0]
        take = accept[..., None] & cand_valid
        r_cand = rows[:, None, None].expand_as(cand_set)[take]
        c_cand = cand_set[take]
        pair_rows += [r_own, r_cand]
        pair_cols += [c_own, c_cand]
    key = torch.unique(torch.cat(pair_rows) * n + torch.cat(pair_cols))  # sorted by (row, col)
    v_rows, v_cols = key // n, key % n
    # weights exp(-d(i, j) / max_i), normalised per row; d by the same expansion as the kNN pass,
    # over chunks of pairs so that no (pairs x D) matrix larger than a chunk exists
    sq_norms = (x * x).sum(1)
    chunk = max(1, (1 << 22) // x.shape[1])
    dots = torch.cat([(x[v_rows[s:s + chunk]] * x[v_cols[s:s + chunk]]).sum(1)
                      for s in range(0, v_rows.numel(), chunk)])
    d = (sq_norms[v_rows] + sq_norms[v_cols] - 2.0 * dots).clamp_(min=0)
    w = torch.exp(-(d / row_max[v_rows]))
    w = w / torch.zeros(n, device=dev).index_add_(0, v_rows, w)[v_rows]

    if k2 != 1:
        v_rows, v_cols, w = _query_expansion(v_rows, v_cols, w, neighbours[:, :k2], n)

    # CSC view of V for the Jaccard join: for a query's entry (c, v), the items j with V[j, c] != 0.
    col_order = torch.argsort(v_cols * n + v_rows)
    csc_rows, csc_cols, csc_vals = v_rows[col_order], v_cols[col_order], w[col_order]
    col_ptr = torch.zeros(n + 1, dtype=torch.long, device=dev)
    col_ptr[1:] = torch.bincount(csc_cols, minlength=n).cumsum(0)
    row_ptr = torch.zeros(n + 1, dtype=torch.long, device=dev)
    row_ptr[1:] = torch.bincount(v_rows, minlength=n).cumsum(0)

    out = []
    for start in range(0, num_q, block):
        stop = min(start + block, num_q)
        entries = torch.arange(int(row_ptr[start]), int(row_ptr[stop]), device=dev)
        e_rows, e_cols, e_vals = v_rows[entries], v_cols[entries], w[entries]
        lengths = col_ptr[e_cols + 1] - col_ptr[e_cols]
        owner = torch.repeat_interleave(torch.arange(entries.numel(), device=dev), lengths)
        offset = torch.arange(owner.numel(), device=dev) - (lengths.cumsum(0) - lengths)[owner]
        pos = col_ptr[e_cols][owner] + offset
        j = csc_rows[pos]
        gallery = j >= num_q
        shared = torch.zeros(stop - start, n - num_q, device=dev)
        flat = (e_rows[owner][gallery] - start) * (n - num_q) + (j[gallery] - num_q)
        contrib = torch.minimum(e_vals[owner][gallery], csc_vals[pos][gallery])
        shared.view(-1).index_add_(0, flat, contrib)
        jaccard = 1 - shared / (2.0 - shared)
        original = _query_gallery_distances(distinct, groups, start, stop, num_q) / row_max[start:stop, None]
        out.append(jaccard * (1 - lam) + original * lam)
    return torch.cat(out)


def _query_gallery_distances(distinct: torch.Tensor, groups: Optional[RowGroups], start: int, stop: int,
                             num_q: int) -> torch.Tensor:
    """Squared distances of items start..stop-1 (queries) to the gallery items num_q.., computed on
    distinct rows and gathered: copies in the gallery (or of a query in this block) get equal bits."""
    if groups is None:
        return _squared_distances(distinct[start:stop], distinct[num_q:])
    rows, row_of = torch.unique(groups.inverse[start:stop], return_inverse=True)
    return _squared_distances(distinct[rows], distinct)[row_of][:, groups.inverse[num_q:]]


def _query_expansion(v_rows, v_cols, w, first_k2, n):
    """V_qe[i] = mean over l in first_k2[i] of V[l], on (row, col, value) triples sorted by row."""
    k2 = first_k2.shape[1]
    row_ptr = torch.zeros(n + 1, dtype=torch.long, device=w.device)
    row_ptr[1:] = torch.bincount(v_rows, minlength=n).cumsum(0)
    src = first_k2.reshape(-1)  # l for each (i, m)
    dst = torch.arange(n, device=w.device).repeat_interleave(k2)
    lengths = row_ptr[src + 1] - row_ptr[src]
    owner = torch.repeat_interleave(torch.arange(src.numel(), device=w.device), lengths)
    offset = torch.arange(owner.numel(), device=w.device) - (lengths.cumsum(0) - lengths)[owner]
    pos = row_ptr[src][owner] + offset
    key = dst[owner] * n + v_cols[pos]
    uniq, inverse = torch.unique(key, return_inverse=True)
    vals = torch.zeros(uniq.numel(), dtype=w.dtype, device=w.device).index_add_(0, inverse, w[pos]) / k2
    return uniq // n, uniq % n, vals
