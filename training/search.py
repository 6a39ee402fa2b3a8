"""Search an indexed gallery: where else does this person appear?

    python -m training.search --index INDEX_DIR --query IMAGE [IMAGE ...] [--k 10] [--cross-modality]
        [--rerank none|k_reciprocal|aim] [--json OUT.json] [--figure OUT.png] [--overwrite]
        [--query-modality visible|infrared] [--checkpoint CKPT] [--device auto|cpu|cuda]

Prints each query's ranked list (rank, path, camera, modality, distance = 1 - cosine, or the
re-ranked distance), writes it as JSON and draws the ranked picture: the query, then its top-k,
framed green when the person id matches the query's and red when it does not (torchreid's
convention; grey where an id is unknown). A query's modality comes from ``--query-modality``, the
gallery's own record of that file, or its SYSU-MM01 / RegDB folder. The query image itself is left
out of its own results. ``--cross-modality`` keeps only gallery images of the other modality
(infrared query -> visible gallery and back), as the VI-ReID protocols do. ``--rerank`` re-ranks
each query's top max(100, 5k) candidates with k-reciprocal re-ranking or SAAI's AIM. The model is
the checkpoint the index records (``--checkpoint`` may name the same file elsewhere; another model
is refused). An existing ``--json``/``--figure`` file is kept unless ``--overwrite``.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional

import numpy as np
import torch

from . import gallery
from .gallery import ImageRecord, IndexDirError

RERANKS = ("none", "k_reciprocal", "aim")
RERANK_POOL = 100  # candidates re-ranked per query: max(RERANK_POOL, 5 k)


def open_index(index_dir: str) -> dict:
    """The complete manifest of ``index_dir``; an incomplete or damaged folder names what is missing."""
    manifest = gallery.read_manifest(index_dir)
    if manifest.get("state") != "complete" or not manifest.get("index"):
        done = sum(gallery.shard_done(index_dir, s, manifest["model"]["dim"]) for s in manifest.get("shards", []))
        raise IndexDirError(f"--index: {index_dir} is incomplete ({done} of {len(manifest.get('shards', []))} shards, "
                            "no index yet); run python -m training.index again with the same arguments to finish it")
    info = manifest["index"]
    if info.get("file") and not os.path.isfile(os.path.join(index_dir, info["file"])):
        raise IndexDirError(f"--index: {index_dir} is incomplete: {info['file']} is missing; run python -m "
                            "training.index again to rebuild it")
    if not manifest["images"]:
        raise IndexDirError(f"--index: {index_dir} holds an empty gallery")
    return manifest


class Gallery:
    """The records, features and searchable index of an INDEX_DIR."""

    def __init__(self, index_dir: str, manifest: dict, nprobe: Optional[int] = None,
                 ef_search: Optional[int] = None):
        self.records = gallery.records_of(manifest)
        self.features = gallery.load_features(index_dir, manifest)
        self.kind = manifest["index"]["kind"]
        self.index = None
        if manifest["index"]["backend"] == "faiss":
            self.index = self._read_faiss(index_dir, manifest, nprobe, ef_search)

    def _read_faiss(self, index_dir: str, manifest: dict, nprobe: Optional[int], ef_search: Optional[int]):
        from reid_kernels.retrieval import GalleryIndex, import_faiss

        faiss = import_faiss()
        path = os.path.join(index_dir, manifest["index"]["file"])
        try:
            loaded = faiss.read_index(path)
        except RuntimeError as error:
            raise IndexDirError(f"--index: {path} is not a readable FAISS index ({str(error).splitlines()[0]})") \
                from None
        params = manifest["index"]["params"]
        try:
            return GalleryIndex.from_faiss(loaded, self.kind, pids=[r.person_id for r in self.records],
                                           camids=[r.camera for r in self.records],
                                           nprobe=nprobe or params.get("nprobe", gallery.DEFAULT_NPROBE),
                                           ef_search=ef_search or params.get("ef_search", gallery.DEFAULT_EF_SEARCH),
                                           name=f"--index: {path}")
        except ValueError as error:
            raise IndexDirError(str(error)) from None

    def search(self, query: np.ndarray, k: int) -> "tuple[np.ndarray, np.ndarray]":
        """(cosine scores, gallery rows) of the top-k of one query, best first (rows -1 past the end)."""
        if self.index is None:
            from reid_kernels.retrieval import exact_search

            scores, rows = exact_search(torch.nn.functional.normalize(torch.from_numpy(query[None]), dim=1),
                                        torch.nn.functional.normalize(torch.from_numpy(self.features), dim=1), k)
            return scores[0].numpy(), rows[0].numpy()
        result = self.index.search(query[None], k)
        return result.scores[0], result.ids[0]


def allowed_rows(records: List[ImageRecord], query: ImageRecord, cross_modality: bool) -> np.ndarray:
    """Boolean mask of the gallery images a query may return: not the query's own file, and with
    ``cross_modality`` only the other modality."""
    same_file = np.array([r.path == query.path for r in records])
    if not cross_modality:
        return ~same_file
    other = np.array([r.modality != query.modality for r in records])
    return other & ~same_file


def ranked(g: Gallery, feature: np.ndarray, allowed: np.ndarray, want: int) -> "tuple[np.ndarray, np.ndarray]":
    """The best ``want`` allowed rows and their cosine scores: the index is asked for more until
    enough allowed rows come back (or the whole gallery was returned)."""
    n = len(g.records)
    k = min(n, max(2 * want, want + 16))
    while True:
        scores, rows = g.search(feature, k)
        keep = (rows >= 0)
        keep[keep] &= allowed[rows[keep]]
        if keep.sum() >= want or k >= n:
            return rows[keep][:want], scores[keep][:want]
        k = min(n, 4 * k)


def rerank_distances(method: str, query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Re-ranked distances of one query to its candidate gallery features (smaller = closer)."""
    from reid_kernels.rerank import aim, k_reciprocal_rerank

    q = torch.from_numpy(query[None]).float()
    g = torch.from_numpy(candidates).float()
    if method == "k_reciprocal":
        k1 = min(20, g.shape[0])
        return k_reciprocal_rerank(q, g, k1=k1, k2=min(6, k1))[0].cpu().numpy()
    return aim(q, g)[0].cpu().numpy()


def search_one(g: Gallery, feature: np.ndarray, query: ImageRecord, k: int, cross_modality: bool,
               rerank: str) -> List[Dict[str, object]]:
    allowed = allowed_rows(g.records, query, cross_modality)
    pool = k if rerank == "none" else max(RERANK_POOL, 5 * k)
    rows, scores = ranked(g, feature, allowed, min(pool, int(allowed.sum())))
    distances = 1.0 - scores.astype(np.float64)
    if rerank != "none":
        distances = rerank_distances(rerank, feature, g.features[rows]).astype(np.float64)
        order = np.argsort(distances, kind="stable")
        rows, distances = rows[order], distances[order]
    out = []
    for rank, (row, distance) in enumerate(zip(rows[:k], distances[:k]), 1):
        r = g.records[int(row)]
        out.append({"rank": rank, "path": r.path, "camera": r.camera, "modality": r.modality,
                    "person_id": r.person_id, "distance": float(distance),
                    "match": None if r.person_id < 0 or query.person_id < 0 else r.person_id == query.person_id})
    return out


def query_records(paths: List[str], records: List[ImageRecord], modality: Optional[str]) -> List[ImageRecord]:
    """A record per query image: modality from ``modality``, the gallery's record of the file, or its folder."""
    from .data import load_image

    known = {r.path: r for r in records}
    out = []
    for path in paths:
        path = os.path.abspath(path)
        load_image(path)  # an undecodable or missing query is refused before anything runs
        rec = known.get(path)
        mod = modality or (rec.modality if rec else None) or gallery.modality_from_layout(path)
        if mod is None:
            raise IndexDirError(f"--query-modality: the modality of {path} is unknown (not in the gallery, not in a "
                                "SYSU-MM01/RegDB folder); give --query-modality visible|infrared")
        person = rec.person_id if rec else person_from_layout(path)
        out.append(ImageRecord(path, rec.camera if rec else -1, mod, person))
    return out


def person_from_layout(path: str) -> int:
    """The person id of a SYSU-MM01 ``camN/<id>/`` or RegDB ``Visible|Thermal/<id>/`` image, else -1."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    if len(parts) >= 3 and (parts[-3] in ("Visible", "Thermal") or gallery.modality_from_layout(path)):
        try:
            return int(parts[-2])
        except ValueError:
            return -1
    return -1


def check_outputs(args) -> None:
    for flag, path in (("--json", args.json), ("--figure", args.figure)):
        if path and os.path.exists(path) and not args.overwrite:
            raise IndexDirError(f"{flag}: {path} exists; name a new file or pass --overwrite")
        if path and os.path.isdir(path):
            raise IndexDirError(f"{flag}: {path} is a folder; name a file")
    if args.figure and not args.figure.lower().endswith(".png"):
        raise IndexDirError(f"--figure: expected a .png file name, got {args.figure}")


def run(args) -> int:
    from .engine.durable import atomic_write_text
    from .index import extract_records, load_model

    check_outputs(args)
    manifest = open_index(args.index)
    checkpoint = args.checkpoint or manifest["checkpoint"]["path"]
    if not os.path.isfile(checkpoint):
        raise IndexDirError(f"--checkpoint: the model {checkpoint} the index was built with is not there; name it "
                            "with --checkpoint")
    sha256 = gallery.sha256_of(checkpoint)
    gallery.check_same_model(manifest, args.index, checkpoint, sha256, "--checkpoint")
    g = Gallery(args.index, manifest, args.nprobe, args.ef_search)
    queries = query_records(args.query, g.records, args.query_modality)
    for q in queries:
        allowed = int(allowed_rows(g.records, q, args.cross_modality).sum())
        if args.k > allowed:
            what = f"{'other-modality ' if args.cross_modality else ''}gallery images this query can match"
            raise IndexDirError(f"--k: {args.k} is more than the {allowed} {what} ({q.path}); use --k {allowed} or "
                                "less")
    model, cfg, descriptor, _ = load_model(checkpoint, args.device)
    features = extract_records(model, cfg, descriptor, queries, batch_size=64)
    results = []
    for q, feature in zip(queries, features):
        ranking = search_one(g, feature, q, args.k, args.cross_modality, args.rerank)
        results.append({"query": q.path, "modality": q.modality, "person_id": q.person_id, "results": ranking})
        print_ranking(results[-1])
    if args.json:
        payload = {"index": os.path.abspath(args.index), "k": args.k, "cross_modality": args.cross_modality,
                   "rerank": args.rerank, "distance": "1 - cosine" if args.rerank == "none" else args.rerank,
                   "queries": results}
        atomic_write_text(args.json, json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.figure:
        from .gallery_figure import draw_rankings

        draw_rankings(results, args.figure)
        print(f"wrote {args.figure}")
    return 0


def print_ranking(result: dict) -> None:
    pid = "" if result["person_id"] < 0 else f", person {result['person_id']}"
    print(f"query {result['query']} ({result['modality']}{pid})")
    for r in result["results"]:
        mark = {True: "match", False: "other", None: ""}[r["match"]]
        print(f"  {r['rank']:3d}  {r['distance']:.4f}  cam {r['camera']:<3d} {r['modality']:<8s} {mark:5s}  "
              f"{r['path']}")


def build_parser():
    from .cli import parser as cli_parser

    parser = cli_parser("search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, help="an index folder written by python -m training.index")
    parser.add_argument("--query", required=True, nargs="+", help="one or more query images")
    parser.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    parser.add_argument("--cross-modality", action="store_true",
                        help="infrared queries search visible images only, and back")
    parser.add_argument("--rerank", choices=RERANKS, default="none")
    parser.add_argument("--json", default=None, metavar="OUT.json", help="write the ranked lists as JSON")
    parser.add_argument("--figure", default=None, metavar="OUT.png", help="draw the ranked lists")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json / --figure file")
    parser.add_argument("--nprobe", type=int, default=None,
                        help="IVF / IVF-PQ lists visited per query (default: the index's); more = better "
                             "recall, slower")
    parser.add_argument("--ef-search", type=int, default=None,
                        help="HNSW search beam (default: the index's); more = better recall, slower")
    parser.add_argument("--query-modality", choices=gallery.MODALITIES, default=None)
    parser.add_argument("--checkpoint", default=None, help="the index's model (default: the path it records)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import one_line_failures
    from .data import DatasetError
    from .engine.checkpoint import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k: expected at least 1 result per query, got {args.k}")
    for flag, value in (("--nprobe", args.nprobe), ("--ef-search", args.ef_search)):
        if value is not None and value < 1:
            parser.error(f"{flag}: expected at least 1, got {value}")
    return one_line_failures(lambda: run(args), (CheckpointError, DatasetError, IndexDirError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
