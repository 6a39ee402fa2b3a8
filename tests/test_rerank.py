"""Re-ranking: sparse k-reciprocal vs the plain dense algorithm; AIM vs SAAI eqs. 6-10 and the released code."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import threads

from reid_kernels.rerank import (_distinct, _knn_and_row_max, aim, aim_parameters, k_reciprocal_rerank,
                                 k_reciprocal_rerank_dense)


def identity_features(num_q, num_g, dim, ids=10, seed=0, spread=0.5):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(ids, dim, generator=gen)
    labels = torch.randint(0, ids, (num_q + num_g,), generator=gen)
    x = centres[labels] + spread * torch.randn(num_q + num_g, dim, generator=gen)
    return x[:num_q], x[num_q:]


# ------------------------------------------------------------------------------ k-reciprocal
@pytest.mark.parametrize("num_q, num_g, k1, k2", [(30, 80, 20, 6), (25, 50, 7, 1), (12, 15, 20, 3), (40, 60, 5, 2)])
def test_sparse_k_reciprocal_matches_dense(device, num_q, num_g, k1, k2):
    q, g = identity_features(num_q, num_g, 16, seed=num_q)
    assert_ranking_defined(q, g, max(k1 + 1, k2))  # other blockings: only near-ties could rank otherwise
    dense = k_reciprocal_rerank_dense(q, g, k1, k2, 0.3)
    for block in (2048, 7):  # one tile; many tiles
        sparse = k_reciprocal_rerank(q.to(device), g.to(device), k1, k2, 0.3, block=block)
        assert sparse.device.type == device.type and sparse.shape == (num_q, num_g)
        np.testing.assert_allclose(sparse.cpu().numpy(), dense, rtol=0, atol=2e-6)


def test_k_reciprocal_faiss_graph():
    pytest.importorskip("faiss")
    q, g = identity_features(30, 80, 16, seed=4)
    assert_ranking_defined(q, g, 21)  # FAISS's own arithmetic: only near-ties could rank otherwise
    dense = k_reciprocal_rerank_dense(q, g)
    np.testing.assert_allclose(k_reciprocal_rerank(q, g, knn="faiss").numpy(), dense, rtol=0, atol=2e-6)


def test_k_reciprocal_limits():
    q, g = identity_features(10, 30, 8, seed=3)
    # lambda = 1: the final distance is the row-normalised squared distance
    x = torch.cat([q, g])
    d = torch.cdist(x, x) ** 2
    expected = (d / d.max(dim=1, keepdim=True).values)[:10, 10:]
    np.testing.assert_allclose(k_reciprocal_rerank(q, g, lambda_value=1.0).numpy(), expected.numpy(), atol=1e-5)
    # re-ranking helps on clustered data: the nearest gallery item shares the query's identity more often
    rr = k_reciprocal_rerank(q, g, k1=6, k2=3)
    assert torch.isfinite(rr).all() and (rr >= 0).all() and (rr <= 1 + 1e-6).all()


def test_k_reciprocal_bad_input():
    q, g = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="gf: expected 8 columns"):
        k_reciprocal_rerank(q, torch.randn(6, 5))
    with pytest.raises(ValueError, match="lambda_value"):
        k_reciprocal_rerank(q, g, lambda_value=1.5)
    with pytest.raises(ValueError, match="k1"):
        k_reciprocal_rerank(q, g, k1=0)
    with pytest.raises(ValueError, match="knn"):
        k_reciprocal_rerank(q, g, knn="annoy")
    with pytest.raises(ValueError, match="finite"):
        k_reciprocal_rerank(torch.full((2, 8), float("nan")), g)
    with pytest.raises(ValueError, match="non-empty"):
        k_reciprocal_rerank_dense(q, torch.randn(0, 8))


def exact_squared_distances(x):
    """|x_i - x_j|^2 of float32 rows, correctly rounded to float32 from the float64 squares by math.fsum:
    a function of the two rows' bits alone (no summation order), so copies tie exactly and d is symmetric
    on every CPU and thread count -- unlike a blocked matrix product."""
    x = np.asarray(x, dtype=np.float64)
    diff = (x[:, None, :] - x[None, :, :]) ** 2
    return np.array([[math.fsum(pair) for pair in row] for row in diff]).astype(np.float32)


def zhong_reference(qf, gf, k1, k2, lambda_value):
    """Zhong et al., Re-ranking Person Re-identification with k-reciprocal Encoding (CVPR 2017), as its
    public ``re_ranking`` computes it, written from sets instead of its index arrays: float32 squared
    distances (here exact ones, see exact_squared_distances; the library's matrix-product expansion
    differs by its rounding), each column divided by its maximum and transposed; neighbours by a stable
    argsort (the public code's argsort leaves equal distances in an unspecified order); V in float32
    (the public code stores float16); Jaccard as 1 - sum min / sum max of the expanded rows (equal to
    its 1 - m / (2 - m) since every row sums to 1)."""
    x = torch.cat([qf, gf]).float()
    dist = exact_squared_distances(x.numpy())
    original = (dist / dist.max(axis=0)).T.astype(np.float32)
    rank = np.argsort(original, axis=1, kind="stable")
    n, num_q = x.shape[0], qf.shape[0]

    def reciprocal(i, k):
        return {int(j) for j in rank[i, : k + 1] if i in rank[j, : k + 1]}

    V = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        own = reciprocal(i, k1)
        members = set(own)
        for c in own:
            theirs = reciprocal(c, int(np.around(k1 / 2.0)))
            if len(theirs & own) > 2.0 / 3 * len(theirs):
                members |= theirs
        cols = sorted(members)
        weight = np.exp(-original[i, cols])
        V[i, cols] = weight / weight.sum()
    if k2 != 1:
        V = np.stack([V[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = np.array([[1 - np.minimum(V[i], V[j]).sum() / np.maximum(V[i], V[j]).sum() for j in range(n)]
                        for i in range(num_q)], dtype=np.float32)
    final = (1 - lambda_value) * jaccard + lambda_value * original[:num_q]
    return final[:, num_q:]


def with_duplicates(q, g, copies):
    """Gallery rows repeated (exact ties in every distance to them), and a query repeated in the gallery."""
    return torch.cat([g, g[:copies], q[:2]])


# The library's float32 expansion |a|^2 + |b|^2 - 2ab differs from the exact squared distance by at
# most 2.3e-7 of the row maximum on these features (measured: 1.8e-7 for the 12-dim sets, 2.3e-7 for the
# 16-dim ones, one product or blocks of 7 rows, 1 and 2 threads). Rankings
# are only defined where no two distinct items are closer than twice that at a rank that decides anything.
EXPANSION_ERROR = 4e-7


def assert_ranking_defined(q, g, width):
    """No near-tie among the first ``width`` + 1 neighbours of any item (exact ties of copies aside)."""
    d = exact_squared_distances(torch.cat([q, g]).numpy()).astype(np.float64)
    for row in (d / d.max(axis=0)).T:
        nearest = np.unique(row)[: width + 1]
        assert np.diff(nearest).min() > 2 * EXPANSION_ERROR, "near-tied test data: the ranking is not defined"


@pytest.mark.parametrize("k1, k2", [(2, 6), (3, 9), (5, 3), (20, 6), (4, 5), (1, 4)])
@pytest.mark.parametrize("duplicated", [False, True])
def test_k_reciprocal_agrees_with_dense_and_reference(device, k1, k2, duplicated):
    """k2 > k1 + 1 (the expansion needs more neighbours than the reciprocal sets) and duplicated
    rows (ties at the k-th neighbour): the kNN graph version once differed by 0.27-0.56 and 0.014, and
    by 0.0085 at 2 threads on an AVX-512 CPU (copies in other tiles of the product got other bits).
    Measured now: <= 3.4e-7 between the three at 1 and 2 threads (float32 rounding of the distances)."""
    q, g = identity_features(20, 45, 12, seed=k1 * 7 + k2)
    if duplicated:
        g = with_duplicates(q, g, 15)
    assert_ranking_defined(q, g, max(k1 + 1, k2))  # smallest gap 8.9e-7 (k1=5, k2=3)
    reference = zhong_reference(q, g, k1, k2, 0.3)
    dense = k_reciprocal_rerank_dense(q, g, k1, k2, 0.3)
    np.testing.assert_allclose(dense, reference, rtol=0, atol=2e-6)
    for block in (2048, 5):
        sparse = k_reciprocal_rerank(q.to(device), g.to(device), k1, k2, 0.3, block=block).cpu().numpy()
        np.testing.assert_allclose(sparse, dense, rtol=0, atol=2e-6)
        np.testing.assert_allclose(sparse, reference, rtol=0, atol=2e-6)


@pytest.mark.parametrize("k1, k2", [(3, 9), (20, 6)])
def test_k_reciprocal_faiss_graph_with_ties(k1, k2):
    pytest.importorskip("faiss")
    q, g = identity_features(20, 45, 12, seed=5)
    g = with_duplicates(q, g, 15)
    assert_ranking_defined(q, g, max(k1 + 1, k2))
    np.testing.assert_allclose(k_reciprocal_rerank(q, g, k1, k2, knn="faiss").numpy(),
                               k_reciprocal_rerank_dense(q, g, k1, k2), rtol=0, atol=2e-6)


def duplicated_set(seed):
    """Queries and a gallery with exact copies: 15 gallery rows repeated, 2 queries repeated in the
    gallery, and one query repeated among the queries."""
    q, g = identity_features(20, 45, 12, seed=seed)
    return torch.cat([q, q[3:4]]), with_duplicates(q, g, 15)


def copies_of(g):
    """(j, j') pairs of gallery columns holding identical rows."""
    same = (g[:, None, :] == g[None, :, :]).all(-1)
    return torch.triu(same, diagonal=1).nonzero().T


THREAD_COUNTS = (1, 2)
BLOCKS = (1, 4, 7, 2048)


@pytest.mark.parametrize("k1, k2", [(20, 6), (3, 9), (5, 3)])
def test_k_reciprocal_independent_of_threads_and_blocks(k1, k2):
    """Copies have bit-identical distances by construction (computed once on the distinct rows and
    gathered), so the kNN graph -- the discrete part: neighbours, reciprocal sets, expansions -- is the
    same at every thread count and block size (equality, the test data having no near-tie among
    distinct items). The values differ only by the products' rounding: measured <= 1.3e-7 (0 for the
    dense version); before, 0.0085 at 2 threads (AVX-512, also with the ISA capped to SSE4.2)."""
    q, g = duplicated_set(seed=k1 * 7 + k2)
    assert_ranking_defined(q, g, max(k1 + 1, k2))
    x = torch.cat([q, g])
    with threads(1):
        expected = k_reciprocal_rerank(q, g, k1, k2)
        expected_graph = _knn_and_row_max(*_distinct(x), max(k1 + 1, k2), 2048)[0]
        dense_one_thread = k_reciprocal_rerank_dense(q, g, k1, k2)
    np.testing.assert_allclose(expected.numpy(), dense_one_thread, rtol=0, atol=2e-6)
    np.testing.assert_allclose(dense_one_thread, zhong_reference(q, g, k1, k2, 0.3), rtol=0, atol=2e-6)
    for n in THREAD_COUNTS:
        with threads(n):
            np.testing.assert_allclose(k_reciprocal_rerank_dense(q, g, k1, k2), dense_one_thread, rtol=0, atol=2e-6)
            for block in BLOCKS:
                graph = _knn_and_row_max(*_distinct(x), max(k1 + 1, k2), block)[0]
                assert torch.equal(graph, expected_graph), (n, block)
                got = k_reciprocal_rerank(q, g, k1, k2, block=block)
                torch.testing.assert_close(got, expected, rtol=0, atol=2e-6, msg=f"threads {n}, block {block}")


@pytest.mark.parametrize("form", ["code", "paper"])
@pytest.mark.parametrize("method", ["dense", "knn"])
def test_aim_independent_of_threads_and_blocks(form, method):
    """Copies in the gallery get bit-identical similarities (one product on the distinct rows), so
    eq. 6 keeps both of two tied copies and eq. 7 ranks them by index, at every thread count and query
    block. With the dense form (and the code form of the kNN one) the products are made for distinct
    gallery rows and gathered, so the columns of copies are bit-identical too (asserted; the kNN code
    form's were not before, the paper form's may differ where a row's k1-th place cuts between copies);
    the rest agrees to the products' rounding: measured <= 2.4e-7 (code form) and 1.4e-6 (paper form,
    whose amendment sums k1 products of size ~1 without normalisation)."""
    q, g = duplicated_set(seed=3)
    k1, k2 = 8, 3
    with threads(1):
        expected = aim(q, g, k1, k2, form=form, method=method)
    pairs = copies_of(g)
    assert pairs.shape[1] == 15
    for n in THREAD_COUNTS:
        with threads(n):
            for block in BLOCKS:
                got = aim(q, g, k1, k2, form=form, method=method, query_block=block)
                torch.testing.assert_close(got, expected, rtol=0, atol=5e-6, msg=f"threads {n}, block {block}")
                if method == "dense" or form == "code":
                    assert torch.equal(got[:, pairs[0]], got[:, pairs[1]])


def test_rerank_scalars_numpy_and_refusals():
    q, g = identity_features(6, 20, 8, seed=9)
    expected = k_reciprocal_rerank(q, g, 4, 3, 0.3)
    assert torch.equal(k_reciprocal_rerank(q, g, np.int64(4), np.int32(3), np.float32(0.3)), expected)
    np.testing.assert_array_equal(k_reciprocal_rerank_dense(q, g, np.int64(4), np.int64(3), np.float64(0.3)),
                                  k_reciprocal_rerank_dense(q, g, 4, 3, 0.3))
    for kwargs, error, match in [
        (dict(k1=2.0), TypeError, "k1: expected an int, got float"),
        (dict(k2=True), TypeError, "k2: expected an int, got bool"),
        (dict(lambda_value="0.3"), TypeError, "lambda_value: expected a float in"),
        (dict(lambda_value=float("nan")), ValueError, "lambda_value: expected a finite value"),
        (dict(block=0), ValueError, "block: expected an int >= 1, got 0"),
    ]:
        with pytest.raises(error, match=match):
            k_reciprocal_rerank(q, g, **kwargs)
    assert torch.allclose(aim(q, g, np.int64(4), np.int64(2)), aim(q, g, 4, 2))
    for block, error in ((0, ValueError), (-1, ValueError), (2.5, TypeError)):
        with pytest.raises(error, match="query_block: expected an int"):
            aim(q, g, query_block=block)


# ------------------------------------------------------------------------------ AIM
def aim_released_code(qf, gf, k1, k2):
    """The released SAAI code's semantics (models/AIM.py), transcribed plainly."""
    qf, gf = F.normalize(qf), F.normalize(gf)

    def affinity(x, y, expand):
        sim = x @ y.T
        top = sim.topk(k1)
        sim = torch.where(sim < top.values[:, -1:], torch.zeros_like(sim), sim)
        if expand:
            sim = sim[top.indices[:, :k2]].mean(dim=1)
        return sim

    new_q = F.normalize(affinity(qf, gf, False))
    new_g = F.normalize(affinity(gf, gf, True))
    return -new_q @ new_g.T - qf @ gf.T


def aim_paper_loops(qf, gf, k1, k2):
    """Eqs. 6-10 element by element."""
    qf, gf = F.normalize(qf).double(), F.normalize(gf).double()
    a_qg, a_gg = qf @ gf.T, gf @ gf.T

    def remove_noise(a):  # eq. 6
        out = torch.zeros_like(a)
        for i in range(a.shape[0]):
            v = torch.sort(a[i], descending=True).values[k1 - 1]
            for j in range(a.shape[1]):
                out[i, j] = a[i, j] if a[i, j] >= v else 0
        return out

    hat_qg, hat_gg = remove_noise(a_qg), remove_noise(a_gg)
    tilde_gg = torch.zeros_like(hat_gg)
    for i in range(a_gg.shape[0]):  # eq. 7: the k2 most similar gallery items (itself first)
        for l in torch.argsort(a_gg[i], descending=True)[:k2]:
            tilde_gg[i] += hat_gg[l] / k2
    d = 1 - a_qg  # eq. 8
    d_star = hat_qg @ tilde_gg  # eq. 9
    return d - d_star  # eq. 10


@pytest.mark.parametrize("k1, k2", [(4, 1), (2, 2), (20, 6), (8, 2)])
def test_aim_code_form_matches_released_code(device, k1, k2):
    q, g = identity_features(40, 70, 32, seed=k1)
    expected = aim_released_code(q, g, k1, k2)
    got = aim(q.to(device), g.to(device), k1, k2, method="dense").cpu()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    knn = aim(q.to(device), g.to(device), k1, k2, method="knn", query_block=9).cpu()
    torch.testing.assert_close(knn, expected, rtol=0, atol=2e-6)
    assert torch.equal(aim(q, g, k1, k2), aim(q, g, k1, k2, method="dense"))  # auto = dense at this size


@pytest.mark.parametrize("k1, k2", [(4, 1), (6, 3)])
def test_aim_paper_form_matches_equations(k1, k2):
    q, g = identity_features(12, 20, 8, seed=5)
    expected = aim_paper_loops(q, g, k1, k2).float()
    torch.testing.assert_close(aim(q, g, k1, k2, form="paper", method="dense"), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(aim(q, g, k1, k2, form="paper", method="knn"), expected, rtol=0, atol=1e-5)


def test_aim_forms_differ_and_parameters():
    q, g = identity_features(12, 20, 8, seed=6)
    assert not torch.allclose(aim(q, g, 4, 2, form="code"), aim(q, g, 4, 2, form="paper"))
    assert aim_parameters("sysu", "all", "single") == (4, 1)
    assert aim_parameters("sysu", "indoor", "single") == (2, 2)
    assert aim_parameters("sysu", "indoor", "single", source="paper") == (4, 1)
    assert aim_parameters("sysu", "all", "multi") == aim_parameters("sysu", "indoor", "multi") == (20, 6)
    assert aim_parameters("regdb") == (8, 2)
    with pytest.raises(ValueError, match="dataset/mode/shot"):
        aim_parameters("market", "all", "single")
    with pytest.raises(ValueError, match="source"):
        aim_parameters("regdb", source="blog")


def test_aim_bad_input():
    q, g = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="k2: expected k2 <= k1"):
        aim(q, g, 2, 3)
    with pytest.raises(ValueError, match="form"):
        aim(q, g, form="both")
    with pytest.raises(ValueError, match="finite"):
        aim(q, torch.full((6, 8), float("inf")))
    with pytest.raises(TypeError, match="floating-point"):
        aim(q, torch.ones(6, 8, dtype=torch.long))
    assert aim(q, g, k1=50, k2=1).shape == (4, 6)  # k1 clamped to the gallery size
