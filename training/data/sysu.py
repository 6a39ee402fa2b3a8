"""SYSU-MM01 training set over the dataset's raw folder layout.

``cam1``..``cam6/<4-digit id>/<4-digit image>.jpg``; ``exp/train_id.txt`` and
``exp/val_id.txt`` (comma-separated ids on the first line) list the 395 training
identities (the community code trains on train + val). Visible cameras 1, 2, 4, 5;
infrared cameras 3, 6. The test protocol lives in :mod:`reid_kernels.protocols`.
"""
from __future__ import annotations

import os
from typing import List

from .common import DatasetError, TrainSet, make_list, relabel

RGB_CAMS = (1, 2, 4, 5)
IR_CAMS = (3, 6)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def read_id_file(root: str, name: str) -> List[int]:
    """Ids of ``exp/<name>``: comma-separated integers (the real files have one line)."""
    path = os.path.join(root, "exp", name)
    if not os.path.isfile(path):
        raise DatasetError(f"SYSU-MM01 at {root}: missing id list {path}")
    with open(path, "rt") as handle:
        text = handle.read()
    ids = []
    for token in text.replace("\n", ",").split(","):
        token = token.strip()
        if not token:
            continue
        try:
            ids.append(int(token))
        except ValueError:
            raise DatasetError(f"SYSU-MM01 id list {path}: expected comma-separated integers, got {token!r}")
    return ids


def load_sysu(root: str, splits=("train_id.txt", "val_id.txt")) -> TrainSet:
    """Training images of the ids in ``splits``; raises :class:`DatasetError` naming what is missing."""
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise DatasetError(f"SYSU-MM01 root is not a directory: {root}")
    for cam in RGB_CAMS + IR_CAMS:
        if not os.path.isdir(os.path.join(root, f"cam{cam}")):
            raise DatasetError(f"SYSU-MM01 at {root}: missing camera folder {os.path.join(root, f'cam{cam}')}")
    ids = sorted(set(pid for name in splits for pid in read_id_file(root, name)))
    if not ids:
        raise DatasetError(f"SYSU-MM01 at {root}: no training identity in {', '.join('exp/' + s for s in splits)}")
    visible, infrared = [], []
    for pid in ids:
        for cam in RGB_CAMS + IR_CAMS:
            folder = os.path.join(root, f"cam{cam}", f"{pid:04d}")
            if not os.path.isdir(folder):
                continue
            for name in sorted(os.listdir(folder)):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    (infrared if cam in IR_CAMS else visible).append((os.path.join(folder, name), pid, cam))
    vis_ids = {e[1] for e in visible}
    ir_ids = {e[1] for e in infrared}
    if not visible or not infrared:
        raise DatasetError(f"SYSU-MM01 at {root}: found {len(visible)} visible and {len(infrared)} infrared "
                           "training images; need both")
    # Identities seen by one modality only cannot form a cross-modal batch; keep both-modality ids.
    both = sorted(vis_ids & ir_ids)
    mapping = relabel(both)
    visible = [e for e in visible if e[1] in mapping]
    infrared = [e for e in infrared if e[1] in mapping]
    return TrainSet("SYSU-MM01", root, make_list(visible, mapping), make_list(infrared, mapping), len(mapping),
                    info={"dropped_single_modality_ids": len(ids) - len(both)})
