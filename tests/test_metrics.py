"""reid_kernels.metrics vs a per-query numpy reference of the community evaluation code."""
import numpy as np
import pytest
import torch

from reid_kernels.metrics import evaluate_ranking


# ---------------------------------------------------------------------------------------
# Reference: the AGW cross-modal baseline's eval_sysu / eval_regdb semantics, one query
# at a time, written plainly. `argsort_kind` is "quicksort" (np.argsort's default, what
# the community code uses) or "stable" (the documented tie order of reid_kernels).
# ---------------------------------------------------------------------------------------
def reference_eval(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, protocol, argsort_kind="quicksort"):
    indices = np.argsort(distmat, axis=1, kind=argsort_kind)
    cmc_rows, aps, inps = [], [], []
    for q in range(distmat.shape[0]):
        order = indices[q]
        ranked_pids = g_pids[order]
        if protocol == "sysu":
            keep = ~((q_camids[q] == 3) & (g_camids[order] == 2))
        else:
            keep = np.ones(len(order), dtype=bool)
        matches = (ranked_pids[keep] == q_pids[q]).astype(np.int32)
        if not matches.any():
            continue  # query identity absent from the (filtered) gallery: skipped
        if protocol == "sysu":
            # CMC on the ranking with repeated identities collapsed to their first occurrence
            kept = ranked_pids[keep]
            _, first = np.unique(kept, return_index=True)
            collapsed = kept[np.sort(first)]
            cmc = (collapsed == q_pids[q]).astype(np.int32).cumsum()
        else:
            cmc = matches.cumsum()
            cmc[cmc > 1] = 1
        cmc_rows.append(cmc[:max_rank])
        last = np.max(np.where(matches == 1))
        inps.append(matches.cumsum()[last] / (last + 1.0))
        precision = np.asarray([x / (i + 1.0) for i, x in enumerate(matches.cumsum())]) * matches
        aps.append(precision.sum() / matches.sum())
    cmc = np.asarray(cmc_rows).astype(np.float32).sum(0) / len(cmc_rows)
    return cmc, np.mean(aps), np.mean(inps), len(cmc_rows)


def random_sysu_case(seed, num_q=60, num_ids=12, num_g=90):
    rng = np.random.default_rng(seed)
    # gallery: visible cams 1, 2, 4, 5, repeated identities; queries: IR cams 3, 6
    g_pids = rng.integers(0, num_ids, num_g)
    g_cams = rng.choice([1, 2, 4, 5], num_g)
    q_pids = rng.integers(0, num_ids + 3, num_q)  # some ids are absent from the gallery
    q_cams = rng.choice([3, 6], num_q)
    # an identity whose only gallery images are on cam2: invalid for cam3 queries only
    g_pids[:3] = num_ids + 5
    g_cams[:3] = 2
    q_pids[:4] = num_ids + 5
    q_cams[:4] = [3, 3, 6, 6]
    dist = rng.random((num_q, num_g))  # continuous: tie-free with probability 1
    return dist, q_pids, g_pids, q_cams, g_cams


def assert_same_as_reference(result, ref):
    cmc, mAP, mINP, num_valid = ref
    assert result.num_valid == num_valid
    assert np.array_equal(result.cmc.astype(np.float32), cmc)  # bit-identical after the float32 cast
    assert result.mAP == pytest.approx(mAP, rel=1e-12, abs=0)
    assert result.mINP == pytest.approx(mINP, rel=1e-12, abs=0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("protocol", ["sysu", "regdb"])
def test_matches_reference_on_random_matrices(seed, protocol):
    dist, q_pids, g_pids, q_cams, g_cams = random_sysu_case(seed)
    result = evaluate_ranking(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, protocol=protocol)
    ref = reference_eval(dist, q_pids, g_pids, q_cams, g_cams, 10, protocol)
    assert_same_as_reference(result, ref)
    assert result.num_queries == len(q_pids)


def test_sysu_filter_and_collapse_change_the_numbers():
    # guards against a reference and an implementation that both ignore the rules
    dist, q_pids, g_pids, q_cams, g_cams = random_sysu_case(7)
    sysu = evaluate_ranking(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, protocol="sysu")
    regdb = evaluate_ranking(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, protocol="regdb")
    assert sysu.num_valid < regdb.num_valid  # cam3 queries lose their cam2-only matches
    assert not np.array_equal(sysu.cmc, regdb.cmc)


def test_hand_computed_example():
    # one cam3 query of id 1; gallery ranked [id2 cam2, id1 cam2, id2 cam1, id1 cam4, id3 cam1]
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    g_pids = np.array([2, 1, 2, 1, 3])
    g_cams = np.array([2, 2, 1, 4, 1])
    res = evaluate_ranking(dist, np.array([1]), g_pids, np.array([3]), g_cams, max_rank=3)
    # filtered ranking: id2, id1, id3 -> collapsed rank of id1 = 2; AP = 1/2; INP = 1/2
    assert res.cmc.tolist() == [0.0, 1.0, 1.0]
    assert res.mAP == 0.5 and res.mINP == 0.5
    # a cam6 query sees the cam2 images: ranking id2, id1, id2, id1, id3
    res6 = evaluate_ranking(dist, np.array([1]), g_pids, np.array([6]), g_cams, max_rank=3)
    assert res6.cmc.tolist() == [0.0, 1.0, 1.0]
    assert res6.mAP == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert res6.mINP == pytest.approx(2 / 4)
    # regdb: plain CMC, first hit at rank 2
    reg = evaluate_ranking(dist, np.array([1]), g_pids, None, None, max_rank=3, protocol="regdb")
    assert reg.cmc.tolist() == [0.0, 1.0, 1.0]


def test_torch_inputs_blocks_and_dtypes_agree():
    dist, q_pids, g_pids, q_cams, g_cams = random_sysu_case(3, num_q=50, num_g=70)
    ref = reference_eval(dist, q_pids, g_pids, q_cams, g_cams, 10, "sysu")
    as_torch = [torch.from_numpy(x) for x in (dist, q_pids, g_pids, q_cams, g_cams)]
    for block_elements in (1, 70 * 7, 1 << 22):  # one query per block, 7 per block, all at once
        res = evaluate_ranking(*as_torch, max_rank=10, block_elements=block_elements)
        assert_same_as_reference(res, ref)
    # float32 distances: the same ranking as long as float32 keeps the order tie-free
    d32 = dist.astype(np.float32)
    ref32 = reference_eval(d32, q_pids, g_pids, q_cams, g_cams, 10, "sysu")
    assert_same_as_reference(evaluate_ranking(d32, q_pids, g_pids, q_cams, g_cams, 10), ref32)
    assert_same_as_reference(evaluate_ranking(d32.tolist(), q_pids.tolist(), g_pids, q_cams, g_cams, 10), ref32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    dist, q_pids, g_pids, q_cams, g_cams = random_sysu_case(5)
    cpu = evaluate_ranking(dist, q_pids, g_pids, q_cams, g_cams)
    gpu = evaluate_ranking(torch.from_numpy(dist).cuda(), q_pids, g_pids, q_cams, g_cams)
    assert np.array_equal(cpu.cmc, gpu.cmc) and cpu.num_valid == gpu.num_valid
    assert gpu.mAP == pytest.approx(cpu.mAP, rel=1e-12)


def test_ties_are_ranked_by_gallery_index():
    rng = np.random.default_rng(0)
    dist = rng.integers(0, 4, (40, 30)).astype(np.float64)  # heavy ties
    q_pids, g_pids = rng.integers(0, 6, 40), rng.integers(0, 6, 30)
    q_cams, g_cams = rng.choice([3, 6], 40), rng.choice([1, 2, 4, 5], 30)
    for protocol in ("sysu", "regdb"):
        res = evaluate_ranking(dist, q_pids, g_pids, q_cams, g_cams, max_rank=5, protocol=protocol)
        stable = reference_eval(dist, q_pids, g_pids, q_cams, g_cams, 5, protocol, argsort_kind="stable")
        assert_same_as_reference(res, stable)
        again = evaluate_ranking(torch.from_numpy(dist), q_pids, g_pids, q_cams, g_cams, max_rank=5,
                                 protocol=protocol, block_elements=30)
        assert np.array_equal(again.cmc, res.cmc) and again.mAP == pytest.approx(res.mAP, rel=1e-12)


def test_ties_order_explicit():
    # gallery items 0 and 1 tie; index 0 (wrong id) comes first under the documented rule
    res = evaluate_ranking(np.array([[0.5, 0.5, 0.9]]), np.array([7]), np.array([3, 7, 3]),
                           None, None, max_rank=2, protocol="regdb")
    assert res.cmc.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("protocol", ["sysu", "regdb"])
def test_two_true_matches_at_one_distance(protocol):
    """The tie rule's `repeated` case: two true matches share a distance and no non-match ties
    with them (every other tie test also ties a match with a non-match, so this row is the only
    one that reaches the stable sort through `repeated` alone). Ranking 0.2 (id 2), 0.5 (id 1),
    0.5 (id 1), 0.9 (id 3): matches at ranks 2 and 3, AP = (1/2 + 2/3) / 2 = 7/12, INP = 2/3.
    Counting without the sort would put both matches at rank 2 (AP 0.75, INP 1.0)."""
    dist = np.array([[0.5, 0.2, 0.5, 0.9]])
    g_pids = np.array([1, 2, 1, 3])
    q_cams, g_cams = np.array([6]), np.array([1, 1, 1, 1])  # one camera: the SYSU filter keeps all
    # max_rank 3: the collapsed SYSU ranking has 3 identities (the reference truncates its CMC there)
    res = evaluate_ranking(dist, np.array([1]), g_pids, q_cams, g_cams, max_rank=3, protocol=protocol)
    stable = reference_eval(dist, np.array([1]), g_pids, q_cams, g_cams, 3, protocol, argsort_kind="stable")
    assert_same_as_reference(res, stable)
    assert res.mAP == pytest.approx(7 / 12, rel=1e-12) and res.mINP == pytest.approx(2 / 3, rel=1e-12)
    assert res.cmc.tolist() == [0.0, 1.0, 1.0]


def test_max_rank_beyond_the_ranking_saturates():
    dist = np.array([[0.1, 0.2, 0.3]])
    res = evaluate_ranking(dist, np.array([1]), np.array([0, 1, 1]), np.array([6]), np.array([1, 1, 1]), max_rank=8)
    assert len(res.cmc) == 8
    assert res.cmc.tolist() == [0.0] + [1.0] * 7
    assert res.rank(1) == 0.0 and res.rank(2) == 1.0
    assert "R1 0.00" in str(res) and "mAP" in str(res)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(distmat=np.full((3, 4), np.nan)), ValueError, "NaN"),
        (lambda a: a.update(distmat=np.zeros((3, 0))), ValueError, "gallery is empty"),
        (lambda a: a.update(distmat=np.zeros(4)), ValueError, "2-D"),
        (lambda a: a.update(q_pids=np.arange(2)), ValueError, r"q_pids: expected shape \(3,\)"),
        (lambda a: a.update(g_pids=np.arange(5)), ValueError, r"g_pids: expected shape \(4,\)"),
        (lambda a: a.update(g_camids=np.ones(3, dtype=int)), ValueError, r"g_camids: expected shape \(4,\)"),
        (lambda a: a.update(q_pids=np.zeros(3)), TypeError, "q_pids: expected integer labels"),
        (lambda a: a.update(q_camids=None), ValueError, "required for protocol='sysu'"),
        (lambda a: a.update(protocol="market"), ValueError, "protocol"),
        (lambda a: a.update(max_rank=0), ValueError, "max_rank"),
        (lambda a: a.update(q_pids=np.array([9, 9, 9])), ValueError, "no query has a true match"),
        (lambda a: a.update(distmat="abc"), TypeError, "distmat"),
    ],
)
def test_bad_input_raises(mutate, error, match):
    args = dict(distmat=np.random.default_rng(0).random((3, 4)), q_pids=np.array([0, 1, 2]),
                g_pids=np.array([0, 1, 2, 2]), q_camids=np.array([3, 6, 3]), g_camids=np.array([1, 2, 4, 5]),
                protocol="sysu", max_rank=20)
    mutate(args)
    with pytest.raises(error, match=match):
        evaluate_ranking(**args)


@pytest.mark.parametrize("protocol", ["sysu", "regdb"])
def test_rows_with_ties_or_infinities_mixed_with_tie_free_rows(protocol):
    # tie-free rows take the counting path, the others the stable-sort path; both must agree
    # with the stable reference
    dist, q_pids, g_pids, q_cams, g_cams = random_sysu_case(11)
    dist = dist.copy()
    rng = np.random.default_rng(1)
    for row in range(0, 20, 2):
        match = np.flatnonzero(g_pids == q_pids[row])
        other = np.flatnonzero(g_pids != q_pids[row])
        if match.size:
            dist[row, rng.choice(other, 3)] = dist[row, match[0]]  # a match tied with non-matches
            dist[row, match[-1]] = dist[row, match[0]]  # two matches tied
    dist[21, :5] = np.inf
    dist[23, 7] = -np.inf
    res = evaluate_ranking(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, protocol=protocol)
    ref = reference_eval(dist, q_pids, g_pids, q_cams, g_cams, 10, protocol, argsort_kind="stable")
    assert_same_as_reference(res, ref)
