"""Where a run's dataset lives; the synthetic set is generated on first use."""
from __future__ import annotations

import hashlib
import json
import os
import time

from .common import DatasetError


def resolve_data_root(cfg: dict, generate: bool = True, log=print) -> str:
    """The dataset folder of ``cfg``; synthetic data is generated there on first use.

    Without ``data.root`` a synthetic set goes to ``runs/data/synth_<H>x<W>_<hash of its
    settings>``, so every run with the same settings shares one copy.
    """
    data = cfg["data"]
    root = data["root"]
    if data["dataset"] != "synth":
        if not root:
            raise ValueError(f"data.root: expected the {data['dataset']} dataset folder (--data-root), got None")
        return root
    if not root:
        s = data["synth"]
        digest = hashlib.sha1(json.dumps(s, sort_keys=True).encode()).hexdigest()[:8]
        root = os.path.join("runs", "data", f"synth_{data['height']}x{data['width']}_{digest}")
    if generate and not os.path.isfile(os.path.join(root, "exp", "test_id.txt")):
        from ..synth import SynthConfig, generate as synth_generate

        if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
            # Never write generated images into a folder the user made: only into a new or empty one.
            raise DatasetError(f"data.root: {root} exists, is not empty and holds no synthetic dataset "
                               "(no exp/test_id.txt); name a new or empty folder for the synthetic data")
        s = data["synth"]
        sc = SynthConfig(ids=s["ids"], test_ids=s["test_ids"], seed=s["seed"], height=data["height"],
                         width=data["width"], images_per_cam=s["images_per_cam"], jitter=s["jitter"],
                         occlusion=s["occlusion"], clutter=s["clutter"], noise=s["noise"], palette=s["palette"],
                         ir_material=s["ir_material"], ir_invert=s["ir_invert"])
        start = time.time()
        counts = synth_generate(root, sc)
        log(f"generated synthetic data at {root}: {counts['rgb']} visible + {counts['ir']} infrared images "
            f"({time.time() - start:.1f}s)")
    return root
