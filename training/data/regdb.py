"""RegDB training set from the community split files.

``idx/train_visible_<trial>.txt`` and ``idx/train_thermal_<trial>.txt``: one line per
image, ``<path relative to the root> <label>`` (e.g. ``Visible/12/female_back_v_00110_5.bmp 3``);
images under ``Visible/`` and ``Thermal/``. Trials 1..10 are different identity splits.
"""
from __future__ import annotations

import os
from typing import List, Tuple

from .common import DatasetError, TrainSet, make_list, relabel


def read_split(root: str, name: str) -> List[Tuple[str, int]]:
    """(absolute path, label) pairs of ``idx/<name>``; errors name the file and line."""
    path = os.path.join(root, "idx", name)
    if not os.path.isfile(path):
        raise DatasetError(f"RegDB at {root}: missing split file {path}")
    entries = []
    with open(path, "rt") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            try:
                rel, label = parts[0], int(parts[1])
            except (IndexError, ValueError):
                raise DatasetError(f"RegDB split {path} line {number}: expected '<path> <label>', got {line!r}")
            entries.append((os.path.join(root, *rel.lstrip("/").split("/")), label))
    if not entries:
        raise DatasetError(f"RegDB split {path} lists no image")
    return entries


def load_regdb(root: str, trial: int = 1) -> TrainSet:
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise DatasetError(f"RegDB root is not a directory: {root}")
    if not 1 <= int(trial) <= 10:
        raise DatasetError(f"RegDB trial: expected 1..10, got {trial}")
    visible = read_split(root, f"train_visible_{trial}.txt")
    thermal = read_split(root, f"train_thermal_{trial}.txt")
    for path, _ in visible[:1] + thermal[:1]:
        if not os.path.isfile(path):
            raise DatasetError(f"RegDB at {root}: image file missing: {path}")
    mapping = relabel([l for _, l in visible], [l for _, l in thermal])
    return TrainSet(f"RegDB (trial {trial})", root,
                    make_list([(p, l, 1) for p, l in visible], mapping),
                    make_list([(p, l, 2) for p, l in thermal], mapping), len(mapping), info={"trial": int(trial)})
