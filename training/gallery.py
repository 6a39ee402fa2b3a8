"""What ``training.index`` and ``training.search`` share: the image list of a gallery, the
INDEX_DIR format and the index-kind policy.

Image lists (:func:`list_images`): a SYSU-MM01 tree (``cam1..cam6/<id>/<image>``: cameras 3 and 6
infrared), a RegDB tree (``Visible/<id>/...`` camera 1, ``Thermal/<id>/...`` camera 2, infrared), a
plain folder of images with one ``--modality`` for all, or a CSV manifest
``path,camera,modality[,person_id]`` (paths relative to the CSV's folder; a header line optional).

INDEX_DIR::

    manifest.json        format, checkpoint (path, sha256), model (descriptor, dim, image size),
                         the image list (ids = positions), the planned shards, the index (kind,
                         parameters), state "extracting" or "complete"
    shards/NNNNN.npy     float32 features of the images [start, start + count) of one shard
    index.faiss          the FAISS index (``faiss.write_index``: readable by any FAISS tool); its
                         ids are the positions in the image list

Every file is written through :func:`~.engine.durable.atomic_write`, so a ``kill -9`` loses at
most the shard being extracted; the manifest is written before the first shard and again after
the index, so a folder with ``state: extracting`` is an interrupted run the next one continues.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from .data import DatasetError
from .engine.durable import atomic_write, atomic_write_text, file_sha256

FORMAT = "reid_kernels.index/1"
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
SHARDS = "shards"
MODALITIES = ("visible", "infrared")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
SYSU_IR_CAMS = (3, 6)
KINDS = ("flat", "ivf", "ivfpq", "hnsw")

# ---------------------------------------------------------------------------------- index kind
# Measured with `benchmarks/bench_retrieval.py --cases scale` (benchmarks/results/retrieval_scale_cpu.json,
# docs/retrieval.md): exact search costs n * dim multiply-adds a query, ~6-9e9 a second on one core
# here (100k x 2048: 33 queries/s; 1M x 128: 74 queries/s). FLAT_MAX_WORK keeps exact search while a
# query takes about 30 ms or less; above it HNSW, which at those sizes gave recall@10 >= 0.98 at a few
# times the exact speed where IVF-Flat at its default probes fell to 0.3-0.8 (identity-clustered
# vectors); HNSW keeps the float32 vectors (plus its graph) in memory, so beyond HNSW_MAX_BYTES of
# vectors the index is IVF-PQ (compressed codes, 64x smaller at 2048-d, lower recall).
FLAT_MAX_WORK = 100_000 * 2048
HNSW_MAX_BYTES = 4 * 2**30
DEFAULT_NPROBE = 64
DEFAULT_EF_SEARCH = 64


class IndexDirError(ValueError):
    """An INDEX_DIR that is incomplete, foreign, from another model or unreadable; names it."""


def choose_kind(n: int, dim: int) -> str:
    """The index kind ``training.index`` builds for ``n`` vectors of ``dim`` (see docs/retrieval.md):
    exact (``flat``) while one query costs at most FLAT_MAX_WORK multiply-adds, HNSW above it while
    the float32 vectors take at most HNSW_MAX_BYTES, IVF-PQ beyond."""
    if n * dim <= FLAT_MAX_WORK:
        return "flat"
    if n * dim * 4 <= HNSW_MAX_BYTES:
        return "hnsw"
    return "ivfpq"


def index_parameters(kind: str, n: int, dim: int) -> Dict[str, int]:
    """GalleryIndex parameters for ``kind`` at ``n`` vectors (the benchmark measures these ones):
    IVF lists ~ sqrt(n) (at least 39 training vectors per list, FAISS's own floor), trained on
    40 vectors per list (IVF-PQ: at least 10,240, 40 per sub-quantiser centroid), ``nprobe``
    DEFAULT_NPROBE; HNSW M=16, efConstruction 80, efSearch DEFAULT_EF_SEARCH."""
    if kind == "flat":
        return {}
    if kind in ("ivf", "ivfpq"):
        nlist = max(1, min(int(round(math.sqrt(n))), n // 39))
        train = min(n, 40 * nlist if kind == "ivf" else max(40 * nlist, 40 * 256))
        return {"nlist": nlist, "nprobe": min(DEFAULT_NPROBE, nlist), "train_size": train}
    if kind == "hnsw":
        return {"hnsw_m": 16, "ef_construction": 80, "ef_search": DEFAULT_EF_SEARCH}
    raise ValueError(f"--index-kind: expected one of {KINDS}, got {kind!r}")


# ---------------------------------------------------------------------------------- image lists
class ImageRecord(NamedTuple):
    path: str
    camera: int
    modality: str
    person_id: int  # -1: unknown


def _image_files(folder: str) -> List[str]:
    found = []
    for base, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(base, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _int_or(text: str, default: int) -> int:
    try:
        return int(text)
    except ValueError:
        return default


def is_sysu_tree(folder: str) -> bool:
    return all(os.path.isdir(os.path.join(folder, f"cam{c}")) for c in range(1, 7))


def is_regdb_tree(folder: str) -> bool:
    return os.path.isdir(os.path.join(folder, "Visible")) and os.path.isdir(os.path.join(folder, "Thermal"))


def _sysu_records(root: str) -> List[ImageRecord]:
    records = []
    for cam in range(1, 7):
        modality = "infrared" if cam in SYSU_IR_CAMS else "visible"
        cam_dir = os.path.join(root, f"cam{cam}")
        for person in sorted(os.listdir(cam_dir)):
            folder = os.path.join(cam_dir, person)
            if os.path.isdir(folder):
                records += [ImageRecord(p, cam, modality, _int_or(person, -1)) for p in _image_files(folder)]
    return records


def _regdb_records(root: str) -> List[ImageRecord]:
    records = []
    for sub, cam, modality in (("Visible", 1, "visible"), ("Thermal", 2, "infrared")):
        top = os.path.join(root, sub)
        for path in _image_files(top):
            person = os.path.relpath(path, top).split(os.sep)[0]
            records.append(ImageRecord(path, cam, modality, _int_or(person, -1) if person != os.path.basename(path)
                                       else -1))
    return records


def read_manifest_csv(path: str) -> List[ImageRecord]:
    """Rows ``path,camera,modality[,person_id]``; errors name the file and line."""
    base = os.path.dirname(os.path.abspath(path))
    records = []
    with open(path, newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.reader(handle), 1):
            if not row or not "".join(row).strip():
                continue
            if number == 1 and row[0].strip().lower() == "path":
                continue  # header
            if len(row) not in (3, 4):
                raise DatasetError(f"--images: {path} line {number}: expected path,camera,modality[,person_id], "
                                   f"got {len(row)} fields")
            image, camera, modality = (v.strip() for v in row[:3])
            person = row[3].strip() if len(row) == 4 else "-1"
            if modality not in MODALITIES:
                raise DatasetError(f"--images: {path} line {number}: modality should be one of {MODALITIES}, "
                                   f"got {modality!r}")
            try:
                camera_id, person_id = int(camera), int(person or -1)
            except ValueError:
                raise DatasetError(f"--images: {path} line {number}: camera and person_id should be integers, "
                                   f"got {camera!r} and {person!r}") from None
            records.append(ImageRecord(os.path.normpath(os.path.join(base, image)), camera_id, modality, person_id))
    return records


def list_images(images: str, modality: Optional[str] = None) -> List[ImageRecord]:
    """The records of ``--images`` (a SYSU-MM01 or RegDB tree, a plain folder with ``modality``,
    or a CSV manifest), absolute paths; raises :class:`DatasetError` naming the argument."""
    images = os.path.abspath(images)
    if os.path.isfile(images):
        if not images.lower().endswith(".csv"):
            raise DatasetError(f"--images: {images} is a file but not a CSV manifest (path,camera,modality"
                               "[,person_id]); give a folder or a .csv")
        if modality is not None:
            raise DatasetError("--modality: a CSV manifest names each image's modality; drop --modality")
        records = read_manifest_csv(images)
    elif not os.path.isdir(images):
        raise DatasetError(f"--images: no such file or folder: {images}")
    elif is_sysu_tree(images) or is_regdb_tree(images):
        if modality is not None:
            raise DatasetError(f"--modality: {images} is a SYSU-MM01/RegDB tree, whose layout gives each image's "
                               "modality; drop --modality")
        records = _sysu_records(images) if is_sysu_tree(images) else _regdb_records(images)
    elif modality is None:
        raise DatasetError(f"--images: {images} is neither a SYSU-MM01 nor a RegDB tree; for a plain folder give "
                           "--modality visible|infrared (one modality for all), or a CSV manifest "
                           "path,camera,modality[,person_id]")
    else:
        records = [ImageRecord(p, 0, modality, -1) for p in _image_files(images)]
    if not records:
        raise DatasetError(f"--images: no image ({', '.join(IMAGE_EXTENSIONS)}) found in {images}: the gallery "
                           "would be empty")
    return records


def modality_from_layout(path: str) -> Optional[str]:
    """'infrared'/'visible' when ``path`` sits in a SYSU-MM01 ``camN`` or RegDB ``Thermal``/``Visible``
    folder, else None."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    if "Thermal" in parts:
        return "infrared"
    if "Visible" in parts:
        return "visible"
    for part in reversed(parts[:-1]):
        if len(part) == 4 and part.startswith("cam") and part[3] in "123456":
            return "infrared" if int(part[3]) in SYSU_IR_CAMS else "visible"
    return None


# ---------------------------------------------------------------------------------- INDEX_DIR
sha256_of = file_sha256  # the checkpoint's identity in INDEX_DIR


def read_manifest(index_dir: str, what: str = "--index") -> dict:
    path = os.path.join(index_dir, MANIFEST)
    if not os.path.isdir(index_dir):
        raise IndexDirError(f"{what}: no such index folder: {index_dir}")
    if not os.path.isfile(path):
        raise IndexDirError(f"{what}: {index_dir} is not an index folder (no {MANIFEST}; make one with "
                            "python -m training.index)")
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise IndexDirError(f"{what}: {path} is not readable JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexDirError(f"{what}: {path} is not a manifest of python -m training.index (format "
                            f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r})")
    return manifest


def write_manifest(index_dir: str, manifest: dict) -> None:
    atomic_write_text(os.path.join(index_dir, MANIFEST), json.dumps(manifest, indent=1) + "\n")


def records_of(manifest: dict) -> List[ImageRecord]:
    return [ImageRecord(*r) for r in manifest["images"]]


def plan_shards(start: int, stop: int, size: int, first_number: int) -> List[dict]:
    """Shards covering images [start, stop) in runs of ``size``, numbered from ``first_number``."""
    return [{"file": f"{SHARDS}/{first_number + i:05d}.npy", "start": s, "count": min(size, stop - s)}
            for i, s in enumerate(range(start, stop, size))]


def shard_done(index_dir: str, shard: dict, dim: int) -> bool:
    """True when the shard's file is on disk with the planned shape (an atomic write is complete or
    absent, so a readable file of the right shape is the finished shard)."""
    path = os.path.join(index_dir, shard["file"])
    if not os.path.isfile(path):
        return False
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return False
    return features.shape == (shard["count"], dim) and features.dtype == np.float32


def write_shard(index_dir: str, shard: dict, features: np.ndarray) -> None:
    os.makedirs(os.path.join(index_dir, SHARDS), exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(features, dtype=np.float32))

    atomic_write(os.path.join(index_dir, shard["file"]), write)


def load_features(index_dir: str, manifest: dict, what: str = "--index") -> np.ndarray:
    """The (N, D) features of every image, from the shards; a missing or wrong shard names the file."""
    dim = manifest["model"]["dim"]
    parts = []
    for shard in manifest["shards"]:
        if not shard_done(index_dir, shard, dim):
            raise IndexDirError(f"{what}: {index_dir} is incomplete: shard {shard['file']} is missing or damaged "
                                "(run python -m training.index again to finish it)")
        parts.append(np.load(os.path.join(index_dir, shard["file"]), allow_pickle=False))
    features = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    if features.shape[0] != len(manifest["images"]):
        raise IndexDirError(f"{what}: {index_dir} is inconsistent: {features.shape[0]} features for "
                            f"{len(manifest['images'])} images")
    return features


def check_same_model(manifest: dict, index_dir: str, checkpoint: str, sha256: str, what: str) -> None:
    """Refuse a checkpoint other than the one the index was built with, naming both."""
    recorded = manifest["checkpoint"]
    if recorded["sha256"] != sha256:
        raise IndexDirError(f"{what}: {checkpoint} (sha256 {sha256[:12]}...) is not the model {index_dir} was built "
                            f"with ({recorded['path']}, sha256 {recorded['sha256'][:12]}...); features of two models "
                            "cannot be compared")


def remove_stale_temporaries(index_dir: str) -> None:
    """Delete the temporary files of :func:`atomic_write` a killed run left in ``index_dir`` (named
    ``<file>.tmp.<pid>``: only this command's own files, never renamed into place)."""
    for folder in (index_dir, os.path.join(index_dir, SHARDS)):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if ".tmp." in name and name.split(".tmp.")[0] in (MANIFEST, INDEX_FILE) or (
                        folder.endswith(SHARDS) and ".npy.tmp." in name):
                    os.remove(os.path.join(folder, name))


def write_faiss_index(index_dir: str, faiss_index) -> None:
    from reid_kernels.retrieval import import_faiss

    faiss = import_faiss()
    atomic_write(os.path.join(index_dir, INDEX_FILE), lambda tmp: faiss.write_index(faiss_index, tmp))


def same_paths(a: Sequence[ImageRecord], b: Sequence[ImageRecord]) -> bool:
    return [r.path for r in a] == [r.path for r in b]
