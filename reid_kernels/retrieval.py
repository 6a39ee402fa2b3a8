"""Nearest-neighbour search over ReID embeddings: exact torch search and a FAISS-backed gallery index.

* :func:`exact_search` -- pure torch, exact: chunked matmul + ``topk`` with a running
  merge over gallery blocks, so the (query x gallery) matrix never materialises. Runs
  wherever the tensors are (CPU or CUDA), no FAISS needed.
* :class:`GalleryIndex` -- an index over L2-normalised embeddings (inner product =
  cosine similarity) with person ids, cameras and paths attached to every vector.
  Kinds: ``"flat"`` (exact), ``"ivf"`` (inverted lists; knob ``nprobe``), ``"hnsw"``
  (graph, CPU; knob ``ef_search``). Backends: ``"faiss"`` (``pip install faiss-cpu``;
  ``faiss-gpu`` for GPU -- used for flat/IVF when a GPU build and CUDA are present) or
  ``"torch"`` (flat only, exact, CPU or CUDA). ``backend="auto"`` picks FAISS when it
  imports, torch otherwise (flat).

Ties: :func:`exact_search` orders each result row by decreasing score; equal scores
keep ``torch.topk``'s order (which item wins a tie at the k-th place is unspecified).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["exact_search", "SearchResult", "GalleryIndex", "import_faiss", "faiss_has_gpu"]

FAISS_HINT = "install it with `pip install faiss-cpu` (or `faiss-gpu` for GPU search)"
INDEX_KINDS = ("flat", "ivf", "hnsw")
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
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    return int(k)


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
    """
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    k = _check_k(k)
    q = _as_float_matrix("queries", queries)
    db = _as_float_matrix("database", database, q.shape[1])
    if db.shape[0] == 0:
        raise ValueError("database: expected at least one vector, got an empty database")
    k = min(k, db.shape[0])
    dtype = torch.promote_types(q.dtype, db.dtype)
    if dtype in (torch.float16, torch.bfloat16) and q.device.type == "cpu":
        dtype = torch.float32
    q = q.to(dtype)
    largest = metric == "ip"
    out_scores, out_ids = [], []
    for qs in range(0, q.shape[0], query_block):
        qb = q[qs : qs + query_block]
        best_s = best_i = None
        for ds in range(0, db.shape[0], database_block):
            dbb = db[ds : ds + database_block].to(device=q.device, dtype=dtype)
            scores = qb @ dbb.T
            if metric == "l2":
                scores = (qb * qb).sum(1, keepdim=True) + (dbb * dbb).sum(1)[None, :] - 2 * scores
                scores.clamp_(min=0)
            kk = min(k, scores.shape[1])
            s, i = torch.topk(scores, kk, dim=1, largest=largest)
            i = i + ds
            if best_s is not None:
                s = torch.cat([best_s, s], 1)
                i = torch.cat([best_i, i], 1)
                s, pos = torch.topk(s, min(k, s.shape[1]), dim=1, largest=largest)
                i = i.gather(1, pos)
            best_s, best_i = s, i
        out_scores.append(best_s)
        out_ids.append(best_i)
    return torch.cat(out_scores), torch.cat(out_ids)


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
        kind: ``"flat"`` (exact), ``"ivf"`` or ``"hnsw"``.
        backend: ``"auto"``, ``"faiss"`` or ``"torch"`` (flat only).
        device: ``"cpu"``, ``"cuda"`` or ``None`` (GPU when FAISS has GPU support /
            for torch when CUDA is available).
        nlist: IVF lists (default ``4 * sqrt(N)`` of the training set, at least 1).
        nprobe: IVF lists visited per query (recall vs speed).
        hnsw_m, ef_construction, ef_search: HNSW graph degree, build and search beams.
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
    ):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim: expected an int >= 1, got {dim!r}")
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
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if nlist is not None and (isinstance(nlist, bool) or not isinstance(nlist, (int, np.integer)) or nlist < 1):
            raise ValueError(f"nlist: expected an int >= 1 or None, got {nlist!r}")
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
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"nprobe: expected an int >= 1, got {value!r}")
        self._nprobe = int(value)
        self._apply_search_params()

    @property
    def ef_search(self) -> int:
        """HNSW search beam: higher = better recall, slower."""
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"ef_search: expected an int >= 1, got {value!r}")
        self._ef_search = int(value)
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        if self._index is None:
            return
        faiss = import_faiss()
        base = self._base_index()
        if self.kind == "ivf":
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
        return self.kind != "ivf" or (self._index is not None and self._index.is_trained)

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
        else:
            base = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efConstruction = self.ef_construction
            base.hnsw.efSearch = self._ef_search
        if self.kind == "ivf":
            return base  # IVF stores external ids itself (and IndexIDMap's removal assumes flat renumbering)
        return faiss.IndexIDMap2(base)  # faiss's Python layer keeps `base` referenced

    def train(self, embeddings) -> None:
        """Train the IVF coarse quantiser (no-op for flat/HNSW). Needs at least ``nlist`` vectors."""
        if self.kind != "ivf":
            return
        x = self._prepare("embeddings", embeddings)
        nlist = self.nlist or max(1, int(4 * np.sqrt(x.shape[0])))
        if x.shape[0] < nlist:
            raise ValueError(f"embeddings: IVF training needs at least nlist={nlist} vectors, got {x.shape[0]}")
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
                if self.kind == "ivf":
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
        if arr.shape != (n,) or not (np.issubdtype(arr.dtype, np.integer) or n == 0):
            raise ValueError(f"{name}: expected {n} integers (one per embedding), got shape {arr.shape} "
                             f"dtype {arr.dtype}")
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
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
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

    # ---------------------------------------------------------------- persistence
    def _config(self) -> dict:
        return {
            "format_version": _FORMAT_VERSION, "dim": self.dim, "kind": self.kind, "backend": self.backend,
            "nlist": self.nlist, "nprobe": self._nprobe, "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction, "ef_search": self._ef_search,
            "normalize": self.normalize, "next_id": self._next_id,
        }

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write index + metadata to one ``.npz`` file atomically (temp file, then rename)."""
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

    @classmethod
    def load(cls, path: Union[str, os.PathLike], *, device: Optional[str] = None) -> "GalleryIndex":
        """Read an index written by :meth:`save`."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no saved GalleryIndex at {path!r}")
        with np.load(path, allow_pickle=False) as data:
            if "config" not in data.files:
                raise ValueError(f"path: {path!r} is not a GalleryIndex file (no 'config' entry)")
            config = json.loads(bytes(data["config"]).decode())
            if config.get("format_version") != _FORMAT_VERSION:
                raise ValueError(f"path: unsupported GalleryIndex format {config.get('format_version')!r}")
            index = cls(config["dim"], config["kind"], backend=config["backend"], device=device,
                        nlist=config["nlist"], nprobe=config["nprobe"], hnsw_m=config["hnsw_m"],
                        ef_construction=config["ef_construction"], ef_search=config["ef_search"],
                        normalize=config["normalize"])
            index._next_id = int(config["next_id"])
            index._ids = data["ids"].astype(np.int64)
            index._pids = data["pids"].astype(np.int64)
            index._camids = data["camids"].astype(np.int64)
            index._paths = json.loads(bytes(data["paths"]).decode())
            if "vectors" in data.files:
                index._vectors = torch.from_numpy(data["vectors"].copy()).to(index._torch_device())
            if "faiss_index" in data.files:
                faiss = import_faiss()
                index._index = faiss.deserialize_index(data["faiss_index"].copy())
                index._apply_search_params()
        return index
