"""SYSU-MM01 and RegDB evaluation protocols, exact to the community code.

One call evaluates features over every setting and trial and returns the table the
papers print::

    from reid_kernels.protocols import evaluate_sysu, evaluate_regdb
    table = evaluate_sysu("/data/SYSU-MM01", extractor)      # 4 settings x 10 trials
    print(table)                                            # mean ± std, R1/R5/R10/R20, mAP, mINP
    table = evaluate_regdb("/data/RegDB", {t: extractor_of_trial[t] for t in range(1, 11)})

Feature sources
    A callable ``f(paths) -> (N, D)`` array/tensor receiving absolute image paths (a
    model wrapped in a data loader), or a mapping from image path -- relative to the
    dataset root with ``/`` separators (``"cam1/0001/0001.jpg"``), or absolute -- to a
    D-dim vector (precomputed features; :class:`FeatureTable` builds one from a path
    list and a matrix). Each image is extracted once per call, however many trials use it.

SYSU-MM01 (``cam1``..``cam6/<4-digit id>/<4-digit image>.jpg``, ``exp/test_id.txt``)
    * queries: every image of the test identities from the IR cameras 3 and 6 (3,803
      images), in both all-search and indoor-search; identities in ascending order,
      cameras in order, files sorted by name;
    * gallery: visible cameras 1, 2, 4, 5 (all-search) or 1, 2 (indoor-search); one
      image (single-shot) or ten (multi-shot) per identity-camera folder; 10 trials;
    * two draw mechanisms, selected by ``draw``:

      ``"agw"`` -- single-shot as the AGW/LbA/MCE code (``process_gallery_sysu``): a fresh
        ``random.Random(trial)`` (identical to ``random.seed(trial)``); identities in
        ascending order, cameras in order; for each existing folder, its entries sorted
        by name and ``rng.choice(entries)``. Neither AGW nor LbA draws a multi-shot
        gallery (their code has the single-shot draw only); multi-shot here is our
        extension of that draw: ``np.random.RandomState(trial).choice(entries, 10,
        replace=False)`` per folder, in the same order.
      ``"agw-sample"`` -- CM-NAS's draw (CM-NAS: Cross-Modality Neural Architecture Search
        for Visible-Infrared Person Re-Identification, ICCV 2021; its
        ``process_gallery_sysu``): ``random.Random(trial).sample(entries, shots)`` per
        folder, single- and multi-shot (for one shot it draws exactly what ``"agw"`` does).
      ``"matlab"`` -- the dataset's ``exp/rand_perm_cam.mat`` (original MATLAB protocol,
        used by the MPANet/SAAI code): image numbers ``perm[cam][id][trial][:shots]``;
        gallery order = sorted paths (cam, id, file).

      Folders with fewer than 10 images contribute all their images to a multi-shot
      gallery (the MATLAB protocol's slicing; ``random.sample`` would raise).
    * metrics: :func:`reid_kernels.metrics.evaluate_ranking` with ``protocol="sysu"``.

RegDB (``idx/test_{visible,thermal}_{1..10}.txt``: lines ``<relative path> <label>``)
    visible->thermal: visible test images are the queries, thermal the gallery; and the
    reverse. Each trial is a different identity split with its own trained model, so
    features are given per trial; a missing trial is an error (the community code
    silently evaluates the previous trial's model there, on identities it trained on).

Distances: ``"cosine"`` (1 - cosine similarity of L2-normalised features; the ranking
of AGW's ``-q @ g.T`` on normalised features and of MPANet's squared Euclidean distance
of normalised features), ``"euclidean"`` (squared L2 of the raw features) or a callable
``(q, g) -> (Nq, Ng)``. ``postprocess="aim"`` / ``"aim-paper"`` / ``"k_reciprocal"``
re-ranks with :mod:`reid_kernels.rerank` (k1/k2 per setting from
:func:`reid_kernels.rerank.aim_parameters`).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .metrics import RankingResult, evaluate_ranking

__all__ = [
    "SYSU_MODES",
    "SYSU_SHOTS",
    "SYSU_DRAWS",
    "REGDB_DIRECTIONS",
    "Samples",
    "SYSUMM01",
    "RegDB",
    "FeatureTable",
    "SettingResult",
    "ProtocolTable",
    "evaluate_sysu",
    "evaluate_regdb",
    "evaluate_features",
]

SYSU_MODES = ("all", "indoor")
SYSU_SHOTS = ("single", "multi")
SYSU_DRAWS = ("agw", "agw-sample", "matlab")
SYSU_QUERY_CAMS = (3, 6)
SYSU_GALLERY_CAMS = {"all": (1, 2, 4, 5), "indoor": (1, 2)}
SYSU_SHOT_SIZE = {"single": 1, "multi": 10}
REGDB_DIRECTIONS = ("visible->thermal", "thermal->visible")
# Camera ids given to RegDB samples (the protocol has no camera rule; only for bookkeeping).
REGDB_CAMS = {"visible": 1, "thermal": 2}
REPORTED_RANKS = (1, 5, 10, 20)

FeatureSource = Union[Callable[[Sequence[str]], object], Mapping[str, object]]


# ------------------------------------------------------------------------------------
# Sample lists
# ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Samples:
    """An ordered list of images: relative paths (``/``-separated), person ids, cameras."""

    root: str
    paths: Tuple[str, ...]
    pids: np.ndarray
    cams: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def absolute_paths(self) -> List[str]:
        return [os.path.join(self.root, *p.split("/")) for p in self.paths]


def _missing(dataset: str, root: str, rel: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{dataset} at {root!r}: missing {rel!r} ({what})")


class SYSUMM01:
    """The SYSU-MM01 test protocol over the dataset's own folder layout.

    Raises ``FileNotFoundError`` naming the missing file when ``root`` is not
    SYSU-MM01-shaped (``exp/test_id.txt``, ``cam1``..``cam6``).
    """

    LAYOUT = "expected cam1..cam6/<4-digit id>/<4-digit image>.jpg and exp/{train,val,test}_id.txt"

    def __init__(self, root: Union[str, os.PathLike]):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"SYSU-MM01 root {self.root!r} is not a directory")
        for rel in ["exp/test_id.txt"] + [f"cam{c}" for c in range(1, 7)]:
            if not os.path.exists(os.path.join(self.root, *rel.split("/"))):
                raise _missing("SYSU-MM01", self.root, rel, self.LAYOUT)
        self._ids = self._read_test_ids()
        self._listing: Dict[Tuple[int, int], Optional[List[str]]] = {}

    def _read_test_ids(self) -> List[int]:
        path = os.path.join(self.root, "exp", "test_id.txt")
        with open(path, "rt") as handle:
            first = handle.read().splitlines()
        # The community code reads the first line: comma-separated integers.
        try:
            ids = [int(token) for token in first[0].split(",") if token.strip()] if first else []
        except ValueError as error:
            raise ValueError(f"SYSU-MM01 at {self.root!r}: exp/test_id.txt: expected comma-separated ids ({error})")
        if not ids:
            raise ValueError(f"SYSU-MM01 at {self.root!r}: exp/test_id.txt lists no identity")
        return sorted(set(ids))

    @property
    def test_ids(self) -> List[int]:
        """Test identities in ascending order (the community code's ``sorted(ids)``)."""
        return list(self._ids)

    def folder_entries(self, cam: int, pid: int) -> Optional[List[str]]:
        """Sorted entries of ``cam<cam>/<pid:04d>`` (None when the folder does not exist)."""
        key = (cam, pid)
        if key not in self._listing:
            folder = os.path.join(self.root, f"cam{cam}", f"{pid:04d}")
            self._listing[key] = sorted(os.listdir(folder)) if os.path.isdir(folder) else None
        return self._listing[key]

    def _samples(self, triples: Iterable[Tuple[int, int, str]]) -> Samples:
        triples = list(triples)
        paths = tuple(f"cam{cam}/{pid:04d}/{name}" for cam, pid, name in triples)
        pids = np.asarray([pid for _, pid, _ in triples], dtype=np.int64)
        cams = np.asarray([cam for cam, _, _ in triples], dtype=np.int64)
        return Samples(self.root, paths, pids, cams)

    def query(self, mode: str = "all") -> Samples:
        """IR query images (cameras 3 and 6, in both modes)."""
        _check_choice("mode", mode, SYSU_MODES)
        triples = []
        for pid in self._ids:
            for cam in SYSU_QUERY_CAMS:
                for name in self.folder_entries(cam, pid) or []:
                    triples.append((cam, pid, name))
        return self._samples(triples)

    def gallery(self, mode: str = "all", shot: str = "single", trial: int = 0, draw: str = "agw") -> Samples:
        """The gallery of one trial (see the module docstring for the draw mechanisms)."""
        _check_choice("mode", mode, SYSU_MODES)
        _check_choice("shot", shot, SYSU_SHOTS)
        _check_choice("draw", draw, SYSU_DRAWS)
        if isinstance(trial, bool) or not isinstance(trial, (int, np.integer)) or trial < 0:
            raise ValueError(f"trial: expected an int >= 0, got {trial!r}")
        cams = SYSU_GALLERY_CAMS[mode]
        shots = SYSU_SHOT_SIZE[shot]
        if draw == "matlab":
            return self._samples(self._draw_matlab(cams, shots, int(trial)))
        return self._samples(self._draw_python(cams, shots, int(trial), numpy_multi=(draw == "agw")))

    def _draw_python(self, cams, shots, trial, numpy_multi):
        py_rng = random.Random(trial)
        np_rng = np.random.RandomState(trial)
        for pid in self._ids:
            for cam in cams:
                entries = self.folder_entries(cam, pid)
                if not entries:
                    continue  # the community code skips missing folders
                if shots == 1:
                    chosen = [py_rng.choice(entries)]
                elif len(entries) < shots:
                    chosen = entries
                elif numpy_multi:
                    chosen = [str(x) for x in np_rng.choice(entries, shots, replace=False)]
                else:
                    chosen = py_rng.sample(entries, shots)
                for name in chosen:
                    yield cam, pid, name

    def _draw_matlab(self, cams, shots, trial):
        perm = self.rand_perm_cam()
        triples = []
        for cam in cams:
            for pid in self._ids:
                entries = self.folder_entries(cam, pid)
                if not entries:
                    continue
                numbers = _perm_entry(perm, cam, pid, trial, self.root)
                for number in numbers[:shots]:
                    name = _find_image(entries, number)
                    if name is None:
                        raise _missing("SYSU-MM01", self.root, f"cam{cam}/{pid:04d}/{number:04d}.jpg",
                                       f"drawn by exp/rand_perm_cam.mat for trial {trial}")
                    triples.append((cam, pid, name))
        return sorted(triples)

    def rand_perm_cam(self):
        """The permutations of ``exp/rand_perm_cam.mat`` (cached), one cell per camera."""
        if not hasattr(self, "_perm"):
            rel = "exp/rand_perm_cam.mat"
            path = os.path.join(self.root, "exp", "rand_perm_cam.mat")
            if not os.path.isfile(path):
                raise _missing("SYSU-MM01", self.root, rel, "needed by draw='matlab'; use draw='agw' without it")
            from scipy.io import loadmat

            mat = loadmat(path)
            if "rand_perm_cam" not in mat:
                raise ValueError(f"SYSU-MM01 at {self.root!r}: {rel} has no 'rand_perm_cam' variable")
            # loadmat gives a (6, 1) cell array: one (1, num_ids) cell array per camera, each
            # holding a (num_trials, num_images) array of 1-based image numbers.
            cells = np.asarray(mat["rand_perm_cam"], dtype=object).reshape(-1)
            if cells.size < 6:
                raise ValueError(f"SYSU-MM01 at {self.root!r}: {rel}: expected 6 camera cells, got {cells.size}")
            self._perm = [np.asarray(cell, dtype=object).reshape(-1) for cell in cells]
        return self._perm


def _perm_entry(perm, cam: int, pid: int, trial: int, root: str) -> List[int]:
    """Image numbers of ``perm[cam][pid][trial]``; [] when the cell is empty."""
    cam_cells = perm[cam - 1]
    if pid - 1 >= cam_cells.size:
        raise ValueError(f"SYSU-MM01 at {root!r}: exp/rand_perm_cam.mat: camera {cam} has {cam_cells.size} "
                         f"identity cells, identity {pid} is out of range")
    entry = np.asarray(cam_cells[pid - 1])
    if entry.size == 0:
        return []
    entry = np.atleast_2d(entry)
    if trial >= entry.shape[0]:
        raise ValueError(f"trial: exp/rand_perm_cam.mat has {entry.shape[0]} trials "
                         f"(camera {cam}, identity {pid}), got trial {trial}")
    row = entry[trial].astype(np.float64)
    if not np.all(row == np.round(row)):
        raise ValueError(f"SYSU-MM01 at {root!r}: exp/rand_perm_cam.mat: non-integer image numbers")
    return [int(x) for x in row]


def _find_image(entries: Sequence[str], number: int) -> Optional[str]:
    stem = f"{number:04d}"
    for name in entries:
        if os.path.splitext(name)[0] == stem:
            return name
    return None


class RegDB:
    """RegDB test splits from ``idx/test_{visible,thermal}_{trial}.txt``."""

    def __init__(self, root: Union[str, os.PathLike]):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"RegDB root {self.root!r} is not a directory")
        if not os.path.isdir(os.path.join(self.root, "idx")):
            raise _missing("RegDB", self.root, "idx", "expected idx/test_{visible,thermal}_{1..10}.txt")

    def split(self, trial: int, modality: str) -> Samples:
        """Test images of one modality (``"visible"``/``"thermal"``) of trial 1..10."""
        _check_choice("modality", modality, tuple(REGDB_CAMS))
        rel = f"idx/test_{modality}_{trial}.txt"
        path = os.path.join(self.root, "idx", f"test_{modality}_{trial}.txt")
        if not os.path.isfile(path):
            raise _missing("RegDB", self.root, rel, f"test split of trial {trial}")
        paths, pids = [], []
        with open(path, "rt") as handle:
            for number, line in enumerate(handle.read().splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.split(" ")
                try:
                    paths.append(parts[0].lstrip("/"))
                    pids.append(int(parts[1]))
                except (IndexError, ValueError):
                    raise ValueError(f"RegDB at {self.root!r}: {rel} line {number}: expected '<path> <label>', "
                                     f"got {line!r}")
        if not paths:
            raise ValueError(f"RegDB at {self.root!r}: {rel} lists no image")
        cams = np.full(len(paths), REGDB_CAMS[modality], dtype=np.int64)
        return Samples(self.root, tuple(paths), np.asarray(pids, dtype=np.int64), cams)


# ------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------
@dataclass
class FeatureTable:
    """Precomputed features: ``paths[i]`` (relative to the dataset root or absolute) -> ``features[i]``."""

    paths: Sequence[str]
    features: object

    def as_mapping(self) -> Dict[str, object]:
        feats = self.features
        if len(self.paths) != len(feats):
            raise ValueError(f"features: expected {len(self.paths)} rows (one per path), got {len(feats)}")
        return {_normalise_key(p): feats[i] for i, p in enumerate(self.paths)}


def _normalise_key(path: str) -> str:
    return os.fspath(path).replace(os.sep, "/")


def _to_matrix(name: str, value, expected_rows: int) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    elif not isinstance(value, torch.Tensor):
        value = torch.as_tensor(np.asarray(value))
    value = value.detach()
    if value.dim() != 2 or value.shape[0] != expected_rows:
        raise ValueError(f"{name}: expected a ({expected_rows}, D) feature matrix, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected floating-point features, got dtype {value.dtype}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name}: expected finite features, got NaN/inf entries")
    return value


def _extract(source: FeatureSource, samples: Samples, what: str) -> torch.Tensor:
    """Features of ``samples`` in order from a callable or a mapping."""
    if isinstance(source, FeatureTable):
        source = source.as_mapping()
    if isinstance(source, Mapping):
        rows = []
        abs_paths = samples.absolute_paths()
        for rel, absolute in zip(samples.paths, abs_paths):
            key = rel if rel in source else _normalise_key(absolute)
            if key not in source:
                raise KeyError(f"{what}: no feature for image {rel!r} (nor {absolute!r})")
            rows.append(torch.as_tensor(np.asarray(source[key])) if not isinstance(source[key], torch.Tensor)
                        else source[key].detach())
        return _to_matrix(what, torch.stack(rows), len(samples))
    if callable(source):
        return _to_matrix(what, source(samples.absolute_paths()), len(samples))
    raise TypeError(f"{what}: expected a callable extractor or a mapping path -> feature, got {type(source).__name__}")


def _union(samples_list: Sequence[Samples]) -> Samples:
    seen: Dict[str, int] = {}
    paths, pids, cams = [], [], []
    for samples in samples_list:
        for path, pid, cam in zip(samples.paths, samples.pids, samples.cams):
            if path not in seen:
                seen[path] = len(paths)
                paths.append(path)
                pids.append(pid)
                cams.append(cam)
    root = samples_list[0].root if samples_list else ""
    return Samples(root, tuple(paths), np.asarray(pids, dtype=np.int64), np.asarray(cams, dtype=np.int64))


# ------------------------------------------------------------------------------------
# Distances and post-processing
# ------------------------------------------------------------------------------------
def _distance(qf: torch.Tensor, gf: torch.Tensor, distance) -> torch.Tensor:
    if callable(distance):
        dist = distance(qf, gf)
        return _to_matrix("distance(q, g)", dist, qf.shape[0]).to(qf.device)
    if distance == "cosine":
        q = torch.nn.functional.normalize(qf, dim=1)
        g = torch.nn.functional.normalize(gf, dim=1)
        return 1.0 - q @ g.T
    if distance == "euclidean":
        return torch.cdist(qf, gf).pow_(2)
    raise ValueError(f"distance: expected 'cosine', 'euclidean' or a callable, got {distance!r}")


POSTPROCESSES = (None, "aim", "aim-paper", "k_reciprocal")


def _postprocessed_distance(qf, gf, distance, postprocess, dataset, mode, shot):
    if postprocess is None:
        return _distance(qf, gf, distance)
    from . import rerank

    if postprocess in ("aim", "aim-paper"):
        k1, k2 = rerank.aim_parameters(dataset, mode, shot)
        form = "paper" if postprocess == "aim-paper" else "code"
        return rerank.aim(qf, gf, k1=k1, k2=k2, form=form)
    if postprocess == "k_reciprocal":
        return rerank.k_reciprocal_rerank(qf, gf)
    if callable(postprocess):
        return _to_matrix("postprocess(q, g)", postprocess(qf, gf), qf.shape[0]).to(qf.device)
    raise ValueError(f"postprocess: expected one of {POSTPROCESSES} or a callable, got {postprocess!r}")


# ------------------------------------------------------------------------------------
# Result table
# ------------------------------------------------------------------------------------
@dataclass
class SettingResult:
    """All trials of one setting (e.g. SYSU all-search single-shot)."""

    name: str
    trials: List[RankingResult] = field(default_factory=list)

    def values(self, metric: str) -> np.ndarray:
        if metric == "mAP":
            return np.asarray([t.mAP for t in self.trials])
        if metric == "mINP":
            return np.asarray([t.mINP for t in self.trials])
        if metric.startswith("R"):
            k = int(metric[1:])
            return np.asarray([t.rank(k) for t in self.trials])
        raise ValueError(f"metric: expected R<k>, mAP or mINP, got {metric!r}")

    def mean(self, metric: str) -> float:
        return float(np.mean(self.values(metric)))

    def std(self, metric: str) -> float:
        """Population standard deviation over trials (numpy's default, ddof=0)."""
        return float(np.std(self.values(metric)))


@dataclass
class ProtocolTable:
    """Per-setting mean ± std over trials of R1/R5/R10/R20, mAP and mINP (in percent when printed)."""

    dataset: str
    settings: List[SettingResult]

    def metrics(self) -> List[str]:
        max_rank = min(len(t.cmc) for s in self.settings for t in s.trials) if self.settings else 0
        return [f"R{k}" for k in REPORTED_RANKS if k <= max_rank] + ["mAP", "mINP"]

    def rows(self) -> List[Dict[str, object]]:
        """Tidy rows: setting, trials, ``<metric>_mean`` / ``<metric>_std`` as fractions."""
        out = []
        for setting in self.settings:
            row: Dict[str, object] = {"setting": setting.name, "trials": len(setting.trials)}
            for metric in self.metrics():
                row[f"{metric}_mean"] = setting.mean(metric)
                row[f"{metric}_std"] = setting.std(metric)
            out.append(row)
        return out

    def __getitem__(self, name: str) -> SettingResult:
        for setting in self.settings:
            if setting.name == name:
                return setting
        raise KeyError(f"setting: expected one of {[s.name for s in self.settings]}, got {name!r}")

    def to_dict(self) -> Dict[str, object]:
        return {"dataset": self.dataset, "rows": self.rows()}

    def to_markdown(self) -> str:
        metrics = self.metrics()
        header = "| setting | trials | " + " | ".join(metrics) + " |"
        rule = "|---|---|" + "---|" * len(metrics)
        lines = [header, rule]
        for setting in self.settings:
            cells = [f"{100 * setting.mean(m):.2f} ± {100 * setting.std(m):.2f}" for m in metrics]
            lines.append(f"| {setting.name} | {len(setting.trials)} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        metrics = self.metrics()
        width = max([len("setting")] + [len(s.name) for s in self.settings])
        head = f"{self.dataset} (mean ± std over trials, %)\n" + f"{'setting':<{width}}  trials  " + "  ".join(
            f"{m:>13}" for m in metrics)
        lines = [head]
        for setting in self.settings:
            cells = "  ".join(f"{100 * setting.mean(m):6.2f} ± {100 * setting.std(m):4.2f}" for m in metrics)
            lines.append(f"{setting.name:<{width}}  {len(setting.trials):>6}  {cells}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------
# One-call evaluation
# ------------------------------------------------------------------------------------
def _check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def _trial_list(name: str, trials, valid: Callable[[int], bool], hint: str) -> List[int]:
    values = list(range(trials)) if isinstance(trials, int) and not isinstance(trials, bool) else list(trials)
    if not values:
        raise ValueError(f"{name}: expected at least one trial, got {trials!r}")
    for t in values:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not valid(int(t)):
            raise ValueError(f"{name}: expected {hint}, got {t!r}")
    return [int(t) for t in values]


def evaluate_features(
    qf: torch.Tensor,
    gf: torch.Tensor,
    query: Samples,
    gallery: Samples,
    *,
    protocol: str,
    distance="cosine",
    postprocess=None,
    dataset: str = "sysu",
    mode: str = "all",
    shot: str = "single",
    max_rank: int = 20,
) -> RankingResult:
    """Distances (+ optional re-ranking) of one query/gallery pair, then :func:`evaluate_ranking`."""
    dist = _postprocessed_distance(qf, gf, distance, postprocess, dataset, mode, shot)
    return evaluate_ranking(dist, query.pids, gallery.pids, query.cams, gallery.cams,
                            max_rank=max_rank, protocol=protocol)


def evaluate_sysu(
    root: Union[str, os.PathLike, SYSUMM01],
    features: FeatureSource,
    *,
    modes: Sequence[str] = SYSU_MODES,
    shots: Sequence[str] = SYSU_SHOTS,
    trials: Union[int, Iterable[int]] = 10,
    draw: str = "agw",
    distance="cosine",
    postprocess=None,
    max_rank: int = 20,
    device: Optional[Union[str, torch.device]] = None,
) -> ProtocolTable:
    """Evaluate features on SYSU-MM01 over every (mode, shot) setting and trial.

    ``features`` is a callable extractor or a mapping path -> feature (module
    docstring). ``trials`` is a count (``10`` -> trials 0..9) or explicit trial
    indices. Each image is extracted once. Returns a :class:`ProtocolTable` with
    settings named ``"all / single-shot"`` etc. A tree without the infrared queries or the
    visible gallery a setting needs raises ``FileNotFoundError`` naming the root, the
    cameras and the identities.
    """
    dataset = root if isinstance(root, SYSUMM01) else SYSUMM01(root)
    for mode in modes:
        _check_choice("modes", mode, SYSU_MODES)
    for shot in shots:
        _check_choice("shots", shot, SYSU_SHOTS)
    _check_choice("draw", draw, SYSU_DRAWS)
    trial_ids = _trial_list("trials", trials, lambda t: t >= 0, "trial indices >= 0")
    dev = torch.device(device) if device is not None else None

    query = dataset.query()
    galleries = {(m, s, t): dataset.gallery(m, s, t, draw) for m in modes for s in shots for t in trial_ids}
    _check_sysu_images(dataset, query, galleries)
    candidates = _union(list(galleries.values()))
    qf = _extract(features, query, "features (queries)")
    cf = _extract(features, candidates, "features (gallery)")
    if dev is not None:
        qf, cf = qf.to(dev), cf.to(dev)
    row_of = {path: i for i, path in enumerate(candidates.paths)}
    # Plain distances are per (query, gallery) pair: compute them once for every drawn image,
    # then each trial selects its columns. Re-ranking depends on the whole gallery: per trial.
    shared = _distance(qf, cf, distance) if postprocess is None and distance in ("cosine", "euclidean") else None

    settings = []
    for mode in modes:
        for shot in shots:
            result = SettingResult(f"{mode} / {shot}-shot")
            for t in trial_ids:
                gallery = galleries[(mode, shot, t)]
                rows = torch.as_tensor([row_of[p] for p in gallery.paths], dtype=torch.int64, device=cf.device)
                if shared is not None:
                    result.trials.append(evaluate_ranking(
                        shared.index_select(1, rows), query.pids, gallery.pids, query.cams, gallery.cams,
                        max_rank=max_rank, protocol="sysu"))
                    continue
                result.trials.append(evaluate_features(
                    qf, cf.index_select(0, rows), query, gallery, protocol="sysu", distance=distance,
                    postprocess=postprocess, dataset="sysu", mode=mode, shot=shot, max_rank=max_rank))
            settings.append(result)
    return ProtocolTable("SYSU-MM01", settings)


def _ids_text(ids: Sequence[int], limit: int = 10) -> str:
    ids = [int(i) for i in ids]
    return ", ".join(map(str, ids[:limit])) + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def _check_sysu_images(dataset: SYSUMM01, query: Samples, galleries: Mapping[tuple, Samples]) -> None:
    """A tree without the images a setting needs is an error naming the cameras and identities
    (instead of an empty distance matrix or an index error further down)."""
    ids = dataset.test_ids
    where = f"SYSU-MM01 at {dataset.root!r}"
    if not len(query):
        raise FileNotFoundError(
            f"{where}: no infrared query image: none of the {len(ids)} test identities of exp/test_id.txt "
            f"({_ids_text(ids)}) has images in {', '.join(f'cam{c}/<id>/' for c in SYSU_QUERY_CAMS)}")
    for (mode, shot, trial), gallery in galleries.items():
        folders = ", ".join(f"cam{c}/<id>/" for c in SYSU_GALLERY_CAMS[mode])
        if not len(gallery):
            raise FileNotFoundError(
                f"{where}: no visible gallery image for {mode}-search: none of the {len(ids)} test identities of "
                f"exp/test_id.txt ({_ids_text(ids)}) has images in {folders}")
        matched = np.intersect1d(query.pids, gallery.pids)
        if not matched.size:
            raise FileNotFoundError(
                f"{where}: no test identity has both an infrared query and a visible gallery image for "
                f"{mode}-search: identities {_ids_text(np.unique(query.pids))} have infrared images only, "
                f"{_ids_text(np.unique(gallery.pids))} visible images ({folders}) only")


def evaluate_regdb(
    root: Union[str, os.PathLike, RegDB],
    features_per_trial: Mapping[int, FeatureSource],
    *,
    trials: Optional[Iterable[int]] = None,
    directions: Sequence[str] = REGDB_DIRECTIONS,
    distance="cosine",
    postprocess=None,
    max_rank: int = 20,
    device: Optional[Union[str, torch.device]] = None,
) -> ProtocolTable:
    """Evaluate RegDB over trials (default 1..10) and both search directions.

    ``features_per_trial[t]`` is the feature source (extractor of the model trained on
    split ``t``, or precomputed features) for trial ``t``. A trial without one raises
    ``KeyError`` -- never silently reuse another trial's model.
    """
    dataset = root if isinstance(root, RegDB) else RegDB(root)
    if not isinstance(features_per_trial, Mapping):
        raise TypeError("features_per_trial: expected a mapping trial -> feature source (one model per RegDB "
                        f"split), got {type(features_per_trial).__name__}")
    for direction in directions:
        _check_choice("directions", direction, REGDB_DIRECTIONS)
    trial_ids = _trial_list("trials", range(1, 11) if trials is None else trials, lambda t: t >= 1,
                            "RegDB trial numbers >= 1")
    dev = torch.device(device) if device is not None else None
    settings = {d: SettingResult(d) for d in directions}
    for t in trial_ids:
        if t not in features_per_trial:
            raise KeyError(f"features_per_trial: no model/features for RegDB trial {t} (given: "
                           f"{sorted(features_per_trial)}); the community code would silently evaluate the "
                           "previous trial's model on identities it was trained on")
        source = features_per_trial[t]
        split = {m: dataset.split(t, m) for m in REGDB_CAMS}
        feats = {m: _extract(source, split[m], f"features (trial {t}, {m})") for m in REGDB_CAMS}
        if dev is not None:
            feats = {m: f.to(dev) for m, f in feats.items()}
        for direction in directions:
            q_mod, g_mod = direction.split("->")
            settings[direction].trials.append(evaluate_features(
                feats[q_mod], feats[g_mod], split[q_mod], split[g_mod], protocol="regdb", distance=distance,
                postprocess=postprocess, dataset="regdb", max_rank=max_rank))
    return ProtocolTable("RegDB", [settings[d] for d in directions])
