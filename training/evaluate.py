"""Evaluation of a trained model on the SYSU-MM01 / RegDB protocols (and synthetic data).

The engine calls exactly one function, :func:`evaluate`, so the protocol code lives in one
place. The test descriptor is the recipe's (:meth:`Recipe.test_descriptor`: LbA's
GeM-pooled layer4 features, MCE's BNNeck output), ranked by cosine distance -- or, with
``eval.rerank``, by k-reciprocal re-ranking or SAAI's AIM (any recipe); infrared images go
through the infrared stem, visible through the visible stem. SYSU-layout data (real or
synthetic) uses :func:`reid_kernels.protocols.evaluate_sysu` (query = IR cameras 3 and 6,
gallery drawn per trial with the AGW code's mechanism); RegDB uses
:func:`reid_kernels.protocols.evaluate_regdb` on the configured trial.

CLI: ``python -m training.evaluate --checkpoint run/final.pt [--data-root DIR] [--json out.json] [key=value ...]``
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before anything loads torch: its CPU kernels are chosen then
    from .reproducible import pin_from_argv

    pin_from_argv()

import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from .features import extract_features
from .recipes import recipe_class

IR_CAMS = ("cam3", "cam6")
POSTPROCESS = {"none": None, "k_reciprocal": "k_reciprocal", "aim": "aim", "aim-paper": "aim-paper"}
JSON_METRICS = ("mAP", "R1", "R10", "R20", "mINP")


def modality_of(path: str, dataset: str) -> str:
    """'infrared' for SYSU cameras 3/6 and RegDB ``Thermal/`` images, else 'visible'."""
    parts = os.path.normpath(path).split(os.sep)
    if dataset == "regdb":
        return "infrared" if "Thermal" in parts else "visible"
    return "infrared" if any(p in IR_CAMS for p in parts) else "visible"


class FeatureExtractor:
    """Callable ``paths -> (N, D)`` CPU features, each image through its modality's stem; each
    image is extracted once (a second protocol run reuses the features)."""

    def __init__(self, model, cfg: dict, device: torch.device):
        self.model = model.module if hasattr(model, "module") else model
        self.cfg = cfg
        self.device = device
        self.descriptor = recipe_class(cfg).test_descriptor(cfg)
        self.cache: Dict[str, torch.Tensor] = {}

    def __call__(self, paths: Sequence[str]) -> torch.Tensor:
        dataset = self.cfg["data"]["dataset"]
        todo = [p for p in dict.fromkeys(paths) if p not in self.cache]
        modality = [modality_of(p, dataset) for p in todo]
        for kind in ("visible", "infrared"):
            mine = [p for p, m in zip(todo, modality) if m == kind]
            if not mine:
                continue
            feats = extract_features(self.model, mine, kind, height=self.cfg["data"]["height"],
                                     width=self.cfg["data"]["width"], descriptor=self.descriptor,
                                     batch_size=self.cfg["eval"]["batch_size"], device=self.device).cpu()
            self.cache.update(zip(mine, feats))
        if not paths:
            return torch.zeros(0, self.model.feat_dim)
        return torch.stack([self.cache[p] for p in paths])


def _summary(rows: List[Dict[str, object]]) -> Dict[str, float]:
    first = rows[0]
    return {"mAP": float(first["mAP_mean"]), "R1": float(first["R1_mean"]),
            "mINP": float(first["mINP_mean"]), "setting": first["setting"]}


def _protocol(dataset_root: str, cfg: dict, extractor, postprocess):
    from reid_kernels import protocols

    ev = cfg["eval"]
    if cfg["data"]["dataset"] == "regdb":
        trial = cfg["data"]["trial"]
        return protocols.evaluate_regdb(dataset_root, {trial: extractor}, trials=[trial], postprocess=postprocess,
                                        max_rank=ev["max_rank"])
    return protocols.evaluate_sysu(dataset_root, extractor, modes=ev["modes"], shots=ev["shots"],
                                   trials=ev["trials"], draw="agw", postprocess=postprocess, max_rank=ev["max_rank"])


def evaluate(model, dataset_root: str, cfg: dict) -> Dict[str, object]:
    """Evaluate ``model`` on the test protocol of ``cfg['data']['dataset']`` at ``dataset_root``.

    With ``eval.rerank`` set, every setting is evaluated with the post-process (rows named
    ``"<setting> + <rerank>"``, first) and without it (rows named ``"<setting>"``), from the same
    features. Returns ``{"table": printable table(s), "rows": per-setting means/stds
    (fractions), "summary": {"mAP", "R1", "mINP", "setting"} of the first row, "seconds"}``.
    """
    device = next(model.parameters()).device
    extractor = FeatureExtractor(model, cfg, device)
    rerank = cfg["eval"]["rerank"]
    start = time.time()
    table = _protocol(dataset_root, cfg, extractor, POSTPROCESS[rerank])
    rows, text = table.rows(), str(table)
    if rerank != "none":
        plain = _protocol(dataset_root, cfg, extractor, None)
        rows = [dict(r, setting=f"{r['setting']} + {rerank}") for r in rows] + plain.rows()
        text = f"with eval.rerank={rerank}:\n{text}\nwithout re-ranking:\n{plain}"
    return {"table": text, "rows": rows, "summary": _summary(rows), "seconds": time.time() - start}


def json_rows(rows: List[Dict[str, object]]) -> Dict[str, object]:
    """``{"rows": [{"setting", "mAP", "R1", "R10", "R20", "mINP"}, ...]}`` in percent (mean over trials)."""
    out = []
    for row in rows:
        entry: Dict[str, object] = {"setting": row["setting"]}
        for metric in JSON_METRICS:
            if f"{metric}_mean" in row:
                entry[metric] = round(100.0 * float(row[f"{metric}_mean"]), 4)
        out.append(entry)
    return {"rows": out, "units": "percent"}


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import one_line_failures

    return one_line_failures(lambda: _main(argv))


def _main(argv: Optional[List[str]] = None) -> int:
    from .cli import parser as cli_parser
    from .config import flatten, load_config
    from .reproducible import add_argument as add_reproducible_flag
    from .data import resolve_data_root
    from .engine.checkpoint import load_model_from_checkpoint, read_checkpoint

    parser = cli_parser("evaluate", description="Evaluate a checkpoint on its dataset's test protocol.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by training.train")
    parser.add_argument("--data-root", default=None, help="dataset folder (default: the one in the checkpoint)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", default=None, metavar="PATH",
                        help='write {"rows": [{"setting", "mAP", "R1", "R10", "R20", "mINP"}, ...]} to PATH; '
                             "figures in percent (0-100), means over the gallery trials")
    add_reproducible_flag(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.trials=10 eval.rerank=aim")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device: 'cuda' asked for, but no CUDA device is available (use --device cpu)")
    state = read_checkpoint(args.checkpoint)
    cfg = load_config(None, args.overrides, updates=flatten(state["config"]))
    if args.data_root:
        cfg["data"]["root"] = args.data_root
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    model = load_model_from_checkpoint(state, cfg).to(device)
    result = evaluate(model, resolve_data_root(cfg, generate=False), cfg)
    print(result["table"])
    print(f"evaluated in {result['seconds']:.1f}s")
    if args.json:
        with open(args.json, "wt") as handle:
            json.dump(json_rows(result["rows"]), handle, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
