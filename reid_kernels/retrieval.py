"""Nearest-neighbour search over ReID embeddings: exact torch search and a FAISS-backed gallery index.

* :func:`exact_search` -- pure torch, exact: chunked matmul + ``topk`` with a running
  merge over gallery blocks, so the (query x gallery) matrix never materialises. Runs
  wherever the tensors are (CPU or CUDA), no FAISS needed.
* :class:`GalleryIndex` -- an index over L2-normalised embeddings (inner product =
  cosine similarity) with person ids, cameras and paths attached to every vector.
  Kinds: ``"flat"`` (exact), ``"ivf"`` (inverted lists; knob ``nprobe``), ``"ivfpq"``
  (inverted lists of product-quantised codes, ``pq_m`` bytes per vector; knob ``nprobe``),
  ``"hnsw"`` (graph, CPU; knob ``ef_search``). Backends: ``"faiss"`` (``pip install faiss-cpu``;
  ``faiss-gpu`` for GPU -- used for flat/IVF when a GPU build and CUDA are present) or
  ``"torch"`` (flat only, exact, CPU or CUDA). ``backend="auto"`` picks FAISS when it
  imports, torch otherwise (flat).

Ties: :func:`exact_search` orders each result row by decreasing score (increasing distance),
equal scores by ascending database index, also at the k-th place; identical database rows get
bit-identical scores by construction, so duplicates rank the same on every CPU, thread count and
blocking (see its docstring).
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._files import fsync_folder
from ._ties import expand_copies, identical_rows, stable_smallest
from ._validate import check_bool, check_int

__all__ = ["exact_search", "SearchResult", "GalleryIndex", "import_faiss", "faiss_has_gpu", "default_pq_m"]

FAISS_HINT = "install it with `pip install faiss-cpu` (or `faiss-gpu` for GPU search)"
INDEX_KINDS = ("flat", "ivf", "ivfpq", "hnsw")
IVF_KINDS = ("ivf", "ivfpq")
PQ_BITS = 8  # 256 centroids per sub-quantiser: one byte per sub-vector
BACKENDS = ("auto", "faiss", "torch")
METRICS = ("ip", "l2")
_FORMAT_VERSION = 1


def import_faiss():
    """Import FAISS lazily, with an error that says how to install it."""
    try:
        import faiss  # noqa: F401
    except ImportError as error:
        raise ImportError(f"reid_kernels.retrieval: FAISS is not installed ({error}); {FAISS_HINT}") from error
    return faiss


def faiss_has_gpu() -> bool:
    """True when the installed FAISS has GPU support and sees a GPU."""
    try:
        faiss = import_faiss()
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def default_pq_m(dim: int) -> int:
    """IVF-PQ's default sub-quantiser count: the largest divisor of ``dim`` not above ``dim / 16``
    (sub-vectors of at least 16 dimensions, one byte each: 2048-d -> 128 bytes, 64x smaller than
    float32; 128-d -> 8 bytes), at least 1. Shorter sub-vectors train much slower on the CPU
    (IVF-PQ training at 10k x 2048, one thread on a shared 2-core machine: 8-d sub-vectors 147 s
    inside a benchmark run; 16-d 12 s and 32-d 15 s measured alone)."""
    dim = check_int("dim", dim, 1)
    for m in range(max(1, dim // 16), 0, -1):
        if dim % m == 0:
            return m
    return 1


def _as_float_matrix(name: str, value, dim: Optional[int] = None) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    elif not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(value).__name__}")
    value = value.detach()
    if value.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (N, D) matrix, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected floating-point embeddings, got dtype {value.dtype}")
    if dim is not None and value.shape[1] != dim:
        raise ValueError(f"{name}: expected {dim} columns (the index dimension), got shape {tuple(value.shape)}")
    if value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name}: expected finite values, got NaN/inf entries")
    return value


def _check_k(k) -> int:
    return check_int("k", k, 1)


@torch.no_grad()
def exact_search(
    queries,
    database,
    k: int,
    *,
    metric: str = "ip",
    query_block: int = 4096,
    database_block: int = 262144,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` search in torch. Returns ``(scores, indices)``, each (Nq, min(k, Ng)).

    ``metric="ip"``: largest inner products first (cosine on normalised inputs).
    ``metric="l2"``: smallest squared Euclidean distances first (``scores`` are those
    distances). Work is done in (query_block x database_block) tiles with a running
    top-k merge, on the device of ``queries`` (``database`` is moved there tile by tile).

    Ties and duplicates: equal scores are ranked by ascending database index, including which
    of the items tied at the k-th place are kept. Identical database rows get bit-identical
    scores and identical query rows bit-identical result rows, by construction (products are
    computed on the distinct rows only, see ``reid_kernels._ties``), so a gallery with
    duplicates ranks the same for every block size, thread count and CPU. Scores of distinct
    rows carry the product's float rounding, which depends on the blocking and the CPU (about
    1e-6 relative in float32); only items that close can swap places. Finding the copies costs
    one integer pass over each input, plus a copy of the distinct rows when there are copies.
    """
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    k = _check_k(k)
    query_block = check_int("query_block", query_block, 1)
    database_block = check_int("database_block", database_block, 1)
    q = _as_float_matrix("queries", queries)
    db = _as_float_matrix("database", database, q.shape[1])
    if q.shape[0] == 0:
        raise ValueError(f"queries: expected at least one query vector, got shape {tuple(q.shape)}")
    if db.shape[0] == 0:
        raise ValueError("database: expected at least one vector, got an empty database")
    if q.shape[1] == 0:
        raise ValueError(f"queries: expected a dimension D >= 1, got shape {tuple(q.shape)} (every score would be 0)")
    k = min(k, db.shape[0])
    dtype = torch.promote_types(q.dtype, db.dtype)
    if dtype in (torch.float16, torch.bfloat16) and q.device.type == "cpu":
        dtype = torch.float32
    q = q.to(dtype)
    query_groups = identical_rows(q)
    db_groups = query_groups if database is queries and db.dtype == q.dtype else identical_rows(db)
    q_distinct = q if query_groups is None else q[query_groups.first]
    db_distinct = db if db_groups is None else db[db_groups.first.to(db.device)]
    # the top k distinct rows are enough: the k best items are copies of at most k distinct rows
    k_distinct = min(k, db_distinct.shape[0])
    out_scores, out_ids = [], []
    for qs in range(0, q_distinct.shape[0], query_block):
        qb = q_distinct[qs : qs + query_block]
        best_key = best_i = None
        for ds in range(0, db_distinct.shape[0], database_block):
            dbb = db_distinct[ds : ds + database_block].to(device=q.device, dtype=dtype)
            key = _search_key(qb, dbb, metric)
            pos = stable_smallest(key, min(k_distinct, key.shape[1]))
            key, i = key.gather(1, pos), pos + ds
            if best_key is not None:  # earlier tiles hold lower indices: position order = index order
                key, i = torch.cat([best_key, key], 1), torch.cat([best_i, i], 1)
                pos = stable_smallest(key, min(k_distinct, key.shape[1]))
                key, i = key.gather(1, pos), i.gather(1, pos)
            best_key, best_i = key, i
        if db_groups is not None:
            best_key, best_i = expand_copies(best_key, best_i, db_groups, k)
        out_scores.append(-best_key if metric == "ip" else best_key)
        out_ids.append(best_i)
    scores, ids = torch.cat(out_scores), torch.cat(out_ids)
    if query_groups is not None:
        inverse = query_groups.inverse.to(scores.device)
        scores, ids = scores[inverse], ids[inverse]
    return scores, ids


def _search_key(qb: torch.Tensor, dbb: torch.Tensor, metric: str) -> torch.Tensor:
    """The tile's ranking key, smaller = better: -q.x for "ip" (exact negation), |q - x|^2 for "l2"."""
    scores = qb @ dbb.T
    if metric == "ip":
        return scores.neg_()
    scores = (qb * qb).sum(1, keepdim=True) + (dbb * dbb).sum(1)[None, :] - 2 * scores
    return scores.clamp_(min=0)


class SearchResult(NamedTuple):
    """Top-k of a :meth:`GalleryIndex.search`: cosine ``scores`` (descending) and gallery ``ids``.

    Rows shorter than k (an IVF/HNSW search that found fewer) are padded with id -1
    and score -inf.
    """

    scores: np.ndarray
    ids: np.ndarray


class GalleryIndex:
    """A searchable gallery of L2-normalised embeddings with metadata.

    Args:
        dim: embedding dimension.
        kind: ``"flat"`` (exact), ``"ivf"``, ``"ivfpq"`` or ``"hnsw"``.
        backend: ``"auto"``, ``"faiss"`` or ``"torch"`` (flat only).
        device: ``"cpu"``, ``"cuda"`` or ``None`` (GPU when FAISS has GPU support /
            for torch when CUDA is available).
        nlist: IVF lists (default ``4 * sqrt(N)`` of the training set, at least 1).
        nprobe: IVF lists visited per query (recall vs speed).
        hnsw_m, ef_construction, ef_search: HNSW graph degree, build and search beams.
        pq_m: IVF-PQ sub-quantisers (bytes per stored vector; must divide ``dim``; default
            :func:`default_pq_m`).
        normalize: L2-normalise embeddings and queries (default True, so scores are cosines).

    Every added vector gets a unique int64 id (consecutive from 0, never reused) and
    optional ``pid``, ``camid`` and ``path``; :meth:`metadata` looks them up by id.
    """

    def __init__(
        self,
        dim: int,
        kind: str = "flat",
        *,
        backend: str = "auto",
        device: Optional[str] = None,
        nlist: Optional[int] = None,
        nprobe: int = 8,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 64,
        normalize: bool = True,
        pq_m: Optional[int] = None,
    ):
        dim = check_int("dim", dim, 1)
        if kind not in INDEX_KINDS:
            raise ValueError(f"kind: expected one of {INDEX_KINDS}, got {kind!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            try:
                import_faiss()
                backend = "faiss"
            except ImportError:
                if kind != "flat":
                    raise
                backend = "torch"
        if backend == "faiss":
            import_faiss()
        if backend == "torch" and kind != "flat":
            raise ValueError(f"kind: backend='torch' supports only kind='flat' (exact), got {kind!r}; {FAISS_HINT}")
        if device not in (None, "cpu", "cuda"):
            raise ValueError(f"device: expected None, 'cpu' or 'cuda', got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device: 'cuda' requested but CUDA is not available")
        if backend == "faiss" and device == "cuda" and not faiss_has_gpu():
            raise RuntimeError(f"device: 'cuda' requested but the installed FAISS has no GPU support; "
                               f"install `faiss-gpu`, or use backend='torch' (exact) on the GPU")
        if kind == "hnsw" and device == "cuda":
            raise ValueError("kind: 'hnsw' runs on the CPU only; use 'flat' or 'ivf' on the GPU")
        for name, value in (("nprobe", nprobe), ("hnsw_m", hnsw_m), ("ef_construction", ef_construction),
                            ("ef_search", ef_search)):
            check_int(name, value, 1)
        if nlist is not None:
            nlist = check_int("nlist", nlist, 1)
        if pq_m is None:
            pq_m = default_pq_m(dim)
        pq_m = check_int("pq_m", pq_m, 1)
        if dim % pq_m:
            raise ValueError(f"pq_m: expected a divisor of dim={dim} (sub-vectors of equal length), got {pq_m}")
        normalize = check_bool("normalize", normalize)
        self.dim = int(dim)
        self.kind = kind
        self.backend = backend
        self.device = device
        self.nlist = nlist
        self._nprobe = int(nprobe)
        self.hnsw_m = int(hnsw_m)
        self.ef_construction = int(ef_construction)
        self._ef_search = int(ef_search)
        self.normalize = bool(normalize)
        self.pq_m = int(pq_m)
        self._next_id = 0
        self._ids = np.zeros(0, dtype=np.int64)
        self._pids = np.zeros(0, dtype=np.int64)
        self._camids = np.zeros(0, dtype=np.int64)
        self._paths: List[str] = []
        self._vectors = torch.zeros(0, self.dim)  # torch backend storage
        self._index = None  # faiss CPU index (IndexIDMap2 around the base index)
        self._gpu_index = None

    # ---------------------------------------------------------------- knobs
    @property
    def nprobe(self) -> int:
        """IVF lists visited per query: higher = better recall, slower."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._nprobe = check_int("nprobe", value, 1)
        self._apply_search_params()

    @property
    def ef_search(self) -> int:
        """HNSW search beam: higher = better recall, slower."""
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self._ef_search = check_int("ef_search", value, 1)
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        if self._index is None:
            return
        faiss = import_faiss()
        base = self._base_index()
        if self.kind in IVF_KINDS:
            base.nprobe = self._nprobe
            if self._gpu_index is not None:
                faiss.GpuParameterSpace().set_index_parameter(self._gpu_index, "nprobe", self._nprobe)
        elif self.kind == "hnsw":
            base.hnsw.efSearch = self._ef_search

    def _torch_device(self) -> torch.device:
        """Where the torch backend keeps its vectors: ``device``, else CUDA when available."""
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    def _base_index(self):
        faiss = import_faiss()
        inner = getattr(self._index, "index", None)
        return faiss.downcast_index(inner) if inner is not None else faiss.downcast_index(self._index)

    # ---------------------------------------------------------------- building
    @property
    def is_trained(self) -> bool:
        return self.kind not in IVF_KINDS or (self._index is not None and self._index.is_trained)

    def __len__(self) -> int:
        return int(self._ids.size)

    def _prepare(self, name: str, x) -> torch.Tensor:
        x = _as_float_matrix(name, x, self.dim).to(torch.float32)
        if self.normalize:
            x = torch.nn.functional.normalize(x, dim=1)
        return x

    def _new_faiss_index(self, nlist: int = 1):
        faiss = import_faiss()
        if self.kind == "flat":
            base = faiss.IndexFlatIP(self.dim)
        elif self.kind == "ivf":
            quantizer = faiss.IndexFlatIP(self.dim)
            base = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            base.nprobe = self._nprobe
        elif self.kind == "ivfpq":
            quantizer = faiss.IndexFlatIP(self.dim)
            base = faiss.IndexIVFPQ(quantizer, self.dim, nlist, self.pq_m, PQ_BITS, faiss.METRIC_INNER_PRODUCT)
            base.nprobe = self._nprobe
        else:
            base = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efConstruction = self.ef_construction
            base.hnsw.efSearch = self._ef_search
        if self.kind in IVF_KINDS:
            return base  # IVF stores external ids itself (and IndexIDMap's removal assumes flat renumbering)
        return faiss.IndexIDMap2(base)  # faiss's Python layer keeps `base` referenced

    def train(self, embeddings) -> None:
        """Train the IVF coarse quantiser (and IVF-PQ's codebooks; no-op for flat/HNSW). Needs at
        least ``nlist`` vectors (IVF-PQ: also 256, one per centroid of a sub-quantiser)."""
        if self.kind not in IVF_KINDS:
            return
        x = self._prepare("embeddings", embeddings)
        nlist = self.nlist or max(1, int(4 * np.sqrt(x.shape[0])))
        if x.shape[0] < nlist:
            raise ValueError(f"embeddings: IVF training needs at least nlist={nlist} vectors, got {x.shape[0]}")
        if self.kind == "ivfpq" and x.shape[0] < 2 ** PQ_BITS:
            raise ValueError(f"embeddings: IVF-PQ training needs at least {2 ** PQ_BITS} vectors (one per "
                             f"sub-quantiser centroid), got {x.shape[0]}")
        if len(self):
            raise RuntimeError("train: the index already holds vectors; train before adding")
        self.nlist = nlist
        self._index = self._new_faiss_index(nlist)
        self._index.train(x.cpu().numpy())
        self._gpu_index = None

    def add(self, embeddings, pids=None, camids=None, paths: Optional[Sequence[str]] = None) -> np.ndarray:
        """Add embeddings (N, dim) with optional metadata; returns their new ids.

        An untrained IVF index is trained on this first batch.
        """
        x = self._prepare("embeddings", embeddings)
        n = x.shape[0]
        pids = self._meta_array("pids", pids, n)
        camids = self._meta_array("camids", camids, n)
        if paths is None:
            paths = [""] * n
        elif len(paths) != n or not all(isinstance(p, str) for p in paths):
            raise ValueError(f"paths: expected {n} strings (one per embedding), got {len(paths)} items")
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        if self.backend == "torch":
            device = self._torch_device()
            self._vectors = torch.cat([self._vectors.to(device), x.to(device)])
        else:
            if self._index is None:
                if self.kind in IVF_KINDS:
                    self.train(x)
                else:
                    self._index = self._new_faiss_index()
            self._index.add_with_ids(x.cpu().numpy(), ids)
            self._gpu_index = None  # rebuilt lazily on the next GPU search
        self._next_id += n
        self._ids = np.concatenate([self._ids, ids])
        self._pids = np.concatenate([self._pids, pids])
        self._camids = np.concatenate([self._camids, camids])
        self._paths.extend(paths)
        return ids

    @staticmethod
    def _meta_array(name: str, value, n: int) -> np.ndarray:
        if value is None:
            return np.full(n, -1, dtype=np.int64)
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if arr.shape != (n,):
            raise ValueError(f"{name}: expected {n} integers (one per embedding), got shape {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.integer) or n == 0):
            raise TypeError(f"{name}: expected {n} integers (one per embedding), got dtype {arr.dtype}")
        return arr.astype(np.int64)

    def remove(self, ids) -> int:
        """Remove vectors by id; returns how many were removed. Unknown ids raise ``KeyError``."""
        ids = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        unknown = np.setdiff1d(ids, self._ids)
        if unknown.size:
            raise KeyError(f"ids: not in the index: {unknown[:10].tolist()}")
        keep = ~np.isin(self._ids, ids)
        if self.backend == "torch":
            self._vectors = self._vectors[torch.from_numpy(keep).to(self._vectors.device)]
        elif self.kind == "hnsw":
            # HNSW cannot delete: rebuild from the stored vectors of the survivors.
            faiss = import_faiss()
            vectors = self._base_index().reconstruct_n(0, self._index.ntotal)
            order = faiss.vector_to_array(self._index.id_map)
            row = {int(i): r for r, i in enumerate(order)}
            survivors = self._ids[keep]
            self._index = self._new_faiss_index()
            if survivors.size:
                self._index.add_with_ids(vectors[[row[int(i)] for i in survivors]], survivors)
        else:
            faiss = import_faiss()
            self._index.remove_ids(faiss.IDSelectorBatch(ids.size, faiss.swig_ptr(ids)))
        self._gpu_index = None
        self._ids, self._pids, self._camids = self._ids[keep], self._pids[keep], self._camids[keep]
        self._paths = [p for p, k in zip(self._paths, keep) if k]
        return int(ids.size)

    # ---------------------------------------------------------------- search
    def _searcher(self):
        use_gpu = self.kind != "hnsw" and self.device != "cpu" and faiss_has_gpu()
        if not use_gpu:
            return self._index
        if self._gpu_index is None:
            faiss = import_faiss()
            if not hasattr(self, "_gpu_resources"):
                self._gpu_resources = faiss.StandardGpuResources()
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._index)
            self._apply_search_params()
        return self._gpu_index

    def search(self, queries, k: int = 10, *, batch_size: int = 16384) -> SearchResult:
        """Top-``k`` gallery ids and cosine scores for each query row, in query batches."""
        k = _check_k(k)
        batch_size = check_int("batch_size", batch_size, 1)
        q = self._prepare("queries", queries)
        if len(self) == 0:
            raise ValueError("search: the index is empty (add embeddings first)")
        scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
        ids = np.full((q.shape[0], k), -1, dtype=np.int64)
        for start in range(0, q.shape[0], batch_size):
            qb = q[start : start + batch_size]
            if self.backend == "torch":
                s, rows = exact_search(qb.to(self._vectors.device), self._vectors, k)
                s, rows = s.cpu().numpy(), rows.cpu().numpy()
                found = self._ids[rows]
            else:
                s, found = self._searcher().search(qb.cpu().numpy(), k)
                s = np.where(found < 0, -np.inf, s)
            width = s.shape[1]
            scores[start : start + qb.shape[0], :width] = s
            ids[start : start + qb.shape[0], :width] = found
        return SearchResult(scores, ids)

    def metadata(self, ids) -> Tuple[np.ndarray, np.ndarray, List[str]]:
        """(pids, camids, paths) of the given ids (any shape); id -1 gives pid/camid -1, path ''."""
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(self._ids)
        pos = np.searchsorted(self._ids, ids.reshape(-1), sorter=order).clip(0, max(len(self) - 1, 0))
        rows = order[pos] if len(self) else np.zeros_like(pos)
        ok = (ids.reshape(-1) >= 0) & (len(self) > 0)
        if len(self):
            ok &= self._ids[rows] == ids.reshape(-1)
        bad = ids.reshape(-1)[(ids.reshape(-1) >= 0) & ~ok]
        if bad.size:
            raise KeyError(f"ids: not in the index: {bad[:10].tolist()}")
        pids = np.where(ok, self._pids[rows] if len(self) else -1, -1).reshape(ids.shape)
        camids = np.where(ok, self._camids[rows] if len(self) else -1, -1).reshape(ids.shape)
        paths = [self._paths[r] if o else "" for r, o in zip(rows, ok)]
        return pids, camids, paths

    # ---------------------------------------------------------------- FAISS's own file format
    @property
    def faiss_index(self):
        """The CPU FAISS index (ids = this index's ids), for ``faiss.write_index``; None for the
        torch backend or before the first ``add``."""
        return self._index

    @classmethod
    def from_faiss(cls, loaded, kind: str, *, pids=None, camids=None, paths: Optional[Sequence[str]] = None,
                   nprobe: int = 8, ef_search: int = 64, device: Optional[str] = None,
                   name: str = "index") -> "GalleryIndex":
        """A :class:`GalleryIndex` around a FAISS index read with ``faiss.read_index`` (one this
        class built, ids 0..N-1 in the order of ``pids``/``camids``/``paths``). The index is
        checked against ``kind`` and the metadata; ``name`` names the file in the errors."""
        faiss = import_faiss()
        if kind not in INDEX_KINDS:
            raise ValueError(f"kind: expected one of {INDEX_KINDS}, got {kind!r}")
        base = faiss.downcast_index(getattr(loaded, "index", loaded))
        if not type(base).__name__.startswith(_FAISS_KINDS[kind]):
            raise ValueError(f"{name}: expected a FAISS {_FAISS_KINDS[kind]} (kind {kind!r}), got "
                             f"{type(base).__name__}")
        pq_m = base.pq.M if kind == "ivfpq" else None
        index = cls(loaded.d, kind, backend="faiss", device=device, nlist=getattr(base, "nlist", None),
                    nprobe=nprobe, ef_search=ef_search, pq_m=pq_m)
        n = int(loaded.ntotal)
        index._ids = np.arange(n, dtype=np.int64)
        stored = np.sort(_faiss_ids(faiss, loaded, base))
        if not np.array_equal(stored, index._ids):
            raise ValueError(f"{name}: its FAISS index holds {n} vectors whose ids are not 0..{n - 1}")
        index._pids = index._meta_array("pids", pids, n)
        index._camids = index._meta_array("camids", camids, n)
        index._paths = list(paths) if paths is not None else [""] * n
        if len(index._paths) != n:
            raise ValueError(f"{name}: its FAISS index holds {n} vectors but {len(index._paths)} paths were given")
        index._next_id = n
        index._index = loaded
        index._apply_search_params()
        return index

    # ---------------------------------------------------------------- persistence
    def _config(self) -> dict:
        return {
            "format_version": _FORMAT_VERSION, "dim": self.dim, "kind": self.kind, "backend": self.backend,
            "nlist": self.nlist, "nprobe": self._nprobe, "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction, "ef_search": self._ef_search,
            "normalize": self.normalize, "next_id": self._next_id, "pq_m": self.pq_m,
        }

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write index + metadata to one ``.npz`` file atomically and durably (temp file, ``fsync``,
        rename, ``fsync`` of the folder)."""
        path = os.fspath(path)
        arrays = {
            "config": np.frombuffer(json.dumps(self._config()).encode(), dtype=np.uint8),
            "ids": self._ids, "pids": self._pids, "camids": self._camids,
            "paths": np.frombuffer(json.dumps(self._paths).encode(), dtype=np.uint8),
        }
        if self.backend == "torch":
            arrays["vectors"] = self._vectors.cpu().numpy()
        elif self._index is not None:
            arrays["faiss_index"] = import_faiss().serialize_index(self._index)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".gallery-index-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **arrays)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        fsync_folder(directory)  # the rename itself on disk: survives a power cut, not only a crash

    @classmethod
    def load(cls, path: Union[str, os.PathLike], *, device: Optional[str] = None) -> "GalleryIndex":
        """Read an index written by :meth:`save`.

        The file is checked before anything is used: a file that is not a readable ``.npz``
        (empty, truncated, random bytes), lacks an entry, or whose vectors / FAISS index / ids
        disagree with its metadata (dimension, counts, ids) raises ``ValueError`` naming the file
        and what is wrong, instead of failing later in a search.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no saved GalleryIndex at {path!r}")
        arrays = _read_npz(path)
        config = _decode_json(path, arrays, "config", dict)
        if config.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"path: {path!r}: unsupported GalleryIndex format {config.get('format_version')!r} "
                             f"(expected {_FORMAT_VERSION})")
        missing = [key for key in _CONFIG_KEYS if key not in config]
        if missing:
            raise ValueError(f"path: {path!r} is not a valid GalleryIndex file: its config lacks {missing}")
        try:
            index = cls(config["dim"], config["kind"], backend=config["backend"], device=device,
                        nlist=config["nlist"], nprobe=config["nprobe"], hnsw_m=config["hnsw_m"],
                        ef_construction=config["ef_construction"], ef_search=config["ef_search"],
                        normalize=config["normalize"], pq_m=config.get("pq_m"))
        except (TypeError, ValueError) as error:
            raise ValueError(f"path: {path!r} is not a valid GalleryIndex file: its config is invalid ({error})") \
                from error
        index._ids, index._pids, index._camids = (_id_array(path, arrays, key) for key in ("ids", "pids", "camids"))
        index._paths = _decode_json(path, arrays, "paths", list)
        index._next_id = _check_saved_ids(path, index._ids, index._pids, index._camids, index._paths,
                                          config["next_id"])
        if index.backend == "torch":
            index._vectors = _saved_vectors(path, arrays, len(index), index.dim).to(index._torch_device())
        elif "faiss_index" in arrays:
            index._index = _saved_faiss_index(path, arrays["faiss_index"], index)
            index._apply_search_params()
        elif len(index):
            raise ValueError(f"path: {path!r} is not a valid GalleryIndex file: {len(index)} ids but no "
                             f"'faiss_index' entry")
        return index


_CONFIG_KEYS = ("dim", "kind", "backend", "nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search", "normalize",
                "next_id")


def _read_npz(path: str) -> dict:
    """Every array of the ``.npz`` at ``path``, read now; a file numpy cannot read is a ``ValueError``."""
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):  # a bare .npy array, not an .npz archive
            raise ValueError("a single array, not an .npz archive")
        with data:
            return {key: data[key] for key in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as error:
        reason = "empty file" if os.path.getsize(path) == 0 else f"{type(error).__name__}: {error}"
        raise ValueError(f"path: {path!r} is not a readable GalleryIndex file ({reason})") from error


def _decode_json(path: str, arrays: dict, key: str, kind: type):
    if key not in arrays:
        raise ValueError(f"path: {path!r} is not a GalleryIndex file (no {key!r} entry)")
    try:
        value = json.loads(bytes(arrays[key]).decode())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"path: {path!r}: its {key!r} entry is not valid JSON ({error})") from error
    if not isinstance(value, kind):
        raise ValueError(f"path: {path!r}: its {key!r} entry should hold a JSON {kind.__name__}, got "
                         f"{type(value).__name__}")
    return value


def _id_array(path: str, arrays: dict, key: str) -> np.ndarray:
    if key not in arrays:
        raise ValueError(f"path: {path!r} is not a valid GalleryIndex file (no {key!r} entry)")
    value = arrays[key]
    if value.ndim != 1 or not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"path: {path!r}: its {key!r} entry should be a 1-D integer array, got shape "
                         f"{value.shape} dtype {value.dtype}")
    return value.astype(np.int64)


def _check_saved_ids(path: str, ids, pids, camids, paths, next_id) -> int:
    """Counts agree, ids are distinct and below ``next_id``; returns ``next_id``."""
    n = ids.size
    for key, value in (("pids", pids.size), ("camids", camids.size), ("paths", len(paths))):
        if value != n:
            raise ValueError(f"path: {path!r} is inconsistent: {n} ids but {value} {key}")
    if not all(isinstance(p, str) for p in paths):
        raise ValueError(f"path: {path!r}: its 'paths' entry should hold strings")
    if isinstance(next_id, bool) or not isinstance(next_id, int):
        raise ValueError(f"path: {path!r}: its config's next_id should be an int, got {next_id!r}")
    if n and (ids.min() < 0 or ids.max() >= next_id or np.unique(ids).size != n):
        raise ValueError(f"path: {path!r} is inconsistent: ids should be distinct and in [0, next_id={next_id})")
    return next_id


def _saved_vectors(path: str, arrays: dict, n: int, dim: int) -> torch.Tensor:
    if "vectors" not in arrays:
        raise ValueError(f"path: {path!r} is not a valid GalleryIndex file (backend 'torch' but no 'vectors' entry)")
    vectors = arrays["vectors"]
    if vectors.shape != (n, dim) or vectors.dtype != np.float32:
        raise ValueError(f"path: {path!r} is inconsistent: expected float32 vectors of shape ({n}, {dim}) (ids, "
                         f"dim), got shape {vectors.shape} dtype {vectors.dtype}")
    if not np.isfinite(vectors).all():
        raise ValueError(f"path: {path!r}: its vectors hold NaN/inf")
    return torch.from_numpy(vectors.copy())


_FAISS_KINDS = {"flat": "IndexFlat", "ivf": "IndexIVFFlat", "ivfpq": "IndexIVFPQ", "hnsw": "IndexHNSWFlat"}


def _saved_faiss_index(path: str, blob: np.ndarray, index: "GalleryIndex"):
    """The deserialised FAISS index, checked against the metadata (kind, dim, count, ids)."""
    faiss = import_faiss()
    try:
        loaded = faiss.deserialize_index(np.ascontiguousarray(blob, dtype=np.uint8))
    except Exception as error:  # faiss raises RuntimeError with its C++ message
        raise ValueError(f"path: {path!r}: its 'faiss_index' entry cannot be read ({error})") from error
    base = faiss.downcast_index(getattr(loaded, "index", loaded))
    if not type(base).__name__.startswith(_FAISS_KINDS[index.kind]):
        raise ValueError(f"path: {path!r} is inconsistent: kind {index.kind!r} but a {type(base).__name__}")
    if loaded.d != index.dim:
        raise ValueError(f"path: {path!r} is inconsistent: dim {index.dim} in its config, {loaded.d} in its index")
    if loaded.ntotal != len(index):
        raise ValueError(f"path: {path!r} is inconsistent: {len(index)} ids but {loaded.ntotal} vectors in its index")
    stored = np.sort(_faiss_ids(faiss, loaded, base))
    if not np.array_equal(stored, np.sort(index._ids)):
        raise ValueError(f"path: {path!r} is inconsistent: the ids of its index differ from its 'ids' entry")
    return loaded


def _faiss_ids(faiss, loaded, base) -> np.ndarray:
    """The external ids a FAISS index holds: an IndexIDMap2's map, or an IVF index's inverted lists."""
    if hasattr(loaded, "id_map"):
        return faiss.vector_to_array(loaded.id_map)
    lists = base.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
             for i in range(base.nlist) if lists.list_size(i)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
