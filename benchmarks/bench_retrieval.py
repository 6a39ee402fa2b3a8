"""Benchmark: retrieval and evaluation (issue 3, item 7).

Cases
  sysu    Full SYSU-MM01 protocol evaluation (4 settings x 10 trials, 3,803 queries,
          2,048-d; synthetic features on a synthetic folder tree in the real layout):
          reid_kernels.protocols.evaluate_sysu vs the community pipeline (AGW
          process_gallery_sysu draws + numpy matmul + per-query eval_sysu loop, written
          out below). The reference loop runs on the same distance matrices as ours, so
          the numbers must be identical; it is timed on --ref-trials trials per setting
          and scaled to all trials (it takes minutes per setting).
  search  Exact top-k search throughput (torch, FAISS flat) and FAISS IVF / HNSW recall@10
          vs speed on a clustered gallery (CPU: 100k x 2048, 10k queries; GPU: 1M x 2048).
  scale   Gallery size 10k -> 1M at d = 2048 (ResNet-50's) and d = 128 (the synthetic model's):
          build time, memory, queries/s and recall@1/@10 against exact search, for
          reid_kernels.exact_search, FAISS flat, IVF-Flat, IVF-PQ and HNSW in one run, on a
          Gaussian-mixture gallery (identities x 10 images, L2-normalised), with the index
          parameters `python -m training.index` uses. A step whose time (extrapolated from the
          sizes measured so far on a log-log line) or memory would pass the caps is skipped and
          said so in the JSON; a PNG is drawn next to the JSON (benchmarks/results/retrieval_scale_cpu.png).
  rerank  k-reciprocal re-ranking (kNN-graph version vs the dense classic algorithm) and
          AIM (dense vs kNN) at a 3k gallery; kNN versions alone at a 50k gallery (2048-d on
          a GPU, 256-d on a CPU).

Usage
  python benchmarks/bench_retrieval.py --quick                 # small sizes, ~1 min on 2 cores
  python benchmarks/bench_retrieval.py --cases sysu            # the headline, ~2 min on 2 cores
  python benchmarks/bench_retrieval.py --json out.json         # everything, JSON results
  python benchmarks/bench_retrieval.py --device cuda --json out.json   # on a GPU (torch search if no faiss)
  python benchmarks/bench_retrieval.py --smoke                 # tiny sizes: the code paths only, seconds
  nice -n 10 python benchmarks/bench_retrieval.py --cases scale --json benchmarks/results/retrieval_scale_cpu.json

--device auto (the default) takes the GPU when torch sees one.  On CUDA each timed row also
reports peak_bytes: torch.cuda.max_memory_allocated() during the call above what was allocated
before it (tensors only).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from typing import Callable, Dict, List

import numpy as np
import torch

from reid_kernels import protocols
from reid_kernels.rerank import aim, k_reciprocal_rerank, k_reciprocal_rerank_dense
from reid_kernels.retrieval import GalleryIndex, exact_search, faiss_has_gpu

from _common import environment, write_json  # noqa: E402  (benchmarks/, the script's folder)


# ----------------------------------------------------------------------------- helpers
PEAKS: List[int] = []  # peak bytes of each timed() call on CUDA, in call order (peak_of_last())


def timed(fn: Callable, repeat: int = 1):
    """(best wall seconds over `repeat` runs, last result); on CUDA also records the peak memory."""
    best, result = float("inf"), None
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.init()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    PEAKS.append(torch.cuda.max_memory_allocated() - before if cuda else None)
    return best, result


def peak_of_last():
    """Peak bytes of the last timed() call on CUDA, None without a GPU."""
    return PEAKS[-1] if PEAKS else None


def print_table(title: str, rows: List[Dict[str, object]]) -> None:
    if not rows:
        return
    keys = list(rows[0].keys())
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print(f"\n## {title}")
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ----------------------------------------------------------------------------- community reference
def reference_eval_sysu(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20):
    """The AGW cross-modal baseline's eval_sysu, per query (semantics written out plainly)."""
    num_q, num_g = distmat.shape
    indices = np.argsort(distmat, axis=1)
    pred_label = g_pids[indices]
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    new_all_cmc, all_ap, all_inp, num_valid = [], [], [], 0
    for q in range(num_q):
        order = indices[q]
        keep = np.invert((q_camids[q] == 3) & (g_camids[order] == 2))
        ranked = pred_label[q][keep]
        first = np.unique(ranked, return_index=True)[1]
        collapsed = np.asarray([ranked[i] for i in sorted(first)])
        new_all_cmc.append((collapsed == q_pids[q]).astype(np.int32).cumsum()[:max_rank])
        orig = matches[q][keep]
        if not np.any(orig):
            continue
        cmc = orig.cumsum()
        last = np.max(np.where(orig == 1))
        all_inp.append(cmc[last] / (last + 1.0))
        num_valid += 1
        precision = np.asarray([x / (i + 1.0) for i, x in enumerate(orig.cumsum())]) * orig
        all_ap.append(precision.sum() / orig.sum())
    cmc = np.asarray(new_all_cmc).astype(np.float32).sum(0) / num_valid
    return cmc, float(np.mean(all_ap)), float(np.mean(all_inp))


def reference_gallery(root, mode, trial):
    """AGW process_gallery_sysu (single-shot) / its multi-shot variant, on the folder tree."""
    random.seed(trial)
    np.random.seed(trial)
    cams = ["cam1", "cam2", "cam4", "cam5"] if mode == "all" else ["cam1", "cam2"]
    ids = open(os.path.join(root, "exp", "test_id.txt")).read().splitlines()[0].split(",")
    files = {"single": [], "multi": []}
    for pid in sorted("%04d" % int(x) for x in ids):
        for cam in cams:
            folder = os.path.join(root, cam, pid)
            if os.path.isdir(folder):
                files["single"].append(sorted(folder + "/" + f for f in os.listdir(folder)))
    single = [random.choice(f) for f in files["single"]]
    np.random.seed(trial)
    multi = [str(x) for f in files["single"] for x in np.random.choice(f, 10, replace=False)]
    return {"single": single, "multi": multi}


# ----------------------------------------------------------------------------- SYSU case
def build_sysu_tree(root: str, num_ids: int, num_queries: int, images_per_folder: int, seed: int = 0):
    """Folders in the real layout; 301 of the 384 visible identity-camera folders exist (as in SYSU)."""
    rng = np.random.default_rng(seed)
    ids = list(range(1, num_ids + 1))
    visible = [(cam, pid) for pid in ids for cam in (1, 2, 4, 5)]
    drop = int(round(len(visible) * 83 / 384))
    present = [visible[i] for i in sorted(rng.choice(len(visible), len(visible) - drop, replace=False))]
    ir = [(cam, pid) for pid in ids for cam in (3, 6)]
    per_folder = np.full(len(ir), num_queries // len(ir))
    per_folder[: num_queries - per_folder.sum()] += 1
    for (cam, pid), count in list(zip(ir, per_folder)) + [(f, images_per_folder) for f in present]:
        folder = os.path.join(root, f"cam{cam}", f"{pid:04d}")
        os.makedirs(folder, exist_ok=True)
        for n in range(1, int(count) + 1):
            open(os.path.join(folder, f"{n:04d}.jpg"), "wb").close()
    for cam in range(1, 7):
        os.makedirs(os.path.join(root, f"cam{cam}"), exist_ok=True)
    os.makedirs(os.path.join(root, "exp"), exist_ok=True)
    with open(os.path.join(root, "exp", "test_id.txt"), "w") as handle:
        handle.write(",".join(str(i) for i in ids) + "\n")


def synthetic_features(paths: List[str], dim: int, seed: int = 0) -> torch.Tensor:
    """Identity centres + modality shift + noise: realistic-looking (R1 ~ 30-60%) retrieval."""
    gen = torch.Generator().manual_seed(seed)
    pids = torch.tensor([int(p.split("/")[1]) for p in paths])
    ir = torch.tensor([p.split("/")[0] in ("cam3", "cam6") for p in paths])
    centres = torch.randn(int(pids.max()) + 1, dim, generator=gen)
    shift = torch.randn(dim, generator=gen)
    noise = torch.randn(len(paths), dim, generator=gen)
    sigma = 2.4 * (dim / 256) ** 0.3  # R1 around 50% at any dimension
    return centres[pids] + 0.8 * ir[:, None].float() * shift + sigma * noise


def case_sysu(args) -> Dict[str, object]:
    quick = args.quick
    num_ids, num_queries, dim = (96, 3803, 2048) if not quick else (40, 800, 256)
    trials = 10 if not quick else 2
    if args.smoke:
        num_ids, num_queries, dim, trials = 30, 120, 32, 1  # >= 20 identities per gallery (max_rank)
    ref_trials = min(args.ref_trials if args.ref_trials is not None else 1, trials)
    with tempfile.TemporaryDirectory() as root:
        build_sysu_tree(root, num_ids, num_queries, images_per_folder=20)
        dataset = protocols.SYSUMM01(root)
        everything = list(dataset.query().paths)
        for cam in (1, 2, 4, 5):
            for pid in dataset.test_ids:
                everything += [f"cam{cam}/{pid:04d}/{n}" for n in dataset.folder_entries(cam, pid) or []]
        # float64 by default: float32 cosine distances of 3,010 items tie within a row every few
        # rows, and at a tie the community code's unstable np.argsort order is arbitrary, so
        # exact agreement is only defined on tie-free matrices (see tied_rows_float32)
        feats = synthetic_features(everything, dim).to(getattr(torch, args.dtype))
        table_source = protocols.FeatureTable(everything, feats)

        device = "cuda" if args.device == "cuda" else None
        ours_s, table = timed(lambda: protocols.evaluate_sysu(dataset, table_source, trials=trials, device=device))
        ours_peak = peak_of_last()

        # The same distance matrices evaluate_sysu used (same union, same matmul), for the reference loop.
        query = dataset.query()
        galleries = {(m, s, t): dataset.gallery(m, s, t) for m in protocols.SYSU_MODES
                     for s in protocols.SYSU_SHOTS for t in range(trials)}
        candidates = protocols._union(list(galleries.values()))
        mapping = table_source.as_mapping()
        qf = protocols._extract(mapping, query, "q")
        cf = protocols._extract(mapping, candidates, "g")
        if device is not None:
            qf, cf = qf.to(device), cf.to(device)
        shared = protocols._distance(qf, cf, "cosine").cpu().numpy()
        column = {p: i for i, p in enumerate(candidates.paths)}
        qn = torch.nn.functional.normalize(qf, dim=1).cpu().numpy()
        cn = torch.nn.functional.normalize(cf, dim=1).cpu().numpy()

        ref_seconds, rows = 0.0, []
        checks = {"galleries_identical": True, "cmc_identical": True, "mAP_max_abs_diff": 0.0,
                  "mINP_max_abs_diff": 0.0}
        for setting in table.settings:
            mode, shot = setting.name.split(" / ")
            shot = shot.replace("-shot", "")
            spent = 0.0
            for t in range(ref_trials):
                start = time.perf_counter()
                files = reference_gallery(root, mode, t)[shot]
                rel = [os.path.relpath(f, root).replace(os.sep, "/") for f in files]
                cols = np.asarray([column[p] for p in rel])
                _ = -np.matmul(qn, cn[cols].T)  # the reference's own distance computation, timed
                g_pids = np.asarray([int(p.split("/")[1]) for p in rel])
                g_cams = np.asarray([int(p[3]) for p in rel])
                cmc, mAP, mINP = reference_eval_sysu(shared[:, cols], query.pids, g_pids, query.cams, g_cams)
                spent += time.perf_counter() - start
                ours = setting.trials[t]
                checks["galleries_identical"] &= list(galleries[(mode, shot, t)].paths) == rel
                checks["cmc_identical"] &= bool(np.array_equal(ours.cmc.astype(np.float32), cmc))
                checks["mAP_max_abs_diff"] = max(checks["mAP_max_abs_diff"], abs(ours.mAP - mAP))
                checks["mINP_max_abs_diff"] = max(checks["mINP_max_abs_diff"], abs(ours.mINP - mINP))
            ref_seconds += spent * trials / ref_trials
            rows.append({"setting": setting.name, "gallery": len(galleries[(mode, shot, 0)]),
                         "R1": 100 * setting.mean("R1"), "mAP": 100 * setting.mean("mAP"),
                         "ref_s_per_trial": spent / ref_trials})
        # how often float32 distances tie within a row (all-search multi-shot, trial 0)
        cols = [column[p] for p in galleries[("all", "multi", 0)].paths]
        d32 = protocols._distance(qf.float(), cf.float()[cols], "cosine")
        sorted32 = torch.sort(d32, dim=1).values
        tied_rows_float32 = int((sorted32[:, 1:] == sorted32[:, :-1]).any(1).sum())
    identical = (checks["galleries_identical"] and checks["cmc_identical"]
                 and checks["mAP_max_abs_diff"] <= 1e-12 and checks["mINP_max_abs_diff"] <= 1e-12)
    print_table(f"SYSU protocol ({num_queries} queries, {dim}-d {args.dtype}, {trials} trials): per setting", rows)
    print(table)
    result = {
        "case": "sysu_protocol", "queries": num_queries, "dim": dim, "trials": trials, "settings": 4,
        "ours_s": ours_s, "reference_s": ref_seconds, "reference_trials_timed_per_setting": ref_trials,
        "reference_scaled_to_all_trials": ref_trials < trials,
        "speedup": ref_seconds / ours_s, "identical_numbers": bool(identical), **checks,
        "dtype": args.dtype, "tied_rows_float32": tied_rows_float32, "device": args.device, "peak_bytes": ours_peak,
        "table": table.to_dict(),
    }
    print_table("SYSU protocol: ours vs community per-query loop",
                [{k: result[k] for k in ("ours_s", "reference_s", "speedup", "identical_numbers",
                                         "mAP_max_abs_diff", "reference_trials_timed_per_setting",
                                         "tied_rows_float32")}])
    return result


# ----------------------------------------------------------------------------- search case
def clustered(n, dim, clusters, gen, device):
    """n unit vectors around `clusters` random centres.  On a GPU they are drawn there, from a CUDA
    generator seeded by `gen` (drawing a 1M x 2048 gallery on the CPU takes tens of seconds)."""
    if str(device).startswith("cuda"):
        gen = torch.Generator(device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    else:
        device = "cpu" if device is None else device
    kw = dict(generator=gen, device=gen.device)
    centres = torch.randn(clusters, dim, **kw)
    x = centres[torch.randint(0, clusters, (n,), **kw)] + 0.5 * torch.randn(n, dim, **kw)
    return torch.nn.functional.normalize(x, dim=1).to(device)


def case_search(args) -> List[Dict[str, object]]:
    gpu = args.device == "cuda"
    if args.smoke:
        num_g, num_q, dim = 2000, 100, 32
    elif args.quick:
        num_g, num_q, dim = 20000, 1000, 256
    else:
        num_g, num_q, dim = (1_000_000, 10_000, 2048) if gpu else (100_000, 10_000, 2048)
    device = "cuda" if gpu else "cpu"
    gen = torch.Generator().manual_seed(0)
    gallery = clustered(num_g, dim, 1000, gen, device)
    queries = clustered(num_q, dim, 1000, gen, device)
    rows = []
    t, (scores, truth) = timed(lambda: exact_search(queries, gallery, 10))
    rows.append({"method": f"torch exact ({device})", "seconds": t, "qps": num_q / t, "recall@10": 1.0,
                 "peak_bytes": peak_of_last()})
    truth = truth.cpu().numpy()

    def recall(found):
        return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))

    try:
        g_np, q_np = gallery.cpu().numpy(), queries.cpu().numpy()
        flat = GalleryIndex(dim, "flat", backend="faiss")
        flat.add(g_np)
        t, res = timed(lambda: flat.search(q_np, 10))
        rows.append({"method": "faiss flat" + (" (gpu)" if faiss_has_gpu() else " (cpu)"), "seconds": t,
                     "qps": num_q / t, "recall@10": recall(res.ids)})
        sample = g_np[np.random.default_rng(0).choice(num_g, min(num_g, 64 * 1024), replace=False)]
        ivf = GalleryIndex(dim, "ivf", backend="faiss", nlist=int(4 * np.sqrt(num_g)))
        ivf.train(sample)
        ivf.add(g_np)
        for nprobe in (1, 8, 32):
            ivf.nprobe = nprobe
            t, res = timed(lambda: ivf.search(q_np, 10))
            rows.append({"method": f"faiss ivf nprobe={nprobe}", "seconds": t, "qps": num_q / t,
                         "recall@10": recall(res.ids)})
        if num_g <= 200_000:
            hnsw = GalleryIndex(dim, "hnsw", backend="faiss", device="cpu", hnsw_m=16, ef_construction=80)
            build_s, _ = timed(lambda: hnsw.add(g_np))
            for ef in (16, 64, 256):
                hnsw.ef_search = ef
                t, res = timed(lambda: hnsw.search(q_np, 10))
                rows.append({"method": f"faiss hnsw ef={ef} (build {build_s:.1f}s)", "seconds": t,
                             "qps": num_q / t, "recall@10": recall(res.ids)})
    except ImportError as error:
        rows.append({"method": f"faiss unavailable: {error}", "seconds": float("nan"), "qps": float("nan"),
                     "recall@10": float("nan")})
    print_table(f"Search: {num_g} x {dim} gallery, {num_q} queries, top-10", rows)
    return [{"case": "search", "gallery": num_g, "queries": num_q, "dim": dim, **r} for r in rows]


# ----------------------------------------------------------------------------- rerank case
def case_rerank(args) -> List[Dict[str, object]]:
    device = args.device
    gen = torch.Generator().manual_seed(1)
    small = (300, 1000, 256) if args.quick else (1000, 3000, 2048)
    # 50k x 2048 needs an N^2 D kNN pass (~11 TFLOP): GPU only; the CPU run uses 256-d
    large = (200, 5000, 256) if args.quick else (1000, 50000, 2048 if device == "cuda" else 256)
    if args.smoke:
        small, large = (40, 200, 32), (30, 400, 32)
    rows = []
    nq, ng, dim = small
    q, g = clustered(nq, dim, 100, gen, device), clustered(ng, dim, 100, gen, device)
    t_sparse, sparse = timed(lambda: k_reciprocal_rerank(q, g))
    sparse_peak = peak_of_last()
    t_dense, dense = timed(lambda: k_reciprocal_rerank_dense(q.cpu(), g.cpu()))
    err = float(np.abs(sparse.cpu().numpy() - dense).max())
    rows.append({"method": "k-reciprocal kNN graph", "queries": nq, "gallery": ng, "seconds": t_sparse,
                 "baseline_s": t_dense, "speedup": t_dense / t_sparse, "max_abs_diff": err, "peak_bytes": sparse_peak})
    t_knn, a_knn = timed(lambda: aim(q, g, 20, 6, method="knn"))
    knn_peak = peak_of_last()
    t_den, a_den = timed(lambda: aim(q, g, 20, 6, method="dense"))
    rows.append({"method": "AIM k1=20 k2=6 (knn vs dense)", "queries": nq, "gallery": ng, "seconds": t_knn,
                 "baseline_s": t_den, "speedup": t_den / t_knn, "max_abs_diff": float((a_knn - a_den).abs().max()),
                 "peak_bytes": knn_peak})
    nq, ng, dim = large
    q, g = clustered(nq, dim, 1000, gen, device), clustered(ng, dim, 1000, gen, device)
    t_sparse, out = timed(lambda: k_reciprocal_rerank(q, g))
    rows.append({"method": "k-reciprocal kNN graph", "queries": nq, "gallery": ng, "seconds": t_sparse,
                 "baseline_s": float("nan"), "speedup": float("nan"), "max_abs_diff": float("nan"),
                 "peak_bytes": peak_of_last()})
    t_knn, _ = timed(lambda: aim(q, g, 20, 6, method="knn"))
    rows.append({"method": "AIM k1=20 k2=6 knn", "queries": nq, "gallery": ng, "seconds": t_knn,
                 "baseline_s": float("nan"), "speedup": float("nan"), "max_abs_diff": float("nan"),
                 "peak_bytes": peak_of_last()})
    print_table("Re-ranking (dense baseline only where N^2 fits)", rows)
    return [{"case": "rerank", **r} for r in rows]


# ----------------------------------------------------------------------------- scale case
SCALE_SIZES = (10_000, 30_000, 100_000, 300_000, 1_000_000)
SCALE_DIMS = (2048, 128)
SCALE_QUERIES = 200
IMAGES_PER_ID = 10
SCALE_STEP_CAP_S = 150.0     # a build or search predicted to take longer is skipped (and said so)
SCALE_RUN_CAP_S = 22 * 60.0  # the whole case stops starting steps after this
SCALE_MEMORY_CAP = 6 * 2**30  # an index predicted to need more than this (beside the gallery) is skipped
SCALE_KNOBS = {"ivf": (4, 16, 64, 256), "ivfpq": (4, 16, 64, 256), "hnsw": (16, 64, 256)}


def identity_gallery(n: int, dim: int, num_queries: int, seed: int, noise: float = 1.0):
    """(gallery, queries, gallery identity of each query): ``n // IMAGES_PER_ID`` identities of
    IMAGES_PER_ID images each, image = centre + noise * N(0, I) / sqrt(dim) with centres N(0, I) / sqrt(dim),
    L2-normalised (images of one identity have cosine ~ 1 / (1 + noise^2) = 0.5, of two ~ 0).
    Each query is a new image of a random gallery identity. Drawn in chunks into one float32 array."""
    gen = torch.Generator().manual_seed(seed)
    ids = max(1, n // IMAGES_PER_ID)
    centres = torch.randn(ids, dim, generator=gen) / dim ** 0.5
    gallery = torch.empty(n, dim)
    for start in range(0, n, 65536):
        stop = min(n, start + 65536)
        rows = torch.arange(start, stop) % ids
        chunk = centres[rows] + noise * torch.randn(stop - start, dim, generator=gen) / dim ** 0.5
        gallery[start:stop] = torch.nn.functional.normalize(chunk, dim=1)
    query_ids = torch.randint(0, ids, (num_queries,), generator=gen)
    queries = torch.nn.functional.normalize(
        centres[query_ids] + noise * torch.randn(num_queries, dim, generator=gen) / dim ** 0.5, dim=1)
    return gallery, queries


def rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def available_bytes() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _trim() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def predicted(history: Dict[str, List], key: str, n: int):
    """Extrapolation of ``key`` to gallery size ``n`` from the sizes measured so far: the log-log line
    through the last two points (linear in n from one point); None without any."""
    points = [(size, value) for size, value in history.get(key, []) if value and value > 0]
    if not points:
        return None
    if len(points) == 1:
        size, value = points[0]
        return value * n / size
    (n0, v0), (n1, v1) = points[-2:]
    slope = np.log(v1 / v0) / np.log(n1 / n0)
    return v1 * (n / n1) ** max(slope, 1.0 if key.endswith("build_s") else 0.0)


def loglog_slope(sizes, values):
    """Least-squares slope of log(value) against log(size); None with fewer than two points."""
    pairs = [(s, v) for s, v in zip(sizes, values) if v is not None and v > 0]
    if len(pairs) < 2:
        return None
    x, y = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    return float(np.polyfit(x, y, 1)[0])


def _recall(found: np.ndarray, truth: np.ndarray):
    """(recall@1, recall@10) of ``found`` against the exact top-10 ``truth``."""
    r1 = float(np.mean(found[:, 0] == truth[:, 0]))
    r10 = float(np.mean([len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(found, truth)]))
    return r1, r10


def case_scale(args) -> List[Dict[str, object]]:
    import faiss  # noqa: F401  (the scale case measures FAISS: fail before generating galleries)

    from reid_kernels.retrieval import GalleryIndex

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from reid_kernels.training.gallery import index_parameters  # the index command's own parameters

    sizes, dims, num_q = SCALE_SIZES, tuple(int(d) for d in args.scale_dims.split(",")), SCALE_QUERIES
    step_cap, run_cap = SCALE_STEP_CAP_S, SCALE_RUN_CAP_S
    if args.smoke or args.quick:
        sizes, dims, num_q, step_cap = (2000, 6000), (64,), 50, 30.0
    start_all = time.perf_counter()
    rows: List[Dict[str, object]] = []
    for dim in dims:
        history: Dict[str, List] = {}
        for n in sizes:
            gallery_bytes = n * dim * 4
            # the gallery, plus about as much again for exact_search's working copies (its duplicate-row
            # pass), plus 2 GiB: a 1M x 2048 run was OOM-killed at 23 GB on a machine other jobs shared
            if 2.5 * gallery_bytes > available_bytes() - 2 * 2**30:
                rows.append({"dim": dim, "gallery": n, "method": "all",
                             "skipped": f"gallery ({gallery_bytes / 2**30:.1f} GiB) and exact_search's working "
                                        f"copies do not fit in the {available_bytes() / 2**30:.1f} GiB available"})
                print(f"[scale] d={dim} n={n}: skipped ({rows[-1]['skipped']})", flush=True)
                continue
            t0 = time.perf_counter()
            gallery, queries = identity_gallery(n, dim, num_q, seed=n + dim)
            gen_s = time.perf_counter() - t0
            g_np, q_np = gallery.numpy(), queries.numpy()
            exact_s, (_, truth) = timed(lambda: exact_search(queries, gallery, 10))
            truth = truth.numpy()
            rows.append({"dim": dim, "gallery": n, "method": "exact_search", "knob": None, "build_s": 0.0,
                         "index_bytes": gallery_bytes, "search_s": exact_s, "qps": num_q / exact_s,
                         "recall@1": 1.0, "recall@10": 1.0, "generate_s": gen_s})
            history.setdefault("exact_search search_s", []).append((n, exact_s))
            print(f"[scale] d={dim} n={n}: generated in {gen_s:.1f}s, exact_search {num_q / exact_s:.0f} q/s",
                  flush=True)
            for kind in ("flat", "ivf", "ivfpq", "hnsw"):
                method = {"flat": "faiss flat", "ivf": "faiss IVF-Flat", "ivfpq": "faiss IVF-PQ",
                          "hnsw": "faiss HNSW"}[kind]
                params = index_parameters(kind, n, dim)
                why = None
                if time.perf_counter() - start_all > run_cap:
                    why = f"the run's time cap ({run_cap:.0f} s) was reached"
                guess_s = predicted(history, f"{method} build_s", n)
                if why is None and guess_s is not None and guess_s > step_cap:
                    why = f"build predicted to take {guess_s:.0f} s (> {step_cap:.0f} s cap), from the measured slope"
                guess_b = predicted(history, f"{method} index_bytes", n)
                if why is None and guess_b is not None and (guess_b > SCALE_MEMORY_CAP or
                                                            guess_b > available_bytes() - 2 * 2**30):
                    why = f"index predicted to need {guess_b / 2**30:.1f} GiB beside the gallery (cap " \
                          f"{SCALE_MEMORY_CAP / 2**30:.0f} GiB)"
                if why is not None:
                    rows.append({"dim": dim, "gallery": n, "method": method, "skipped": why,
                                 "predicted_build_s": guess_s, "predicted_index_bytes": guess_b})
                    print(f"[scale] d={dim} n={n} {method}: skipped ({why})", flush=True)
                    continue
                _trim()
                before = rss_bytes()
                index = GalleryIndex(dim, kind, backend="faiss", device="cpu", normalize=False,
                                     **{k: v for k, v in params.items() if k not in ("train_size",)})
                t0 = time.perf_counter()
                if kind in ("ivf", "ivfpq"):
                    sample = g_np[np.random.default_rng(0).choice(n, min(n, params["train_size"]), replace=False)]
                    index.train(sample)
                    del sample
                index.add(g_np)
                build_s = time.perf_counter() - t0
                _trim()
                index_bytes = max(rss_bytes() - before, 0)
                history.setdefault(f"{method} build_s", []).append((n, build_s))
                history.setdefault(f"{method} index_bytes", []).append((n, index_bytes))
                knobs = SCALE_KNOBS.get(kind, (None,))
                for knob in knobs:
                    if kind in ("ivf", "ivfpq"):
                        index.nprobe = min(knob, params["nlist"])
                    elif kind == "hnsw":
                        index.ef_search = knob
                    search_s, result = timed(lambda: index.search(q_np, 10))
                    r1, r10 = _recall(result.ids, truth)
                    rows.append({"dim": dim, "gallery": n, "method": method, "knob": knob,
                                 "build_s": build_s, "index_bytes": index_bytes, "search_s": search_s,
                                 "qps": num_q / search_s, "recall@1": r1, "recall@10": r10,
                                 "params": {k: v for k, v in params.items()}})
                    print(f"[scale] d={dim} n={n} {method} knob={knob}: build {build_s:.1f}s, "
                          f"{index_bytes / 2**20:.0f} MiB, {num_q / search_s:.0f} q/s, R@1 {r1:.3f} R@10 {r10:.3f}",
                          flush=True)
                del index
            del gallery, queries, g_np, q_np
            _trim()
    summary = scale_summary(rows)
    print_table("Scale: log-log slope of each cost against the gallery size", summary)
    return [{"case": "scale", "queries": num_q, **r} for r in rows] + \
        [{"case": "scale_slopes", **r} for r in summary]


def scale_summary(rows) -> List[Dict[str, object]]:
    """Per (dim, method): the log-log slopes of build time, memory and time per query against n
    (the search slope at the default knob: the middle one)."""
    out = []
    measured = [r for r in rows if "skipped" not in r]
    for dim in sorted({r["dim"] for r in measured}, reverse=True):
        for method in dict.fromkeys(r["method"] for r in measured if r["dim"] == dim):
            mine = [r for r in measured if r["dim"] == dim and r["method"] == method]
            knobs = list(dict.fromkeys(r["knob"] for r in mine))
            middle = knobs[len(knobs) // 2]
            pick = [r for r in mine if r["knob"] == middle]
            sizes = [r["gallery"] for r in pick]
            out.append({"dim": dim, "method": method, "knob": middle, "sizes": f"{min(sizes)}-{max(sizes)}",
                        "build_slope": loglog_slope(sizes, [r["build_s"] for r in pick]),
                        "memory_slope": loglog_slope(sizes, [r["index_bytes"] for r in pick]),
                        "query_time_slope": loglog_slope(sizes, [r["search_s"] for r in pick])})
    return out


def draw_scale_figure(rows, path: str) -> str:
    """Recall@10 against queries/s (largest size measured for every method), and build time,
    memory and time per query against the gallery size (log-log), for each dimension."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r.get("case") == "scale" and "skipped" not in r]
    dims = sorted({r["dim"] for r in measured}, reverse=True)
    fig, axes = plt.subplots(len(dims), 4, figsize=(20, 4.6 * len(dims)), squeeze=False)
    colours = {"exact_search": "black", "faiss flat": "grey", "faiss IVF-Flat": "tab:blue",
               "faiss IVF-PQ": "tab:orange", "faiss HNSW": "tab:green"}
    for row_axes, dim in zip(axes, dims):
        mine = [r for r in measured if r["dim"] == dim]
        for method, colour in colours.items():
            rs = [r for r in mine if r["method"] == method]
            if not rs:
                continue
            largest = max(r["gallery"] for r in rs)
            pts = sorted((r for r in rs if r["gallery"] == largest), key=lambda r: r["qps"])
            row_axes[0].plot([r["qps"] for r in pts], [r["recall@10"] for r in pts], "o-", color=colour,
                             label=f"{method} (n={largest:,})")
            knobs = list(dict.fromkeys(r["knob"] for r in rs))
            middle = knobs[len(knobs) // 2]
            line = sorted((r for r in rs if r["knob"] == middle), key=lambda r: r["gallery"])
            n = [r["gallery"] for r in line]
            label = method if middle is None else f"{method} ({middle})"
            if method != "exact_search":
                row_axes[1].loglog(n, [max(r["build_s"], 1e-4) for r in line], "o-", color=colour, label=label)
            row_axes[2].loglog(n, [max(r["index_bytes"], 1) / 2**20 for r in line], "o-", color=colour, label=label)
            row_axes[3].loglog(n, [1e3 * r["search_s"] / r["queries"] for r in line], "o-", color=colour,
                               label=label)
        titles = (f"d={dim}: recall@10 vs queries/s (largest n measured)", f"d={dim}: build time (s)",
                  f"d={dim}: memory (MiB)", f"d={dim}: time per query (ms, batch of queries)")
        for ax, title in zip(row_axes, titles):
            ax.set_title(title, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        row_axes[0].set_xscale("log")
        row_axes[0].set_xlabel("queries/s")
        row_axes[0].set_ylabel("recall@10 vs exact")
        for ax in row_axes[1:]:
            ax.set_xlabel("gallery size n")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


CASES = {"sysu": case_sysu, "search": case_search, "rerank": case_rerank, "scale": case_scale}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one SYSU trial: the code paths, in seconds")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where our side runs (auto: cuda when torch sees a GPU)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--cases", default="sysu,search,rerank", help="comma-separated subset of " + ",".join(CASES))
    parser.add_argument("--scale-dims", default=",".join(map(str, SCALE_DIMS)),
                        help="scale case: comma-separated dimensions (default 2048,128)")
    parser.add_argument("--ref-trials", type=int, default=None,
                        help="trials per SYSU setting on which the slow reference is timed (default 1; scaled)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="SYSU feature dtype (float64: tie-free distances, so the numbers must be identical)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice, or 1 when the load average exceeds "
                             "the CPU count)")
    args = parser.parse_args(argv)
    threads_note = "as requested" if args.threads is not None else "torch default"
    if args.threads is None and hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1):
        # an oversubscribed CPU makes torch's multi-threaded kernels spin and stall (10x slower
        # sorts here); one thread is both faster and steadier
        args.threads = 1
        threads_note = f"1: load average {os.getloadavg()[0]:.1f} > {os.cpu_count()} CPUs"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {list(CASES)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device)
    meta = {"benchmark": "bench_retrieval", "quick": args.quick, "smoke": args.smoke, "threads_note": threads_note,
            **environment(device)}
    print(json.dumps(meta))
    results = []
    for name in chosen:
        out = CASES[name](args)
        results.extend(out if isinstance(out, list) else [out])
        if args.json:  # after every case: a run stopped at a deadline keeps the cases it finished
            write_json(args.json, {**meta, "results": results, "cases_done": chosen[: chosen.index(name) + 1]})
    if args.json:
        print(f"\nwrote {args.json}")
        if "scale" in chosen:
            print(f"wrote {draw_scale_figure(results, os.path.splitext(args.json)[0] + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
