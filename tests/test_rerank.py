"""Re-ranking: sparse k-reciprocal vs the plain dense algorithm; AIM vs SAAI eqs. 6-10 and the released code."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reid_kernels.rerank import aim, aim_parameters, k_reciprocal_rerank, k_reciprocal_rerank_dense


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
    dense = k_reciprocal_rerank_dense(q, g, k1, k2, 0.3)
    for block in (2048, 7):  # one tile; many tiles
        sparse = k_reciprocal_rerank(q.to(device), g.to(device), k1, k2, 0.3, block=block)
        assert sparse.device.type == device.type and sparse.shape == (num_q, num_g)
        np.testing.assert_allclose(sparse.cpu().numpy(), dense, rtol=0, atol=2e-6)


def test_k_reciprocal_faiss_graph():
    pytest.importorskip("faiss")
    q, g = identity_features(30, 80, 16, seed=4)
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
