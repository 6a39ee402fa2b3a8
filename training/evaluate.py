"""Evaluation of a trained model on the SYSU-MM01 / RegDB protocols (and synthetic data).

The engine calls exactly one function, :func:`evaluate`, so the protocol code lives in one
place. Test descriptors are the GeM-pooled layer4 features (ALGORITHMS.md §2.7), ranked
by cosine distance; infrared images go through the infrared stem, visible through the
visible stem. SYSU-layout data (real or synthetic) uses
:func:`reid_kernels.protocols.evaluate_sysu` (query = IR cameras 3 and 6, gallery drawn
per trial with the AGW/LbA code's mechanism); RegDB uses
:func:`reid_kernels.protocols.evaluate_regdb` on the configured trial.

CLI: ``python -m training.evaluate --checkpoint run/final.pt [--data-root DIR] [key=value ...]``
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from .data import ImageCache, normalize

IR_CAMS = ("cam3", "cam6")


def modality_of(path: str, dataset: str) -> str:
    """'infrared' for SYSU cameras 3/6 and RegDB ``Thermal/`` images, else 'visible'."""
    parts = os.path.normpath(path).split(os.sep)
    if dataset == "regdb":
        return "infrared" if "Thermal" in parts else "visible"
    return "infrared" if any(p in IR_CAMS for p in parts) else "visible"


class FeatureExtractor:
    """Callable ``paths -> (N, D)`` features with the model in eval mode."""

    def __init__(self, model, cfg: dict, device: torch.device):
        self.model = model.module if hasattr(model, "module") else model
        self.cfg = cfg
        self.device = device
        self.images = ImageCache(cfg["data"]["height"], cfg["data"]["width"], keep=False)

    @torch.no_grad()
    def __call__(self, paths: Sequence[str]) -> torch.Tensor:
        dataset = self.cfg["data"]["dataset"]
        batch = self.cfg["eval"]["batch_size"]
        modality = [modality_of(p, dataset) for p in paths]
        out: List[Optional[torch.Tensor]] = [None] * len(paths)
        for kind in ("visible", "infrared"):
            idx = [i for i, m in enumerate(modality) if m == kind]
            for start in range(0, len(idx), batch):
                chunk = idx[start:start + batch]
                x = torch.stack([normalize(self.images.get(paths[i])) for i in chunk]).to(self.device)
                feats = self.model.extract(x, kind).float().cpu()
                for j, i in enumerate(chunk):
                    out[i] = feats[j]
        if not out:
            return torch.zeros(0, self.model.feat_dim)
        return torch.stack(out)


def _summary(rows: List[Dict[str, object]]) -> Dict[str, float]:
    first = rows[0]
    return {"mAP": float(first["mAP_mean"]), "R1": float(first["R1_mean"]),
            "mINP": float(first["mINP_mean"]), "setting": first["setting"]}


def evaluate(model, dataset_root: str, cfg: dict) -> Dict[str, object]:
    """Evaluate ``model`` on the test protocol of ``cfg['data']['dataset']`` at ``dataset_root``.

    Returns ``{"table": printable table, "rows": per-setting means/stds (fractions),
    "summary": {"mAP", "R1", "mINP", "setting"} of the first setting, "seconds"}``.
    """
    from reid_kernels import protocols

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    extractor = FeatureExtractor(model, cfg, device)
    ev = cfg["eval"]
    start = time.time()
    try:
        if cfg["data"]["dataset"] == "regdb":
            trial = cfg["data"]["trial"]
            table = protocols.evaluate_regdb(dataset_root, {trial: extractor}, trials=[trial],
                                             max_rank=ev["max_rank"])
        else:
            table = protocols.evaluate_sysu(dataset_root, extractor, modes=ev["modes"], shots=ev["shots"],
                                            trials=ev["trials"], draw="agw", max_rank=ev["max_rank"])
    finally:
        model.train(was_training)
    rows = table.rows()
    return {"table": str(table), "rows": rows, "summary": _summary(rows), "seconds": time.time() - start}


def main(argv: Optional[List[str]] = None) -> int:
    from .config import load_config
    from .engine import load_model_from_checkpoint, resolve_data_root

    parser = argparse.ArgumentParser(description="Evaluate a checkpoint on its dataset's test protocol.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by training.train")
    parser.add_argument("--data-root", default=None, help="dataset folder (default: the one in the checkpoint)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.trials=10")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        parser.error(f"--checkpoint: file not found: {args.checkpoint}")
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    cfg = load_config(None, args.overrides, updates=_flat(state["config"]))
    if args.data_root:
        cfg["data"]["root"] = args.data_root
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    model = load_model_from_checkpoint(state, cfg).to(device)
    result = evaluate(model, resolve_data_root(cfg, generate=False), cfg)
    print(result["table"])
    print(f"evaluated in {result['seconds']:.1f}s")
    return 0


def _flat(cfg: dict, prefix: str = "") -> Dict[str, object]:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


if __name__ == "__main__":
    sys.exit(main())
