"""Cost of a durable checkpoint save: ``fsync`` of the temporary file and of its folder, and the
SHA-256 digest :func:`training.engine.checkpoint.seal` adds.

A checkpoint shaped as the Trainer writes it (model, SGD momentum buffers, RNG states, config) for
``demo`` (``lba_synth``: ResNet-10 at width 16, 80 classes) or ``paper`` (``lba_sysu``: ResNet-50, two
stems, 395 classes), saved ``--repeat`` times through :func:`~training.engine.checkpoint.atomic_save`
with ``os.fsync`` patched to a no-op (write + rename, what saves were before) and as shipped (write,
fsync, rename, fsync of the folder), the two alternating. Median milliseconds per save.

    python benchmarks/bench_checkpoint_save.py --dir runs/ --json benchmarks/results/checkpoint_save_cpu.json
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: the `training` package
import _common  # noqa: E402
import torch  # noqa: E402

from reid_kernels.training.config import load_config  # noqa: E402
from reid_kernels.training.engine.checkpoint import FORMAT, atomic_save, rng_state, seal  # noqa: E402
from reid_kernels.training.engine.schedule import build_optimizer  # noqa: E402
from reid_kernels.training.recipes import build_model  # noqa: E402

CASES = {"demo": ("lba_synth", 80), "paper": ("lba_sysu", 395)}


def checkpoint_like(config: str, num_classes: int) -> dict:
    cfg = load_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(cfg, num_classes, log=lambda *_: None)
    optimizer = build_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # momentum buffers, as after the first step
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(), "config": cfg,
            "epoch": 1, "step": 1, "history": [], "num_classes": num_classes, "format": FORMAT}


def measure(state: dict, folder: str, repeat: int) -> dict:
    path = os.path.join(folder, "last.pt")
    plain, durable, sealing = [], [], []
    for i in range(repeat):
        for with_fsync in ((False, True) if i % 2 == 0 else (True, False)):
            start = time.perf_counter()
            if with_fsync:
                atomic_save(state, path)
            else:
                with mock.patch("os.fsync", lambda fd: None):
                    atomic_save(state, path)
            (durable if with_fsync else plain).append(time.perf_counter() - start)
        start = time.perf_counter()
        seal(state)
        sealing.append(time.perf_counter() - start)
    return {"bytes": os.path.getsize(path), "rename_only_s": _common.median(plain),
            "durable_s": _common.median(durable), "fsync_extra_s": _common.median(durable) - _common.median(plain),
            "digest_s": _common.median(sealing), "repeat": repeat}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=tuple(CASES), default=["demo"])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--dir", default=".", help="folder on the file system the runs write to (a temporary "
                                                   "folder is made inside it and removed)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for case in args.cases:
        folder = tempfile.mkdtemp(prefix="bench-checkpoint-", dir=args.dir)
        try:
            results[case] = measure(checkpoint_like(*CASES[case]), folder, args.repeat)
        finally:
            shutil.rmtree(folder)
    rows = [[case, f"{r['bytes'] / 2**20:.1f}", _common.fmt_ms(r["rename_only_s"]), _common.fmt_ms(r["durable_s"]),
             _common.fmt_ms(r["fsync_extra_s"]), _common.fmt_ms(r["digest_s"])] for case, r in results.items()]
    print(_common.format_table(["case", "MiB", "write+rename ms", "durable ms", "fsync extra ms", "digest ms"], rows))
    if args.json:
        _common.write_json(args.json, {"environment": _common.environment(torch.device("cpu")), "results": results})


if __name__ == "__main__":
    main()
