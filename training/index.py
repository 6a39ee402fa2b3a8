"""Index a gallery of camera images with a trained model.

    python -m training.index --checkpoint run/final.pt --images PATH --out INDEX_DIR
        [--modality visible|infrared] [--add] [--index-kind auto|flat|ivf|ivfpq|hnsw]
        [--shard-size 1024] [--batch-size N] [--device auto|cpu|cuda]

``PATH`` is a SYSU-MM01 or RegDB tree (cameras and modality from the layout), a plain folder of
images with ``--modality`` (one modality for all), or a CSV manifest ``path,camera,modality
[,person_id]``. Each image goes through the recipe's test descriptor and its modality's stem,
in batches; features are written in atomic shards (``INDEX_DIR/shards``), so an interrupted run
continues where it stopped when started again with the same arguments, and ``--add`` extends an
index with new images, extracting only those. The index kind follows the gallery size
(:func:`training.gallery.choose_kind`, measured in docs/retrieval.md) unless ``--index-kind``
names one; ``INDEX_DIR/index.faiss`` is FAISS's own file. ``INDEX_DIR`` records the checkpoint's
sha256: indexing into it, or searching it, with another model is refused naming both.
"""
from __future__ import annotations

import os
import sys
import time
from typing import List, Optional

import numpy as np
import torch

from . import gallery
from .gallery import ImageRecord, IndexDirError

DEFAULT_SHARD_SIZE = 1024


def load_model(checkpoint: str, device: str = "auto"):
    """(model in eval mode on the device, config, descriptor, sha256) of a training checkpoint."""
    from .config import flatten, load_config
    from .engine.checkpoint import load_model_from_checkpoint, read_checkpoint
    from .recipes import recipe_class

    if device == "cuda" and not torch.cuda.is_available():
        raise IndexDirError("--device: 'cuda' asked for, but no CUDA device is available (use --device cpu)")
    state = read_checkpoint(checkpoint)
    cfg = load_config(None, updates=flatten(state["config"]))
    chosen = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    model = load_model_from_checkpoint(state, cfg).to(chosen).eval()
    return model, cfg, recipe_class(cfg).test_descriptor(cfg), gallery.sha256_of(checkpoint)


def extract_records(model, cfg: dict, descriptor: str, records: List[ImageRecord], batch_size: int) -> np.ndarray:
    """(N, D) float32 features of ``records`` in their order, each modality through its own stem."""
    from .features import extract_features

    out = np.zeros((len(records), model.feat_dim), np.float32)
    for modality in gallery.MODALITIES:
        rows = [i for i, r in enumerate(records) if r.modality == modality]
        if rows:
            feats = extract_features(model, [records[i].path for i in rows], modality, height=cfg["data"]["height"],
                                     width=cfg["data"]["width"], descriptor=descriptor, batch_size=batch_size)
            out[rows] = feats.cpu().numpy()
    return out


class Progress:
    """A progress bar on a terminal, one line per shard otherwise (a log file)."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.time()

    def update(self, done: int, shard: dict, seconds: float) -> None:
        if self.tty:
            width = 30
            filled = int(width * done / max(self.total, 1))
            rate = done / max(time.time() - self.start, 1e-9)
            self.stream.write(f"\rindexing [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} images "
                              f"({rate:.0f}/s)")
            if done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(f"shard {shard['file']}: images {shard['start']}-{shard['start'] + shard['count'] - 1} "
                              f"extracted in {seconds:.1f}s ({done}/{self.total} done)\n")
        self.stream.flush()


def prepare_folder(args, records: List[ImageRecord], sha256: str, model_info: dict) -> dict:
    """The manifest this run works to: a new plan, the same plan resumed, or the old one extended
    (``--add``); refuses a foreign folder, another model or another image list."""
    out = args.out
    has_manifest = os.path.isfile(os.path.join(out, gallery.MANIFEST))
    if not has_manifest:
        if args.add:
            raise IndexDirError(f"--add: {out} holds no index to extend (no {gallery.MANIFEST}); leave out --add "
                                "to make a new one")
        if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
            raise IndexDirError(f"--out: {out} exists and is not an index folder (no {gallery.MANIFEST}); name a new "
                                "or empty folder")
        return {"format": gallery.FORMAT, "state": "extracting",
                "checkpoint": {"path": os.path.abspath(args.checkpoint), "sha256": sha256}, "model": model_info,
                "images": [list(r) for r in records], "shard_size": args.shard_size,
                "shards": gallery.plan_shards(0, len(records), args.shard_size, 0), "index": None}
    manifest = gallery.read_manifest(out, "--out")
    gallery.check_same_model(manifest, out, args.checkpoint, sha256, "--checkpoint")
    old = gallery.records_of(manifest)
    if args.add:
        known = {r.path for r in old}
        new = [r for r in records if r.path not in known]
        if new:
            start = len(old)
            manifest["images"] = [list(r) for r in old + new]
            manifest["shards"] = manifest["shards"] + gallery.plan_shards(
                start, start + len(new), manifest["shard_size"], len(manifest["shards"]))
            manifest["state"] = "extracting"
        print(f"--add: {len(new)} new images ({len(records) - len(new)} already indexed)")
        return manifest
    if not gallery.same_paths(old, records):
        raise IndexDirError(f"--out: {out} already indexes another image list ({len(old)} images, {len(records)} "
                            "given); use --add to extend it, or a new folder")
    return manifest


def build_index(features: np.ndarray, kind: str):
    """(FAISS index or None for torch exact search, backend, parameters) of ``features``."""
    from reid_kernels.retrieval import GalleryIndex, import_faiss

    n, dim = features.shape
    params = gallery.index_parameters(kind, n, dim)
    try:
        import_faiss()
    except ImportError:
        if kind != "flat":
            raise
        return None, "torch", params  # exact search over the shards' features, in torch
    index = GalleryIndex(dim, kind, backend="faiss", device="cpu",
                         **{k: v for k, v in params.items() if k != "train_size"})
    if kind in ("ivf", "ivfpq"):
        if n < max(params["nlist"], 256 if kind == "ivfpq" else 1):
            raise IndexDirError(f"--index-kind: {kind} needs at least {max(params['nlist'], 256)} images to train on, "
                                f"the gallery has {n}; use --index-kind flat")
        sample = np.random.default_rng(0).choice(n, params["train_size"], replace=False)
        index.train(features[np.sort(sample)])
    index.add(features)
    return index.faiss_index, "faiss", params


def run(args) -> int:
    records = gallery.list_images(args.images, args.modality)
    model, cfg, descriptor, sha256 = load_model(args.checkpoint, args.device)
    model_info = {"recipe": cfg["recipe"], "descriptor": descriptor, "dim": int(model.feat_dim),
                  "height": cfg["data"]["height"], "width": cfg["data"]["width"]}
    manifest = prepare_folder(args, records, sha256, model_info)
    requested = None if args.index_kind == "auto" else args.index_kind
    index_info = manifest.get("index") or {}
    wanted = requested or index_info.get("requested") or None
    if (manifest["state"] == "complete" and os.path.isfile(os.path.join(args.out, gallery.INDEX_FILE))
            and (requested is None or requested == index_info.get("kind"))):
        print(f"{args.out}: complete ({len(manifest['images'])} images, {index_info.get('kind')} index); nothing to do")
        return 0
    os.makedirs(os.path.join(args.out, gallery.SHARDS), exist_ok=True)
    gallery.remove_stale_temporaries(args.out)  # a killed run's half-written shard (never renamed into place)
    manifest["state"] = "extracting"
    gallery.write_manifest(args.out, manifest)  # the plan is on disk before the first shard
    all_records = gallery.records_of(manifest)
    dim = model_info["dim"]
    todo = [s for s in manifest["shards"] if not gallery.shard_done(args.out, s, dim)]
    done = sum(s["count"] for s in manifest["shards"]) - sum(s["count"] for s in todo)
    if done:
        print(f"resuming: {len(manifest['shards']) - len(todo)} of {len(manifest['shards'])} shards already on disk")
    progress = Progress(len(all_records))
    batch_size = args.batch_size or cfg["eval"]["batch_size"]
    for shard in todo:
        start = time.time()
        features = extract_records(model, cfg, descriptor, all_records[shard["start"]: shard["start"] + shard["count"]],
                                   batch_size)
        gallery.write_shard(args.out, shard, features)
        done += shard["count"]
        progress.update(done, shard, time.time() - start)
    features = gallery.load_features(args.out, manifest, "--out")
    kind = wanted or gallery.choose_kind(*features.shape)
    start = time.time()
    faiss_index, backend, params = build_index(features, kind)
    if faiss_index is not None:
        gallery.write_faiss_index(args.out, faiss_index)
    manifest["index"] = {"kind": kind, "backend": backend, "file": gallery.INDEX_FILE if faiss_index is not None
                         else None, "params": params, "count": int(features.shape[0]), "requested": wanted}
    manifest["state"] = "complete"
    gallery.write_manifest(args.out, manifest)
    print(f"{args.out}: {features.shape[0]} images, {features.shape[1]}-d, {kind} index ({backend}) built in "
          f"{time.time() - start:.1f}s" + ("" if wanted else " (chosen for this size; --index-kind overrides)"))
    return 0


def build_parser():
    from .cli import parser as cli_parser

    parser = cli_parser("index", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by training.train")
    parser.add_argument("--images", required=True,
                        help="a SYSU-MM01 or RegDB tree, a folder of images (with --modality) or a CSV manifest "
                             "path,camera,modality[,person_id]")
    parser.add_argument("--out", required=True, help="the index folder (new, empty, or one this command wrote)")
    parser.add_argument("--modality", choices=gallery.MODALITIES, default=None,
                        help="the modality of every image of a plain folder")
    parser.add_argument("--add", action="store_true", help="extend an existing index with the images not in it")
    parser.add_argument("--index-kind", choices=("auto",) + gallery.KINDS, default="auto",
                        help="auto (default): exact up to n x d = 100k x 2048, HNSW above while the vectors "
                             "fit in 4 GiB, IVF-PQ beyond (docs/retrieval.md)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"images per feature shard (default {DEFAULT_SHARD_SIZE}): what an interruption can lose")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: eval's)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import one_line_failures
    from .data import DatasetError
    from .engine.checkpoint import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error(f"--shard-size: expected at least 1 image per shard, got {args.shard_size}")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size: expected at least 1, got {args.batch_size}")
    return one_line_failures(lambda: run(args), (CheckpointError, DatasetError, IndexDirError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
