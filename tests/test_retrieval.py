"""reid_kernels.retrieval: exact torch search and GalleryIndex vs brute force."""
import math
import sys

import numpy as np
import pytest
import torch
from conftest import threads

from reid_kernels.retrieval import GalleryIndex, SearchResult, exact_search, import_faiss

try:
    import faiss  # noqa: F401

    HAVE_FAISS = True
except ImportError:
    HAVE_FAISS = False
needs_faiss = pytest.mark.skipif(not HAVE_FAISS, reason="faiss not installed")


def clustered(n, dim=16, clusters=20, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, dim))
    return x.astype(np.float32)


def normalised(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def assert_no_near_tie(scores, k, tol):
    """Each row's k+1 best scores (largest first) are more than ``tol`` apart, so the top-k indices are
    the same for any summation order whose error stays below tol/2 (float32: ~1e-6 here)."""
    best = -np.sort(-np.asarray(scores, dtype=np.float64), axis=1)[:, : k + 1]
    assert (best[:, :-1] - best[:, 1:]).min() > tol, "near-tied test data: the expected indices are not defined"


def brute_force(q, db, k):
    scores = normalised(q) @ normalised(db).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_search_matches_brute_force_with_tiles(device, metric):
    q = torch.from_numpy(clustered(37, seed=1)).to(device)
    db = torch.from_numpy(clustered(301, seed=2)).to(device)
    full = q @ db.T if metric == "ip" else torch.cdist(q, db) ** 2
    ref_s, ref_i = torch.sort(full, dim=1, descending=(metric == "ip"), stable=True)
    # another product than the tiles' (and cdist for l2): indices compared only because no two of the
    # 11 best are within 1e-4 (smallest gap 8.9e-4 for ip, 2.1e-3 for l2; float32 error ~1e-5)
    q64, db64 = q.cpu().double(), db.cpu().double()
    exact = q64 @ db64.T if metric == "ip" else -torch.cdist(q64, db64) ** 2
    assert_no_near_tie(exact, 10, 1e-4)
    for qb, dbb in [(4096, 1 << 18), (5, 17)]:  # one tile; many tiles with a running merge
        s, i = exact_search(q, db, 10, metric=metric, query_block=qb, database_block=dbb)
        assert torch.equal(i, ref_i[:, :10])
        assert torch.allclose(s, ref_s[:, :10], atol=1e-4)
    s, i = exact_search(q, db[:3], 10)
    assert s.shape == (37, 3)  # k clamped to the database size


def exact_scores(q, db, metric):
    """Inner products / squared distances correctly rounded from float64 terms (math.fsum): a function of
    the two rows' bits alone, so copies tie exactly, on every CPU and thread count."""
    q, db = q.astype(np.float64), db.astype(np.float64)
    terms = q[:, None, :] * db[None, :, :] if metric == "ip" else (q[:, None, :] - db[None, :, :]) ** 2
    return np.array([[math.fsum(t) for t in row] for row in terms])


def ranking_by_score_then_index(scores, metric, k):
    key = -scores if metric == "ip" else scores
    order = np.lexsort((np.broadcast_to(np.arange(key.shape[1]), key.shape), key), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_search_duplicates_independent_of_threads_and_blocks(metric):
    """A database whose rows come in up to 4 copies and queries with copies (of each other and of database
    rows): copies get bit-identical scores by construction, equal scores rank by index (also which copies
    are kept at the k-th place), so the indices equal the exact ranking at every thread count and block
    size; the scores agree to float32 rounding: measured <= 2.2e-6 (ip, scores up to 21) and 4.5e-6 (l2,
    up to 28) against the exact ones, tolerance 1e-6 of the largest score. (Before: copies in other
    tiles or rows got other bits and torch.topk ordered ties arbitrarily; indices failed at 1 thread.)"""
    base = clustered(60, seed=9)
    db = np.concatenate([base, base[:25], base[5:15], base[:8]])  # copies in other tiles and across the k-th place
    q = np.concatenate([clustered(12, seed=10), db[[3, 70, 100]], clustered(12, seed=10)[:2]])
    k = 9
    exact = exact_scores(q, db, metric)
    ref_s, ref_i = ranking_by_score_then_index(exact, metric, k)
    # no near-tie among distinct rows within the k+1 best: the ranking is defined to float32 rounding
    for row in exact:
        best = np.unique(row)[::-1][: k + 1] if metric == "ip" else np.unique(row)[: k + 1]
        assert np.abs(np.diff(best)).min() > 1e-4  # smallest gap 2.1e-3
    copy_of = torch.from_numpy(np.unique(db, axis=0, return_inverse=True)[1].reshape(-1))
    qt, dbt = torch.from_numpy(q), torch.from_numpy(db)
    for n in (1, 2):
        with threads(n):
            for qb, dbb in [(4096, 1 << 18), (5, 7), (1, 1), (3, 64)]:
                s, i = exact_search(qt, dbt, k, metric=metric, query_block=qb, database_block=dbb)
                assert torch.equal(i, torch.from_numpy(ref_i)), (n, qb, dbb)
                np.testing.assert_allclose(s.numpy(), ref_s, rtol=0, atol=1e-6 * np.abs(ref_s).max())
                # copies among a row's results: bit-identical scores; duplicated queries: identical rows
                same = copy_of[i][:, :, None] == copy_of[i][:, None, :]
                assert torch.equal(torch.where(same, s[:, :, None] - s[:, None, :], torch.zeros(())),
                                   torch.zeros(same.shape))
                assert torch.equal(s[-2:], s[:2]) and torch.equal(i[-2:], i[:2])


def test_exact_search_bad_input():
    q = torch.randn(3, 4)
    with pytest.raises(ValueError, match="k: expected an int >= 1"):
        exact_search(q, q, 0)
    with pytest.raises(ValueError, match="database: expected 4 columns"):
        exact_search(q, torch.randn(5, 3), 2)
    with pytest.raises(ValueError, match="empty database"):
        exact_search(q, torch.randn(0, 4), 2)
    with pytest.raises(ValueError, match="finite"):
        exact_search(torch.full((2, 4), float("nan")), q, 2)
    with pytest.raises(ValueError, match="metric"):
        exact_search(q, q, 2, metric="cosine")


BACKENDS = [("torch", "flat")] + ([("faiss", "flat")] if HAVE_FAISS else [])


@pytest.mark.parametrize("backend, kind", BACKENDS)
def test_flat_index_is_exact(backend, kind):
    db, q = clustered(500, seed=3), clustered(40, seed=4)
    index = GalleryIndex(16, kind, backend=backend, device="cpu")
    ids = index.add(db, pids=np.arange(500) % 7, camids=np.ones(500, int), paths=[f"g{i}.jpg" for i in range(500)])
    assert ids.tolist() == list(range(500)) and len(index) == 500
    result = index.search(q, k=8, batch_size=16)
    assert isinstance(result, SearchResult)
    ref_s, ref_i = brute_force(q, db, 8)
    # numpy's product and FAISS's / torch's differ by float32 rounding (<= 1e-6 on these cosines); the
    # 9 best cosines of a row are >= 1.05e-5 apart (measured), so the indices are defined
    assert_no_near_tie(normalised(q.astype(np.float64)) @ normalised(db.astype(np.float64)).T, 8, 5e-6)
    assert np.array_equal(result.ids, ref_i)
    assert np.allclose(result.scores, ref_s, atol=1e-5)
    pids, camids, paths = index.metadata(result.ids[:2])
    assert pids.tolist() == (ref_i[:2] % 7).tolist() and paths[0] == f"g{ref_i[0, 0]}.jpg"


@needs_faiss
@pytest.mark.parametrize("kind, knob, values", [("ivf", "nprobe", (1, 64)), ("hnsw", "ef_search", (4, 256))])
def test_approximate_indexes_recall_knob(kind, knob, values):
    db, q = clustered(2000, seed=5), clustered(100, seed=6)
    index = GalleryIndex(16, kind, backend="faiss", nlist=64, hnsw_m=8, ef_construction=40)
    index.add(db)
    _, ref_i = brute_force(q, db, 10)
    recalls = []
    for value in values:
        setattr(index, knob, value)
        found = index.search(q, 10).ids
        recalls.append(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, ref_i)]))
    assert recalls[1] >= recalls[0]
    assert recalls[1] >= 0.9  # full probe / wide beam: (nearly) exact
    with pytest.raises(ValueError, match=knob):
        setattr(index, knob, 0)


@pytest.mark.parametrize("backend, kind", BACKENDS + ([("faiss", "ivf"), ("faiss", "hnsw")] if HAVE_FAISS else []))
def test_remove_save_load_roundtrip(tmp_path, backend, kind):
    db, q = clustered(300, seed=7), clustered(10, seed=8)
    index = GalleryIndex(16, kind, backend=backend, nlist=8, nprobe=8, device="cpu")
    index.add(db[:200], pids=np.arange(200), paths=[f"a{i}" for i in range(200)])
    index.add(db[200:], pids=np.arange(200, 300), paths=[f"b{i}" for i in range(100)])
    removed = np.arange(0, 300, 3)
    assert index.remove(removed) == 100 and len(index) == 200
    result = index.search(q, 5)
    assert not np.isin(result.ids, removed).any()
    if kind != "hnsw":  # flat and fully probed IVF are exact on the survivors
        keep = np.setdiff1d(np.arange(300), removed)
        _, ref = brute_force(q, db[keep], 5)
        # indices of another product: defined because no two of the 6 best are close (smallest gap 1.0e-3)
        assert_no_near_tie(normalised(q.astype(np.float64)) @ normalised(db[keep].astype(np.float64)).T, 5, 1e-4)
        assert np.array_equal(result.ids, keep[ref])
    path = tmp_path / "gallery.npz"
    index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["gallery.npz"]  # no temp file left behind
    loaded = GalleryIndex.load(path, device="cpu")
    again = loaded.search(q, 5)
    assert np.array_equal(again.ids, result.ids) and np.allclose(again.scores, result.scores)
    assert loaded.metadata(again.ids)[2] == index.metadata(result.ids)[2]
    new_ids = loaded.add(db[:2])
    assert new_ids.tolist() == [300, 301]  # ids are never reused
    with pytest.raises(KeyError, match="not in the index"):
        loaded.remove([0])


def test_index_bad_input(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        GalleryIndex(8, "lsh")
    with pytest.raises(ValueError, match="only kind='flat'"):
        GalleryIndex(8, "ivf", backend="torch")
    index = GalleryIndex(8, backend="torch")
    with pytest.raises(ValueError, match="index is empty"):
        index.search(np.ones((1, 8), np.float32))
    with pytest.raises(ValueError, match="expected 8 columns"):
        index.add(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="pids: expected 2 integers"):
        index.add(np.ones((2, 8), np.float32), pids=[1])
    with pytest.raises(ValueError, match="finite"):
        index.add(np.full((2, 8), np.inf, np.float32))
    with pytest.raises(FileNotFoundError, match="no saved GalleryIndex"):
        GalleryIndex.load(tmp_path / "missing.npz")
    if HAVE_FAISS:
        ivf = GalleryIndex(8, "ivf", backend="faiss", nlist=50)
        with pytest.raises(ValueError, match="at least nlist=50"):
            ivf.add(np.ones((10, 8), np.float32))


def test_missing_faiss_error_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        import_faiss()
    with pytest.raises(ImportError, match="faiss-gpu"):
        GalleryIndex(8, "hnsw")
    assert GalleryIndex(8, "flat").backend == "torch"  # auto falls back to exact torch search


@needs_faiss
def test_ivfpq_kind_recall_save_load_and_faiss_file(tmp_path):
    from reid_kernels.retrieval import default_pq_m

    assert (default_pq_m(2048), default_pq_m(128), default_pq_m(16), default_pq_m(7)) == (128, 8, 1, 1)
    with pytest.raises(ValueError, match="pq_m: expected a divisor of dim=16"):
        GalleryIndex(16, "ivfpq", pq_m=5)
    db, q = clustered(3000, seed=9), clustered(50, seed=10)
    index = GalleryIndex(16, "ivfpq", backend="faiss", nlist=16, pq_m=8, nprobe=16)
    with pytest.raises(ValueError, match="IVF-PQ training needs at least 256"):
        index.train(db[:100])
    index.add(db, pids=np.arange(3000) % 7)
    assert index.faiss_index.pq.M == 8 and index.is_trained
    _, ref_i = brute_force(q, db, 10)
    found = index.search(q, 10).ids
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, ref_i)])
    assert recall >= 0.7  # 8 bytes per 16-d vector, all lists probed: measured 0.82 (the codes' error); random ~0.003
    index.save(tmp_path / "pq.npz")
    again = GalleryIndex.load(tmp_path / "pq.npz")
    assert again.pq_m == 8 and np.array_equal(again.search(q, 10).ids, found)
    # FAISS's own file, read back and wrapped: the same answers
    fa = import_faiss()
    fa.write_index(index.faiss_index, str(tmp_path / "pq.faiss"))
    wrapped = GalleryIndex.from_faiss(fa.read_index(str(tmp_path / "pq.faiss")), "ivfpq", pids=np.arange(3000) % 7,
                                      nprobe=16)
    assert np.array_equal(wrapped.search(q, 10).ids, found)
    assert wrapped.metadata(found[:1])[0].tolist() == (found[:1] % 7).tolist()
    with pytest.raises(ValueError, match="expected a FAISS IndexHNSWFlat"):
        GalleryIndex.from_faiss(fa.read_index(str(tmp_path / "pq.faiss")), "hnsw")


@needs_faiss
@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_from_faiss_wraps_an_id_map_index_and_checks_its_ids(tmp_path, kind):
    db, q = clustered(200, seed=11), clustered(5, seed=12)
    index = GalleryIndex(16, kind, backend="faiss", device="cpu")
    index.add(db)
    fa = import_faiss()
    wrapped = GalleryIndex.from_faiss(index.faiss_index, kind, paths=[f"p{i}" for i in range(200)])
    result = wrapped.search(q, 3)
    assert np.array_equal(result.ids, index.search(q, 3).ids)
    assert wrapped.metadata(result.ids[:1, :1])[2] == [f"p{result.ids[0, 0]}"]
    index.remove([0])  # ids 1..199: not the 0..N-1 the wrapper expects
    with pytest.raises(ValueError, match="ids are not 0..198"):
        GalleryIndex.from_faiss(index.faiss_index, kind)
    with pytest.raises(ValueError, match="paths"):
        GalleryIndex.from_faiss(fa.read_index(_write(fa, db, tmp_path)), "flat", paths=["a"])


def _write(fa, db, tmp_path):
    index = GalleryIndex(16, "flat", backend="faiss")
    index.add(db)
    path = str(tmp_path / "flat.faiss")
    fa.write_index(index.faiss_index, path)
    return path


def test_save_is_durable_fsync_of_file_then_folder(tmp_path, monkeypatch):
    """``GalleryIndex.save`` syncs the temporary file before the rename and the folder after it
    (a rename without the folder's fsync can be lost in a power cut)."""
    import os

    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", None))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    index = GalleryIndex(16, "flat", backend="torch", device="cpu")
    index.add(clustered(20, seed=3), pids=np.arange(20))
    index.save(tmp_path / "g.npz")
    assert calls == [("fsync", False), ("replace", None), ("fsync", True)]
    assert len(GalleryIndex.load(tmp_path / "g.npz")) == 20
