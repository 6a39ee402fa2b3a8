"""The dataset check a run makes before its first step (``--skip-data-check`` skips it).

Without it a missing or corrupt image is found only when the sampler happens to draw it --
epochs later, or never -- and a test split the protocol cannot use only at the final
evaluation. The check reads what a run will read:

* every training image of the lists the loader built, and every image the test protocol can
  draw (SYSU-MM01 layout: every file of the test identities' camera folders; RegDB: every
  line of the trial's test split files), exists and decodes completely;
* every test identity has both modalities where the protocol needs them: SYSU-MM01 an
  infrared image (cameras 3, 6: the queries) and a visible one (cameras 1, 2, 4, 5: the
  all-search gallery), and a non-empty gallery in every evaluated mode (indoor: cameras 1,
  2 -- not every identity has one there, so only the gallery as a whole is required);
  RegDB the same identities in its visible and thermal test splits.

A failure raises :class:`DatasetError` whose one-line message names the file (the first
of several, with their count) or the identities.

Decoding is the expensive part; it runs on threads (PIL releases the GIL while decoding)
and, for JPEGs, at 1/8 scale (``Image.draft``): the entropy-coded data is still read to
its end, so a truncated file is still caught, while the inverse DCT shrinks 64-fold.
``Image.verify()`` is no substitute: for a JPEG it reads the headers only and passes a
file cut in half (``tests/test_data_check.py`` shows both).
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, UnidentifiedImageError

from .common import DatasetError, TrainSet

SKIP_HINT = "--skip-data-check skips this check"
# SYSU-MM01 cameras, as in reid_kernels.protocols (queries: infrared; all-search gallery: visible)
SYSU_IR_CAMS = (3, 6)
SYSU_GALLERY_CAMS = {"all": (1, 2, 4, 5), "indoor": (1, 2)}


def decode_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be used as an image (``None`` when it decodes completely)."""
    if not os.path.isfile(path):
        return "file missing"
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (1, 1))  # the smallest DCT scale; every byte is still decoded
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return f"cannot decode: {error}"
    return None


def check_images(paths: Sequence[str], threads: Optional[int] = None) -> int:
    """Decode every image of ``paths``; raises :class:`DatasetError` naming the first bad one
    (in list order) and how many there are. Returns the number of images checked."""
    unique = list(dict.fromkeys(paths))
    workers = threads or min(16, os.cpu_count() or 1)
    if workers > 1 and len(unique) > 64:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            problems = list(pool.map(decode_problem, unique, chunksize=64))
    else:
        problems = [decode_problem(p) for p in unique]
    bad = [(p, why) for p, why in zip(unique, problems) if why is not None]
    if bad:
        path, why = bad[0]
        more = f" (and {len(bad) - 1} more of the {len(unique)} images)" if len(bad) > 1 else ""
        raise DatasetError(f"data check: {path}: {why}{more}; {SKIP_HINT}")
    return len(unique)


def _ids_text(ids: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def sysu_test_images(root: str, modes: Sequence[str]) -> Tuple[List[str], int]:
    """(every image path the SYSU-MM01 protocol can read, number of test identities); raises
    :class:`DatasetError` when a test identity lacks a modality or a mode has no gallery."""
    from reid_kernels.protocols import SYSUMM01

    try:
        dataset = SYSUMM01(root)
    except (FileNotFoundError, ValueError) as error:
        raise DatasetError(f"data check: {error}") from error
    ids = dataset.test_ids
    by_cam: Dict[int, Dict[int, List[str]]] = {
        cam: {pid: dataset.folder_entries(cam, pid) or [] for pid in ids} for cam in range(1, 7)}
    no_ir = [pid for pid in ids if not any(by_cam[c][pid] for c in SYSU_IR_CAMS)]
    if no_ir:
        raise DatasetError(f"data check: SYSU-MM01 at {root}: test identities {_ids_text(no_ir)} of exp/test_id.txt "
                           f"have no infrared image (cam3/<id>/, cam6/<id>/), which the protocol's queries need; "
                           f"{SKIP_HINT}")
    no_visible = [pid for pid in ids if not any(by_cam[c][pid] for c in SYSU_GALLERY_CAMS["all"])]
    if no_visible:
        raise DatasetError(f"data check: SYSU-MM01 at {root}: test identities {_ids_text(no_visible)} of "
                           "exp/test_id.txt have no visible image (cam1/, cam2/, cam4/, cam5/ <id>/), which the "
                           f"protocol's gallery needs; {SKIP_HINT}")
    for mode in modes:
        cams = SYSU_GALLERY_CAMS[mode]
        if not any(by_cam[c][pid] for c in cams for pid in ids):
            folders = ", ".join(f"cam{c}/" for c in cams)
            raise DatasetError(f"data check: SYSU-MM01 at {root}: no test identity has a visible image in {folders} "
                               f"(the {mode}-search gallery; evaluated because eval.modes lists {mode!r}); "
                               f"{SKIP_HINT}")
    paths = [os.path.join(root, f"cam{cam}", f"{pid:04d}", name)
             for pid in ids for cam in range(1, 7) for name in by_cam[cam][pid]]
    return paths, len(ids)


def regdb_test_images(root: str, trial: int) -> Tuple[List[str], int]:
    """(every image path of RegDB's test split ``trial``, number of test identities); raises
    :class:`DatasetError` when an identity is in one modality's split only."""
    from reid_kernels.protocols import RegDB

    try:
        splits = {m: RegDB(root).split(trial, m) for m in ("visible", "thermal")}
    except (FileNotFoundError, ValueError) as error:
        raise DatasetError(f"data check: {error}") from error
    ids = {m: set(int(p) for p in s.pids) for m, s in splits.items()}
    for mine, other in (("visible", "thermal"), ("thermal", "visible")):
        lonely = sorted(ids[mine] - ids[other])
        if lonely:
            raise DatasetError(f"data check: RegDB at {root}: test identities {_ids_text(lonely)} of "
                               f"idx/test_{mine}_{trial}.txt have no image in idx/test_{other}_{trial}.txt; "
                               f"{SKIP_HINT}")
    paths = [p for s in splits.values() for p in s.absolute_paths()]
    return paths, len(ids["visible"])


def check_dataset(dataset: str, root: str, trainset: TrainSet, modes: Sequence[str] = ("all",), trial: int = 1,
                  threads: Optional[int] = None) -> str:
    """Check ``trainset`` and the test split of ``dataset`` at ``root`` (module docstring);
    returns a one-line summary for the log, raises :class:`DatasetError` on the first problem."""
    start = time.time()
    if dataset == "regdb":
        test_paths, test_ids = regdb_test_images(root, trial)
    else:  # SYSU-MM01 and the synthetic set in its layout
        test_paths, test_ids = sysu_test_images(root, modes)
    count = check_images(list(trainset.visible.paths) + list(trainset.infrared.paths) + test_paths, threads)
    return (f"data check: {count} images decode, {test_ids} test identities with both modalities "
            f"({time.time() - start:.1f}s)")
