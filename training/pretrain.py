"""Pretrain the demo's backbone on a separate synthetic set: the analogue of ImageNet weights.

    python -m training.pretrain [--out runs/pretrain] [--config pretrain_synth] [--epochs N] [key=value ...]

Every seed paper starts from an ImageNet-pretrained ResNet-50; the synthetic demo would otherwise
start from a random initialisation. This stage trains the demo's backbone as an identity
classifier (LbA's baseline losses: cross-entropy and the batch-hard triplet; one shared stem;
visible and infrared images) on a synthetic set of its own -- another generator seed, so other
people than the demo's, and more of them -- and writes
``<out>/backbone.pth``: a torchvision-format ResNet state dict (``conv1``, ``bn1``, ``layer1-4``)
that ``--pretrained`` / ``model.pretrained`` loads into every stem and the shared layers of any
backbone variant, exactly as it loads ImageNet weights.

``<out>`` holds ``data/`` (the pretraining set), ``run/`` (the training run: ``train.log``,
checkpoints, ``history.json``), ``backbone.pth`` and ``backbone.json`` (the settings it was made
with, its SHA-256, its cost). A second call with the same settings reuses the cached file; a call
with other settings, or a cached file that no longer matches its recorded SHA-256, is one line and
exit status 2 (nothing written over).
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before anything loads torch: its CPU kernels are chosen then
    from .reproducible import pin_from_argv

    pin_from_argv()

import hashlib
import json
import os
import sys
import time
import warnings
from typing import Dict, List, Optional

import torch

from . import reproducible
from .engine.durable import atomic_write, atomic_write_text, file_sha256

BACKBONE = "backbone.pth"
MANIFEST = "backbone.json"
MANIFEST_FORMAT = "reid_kernels.pretrain/1"
# What this stage writes into --out; a folder holding anything else is the user's.
ENTRIES = ("data", "run", BACKBONE, MANIFEST)


class PretrainError(ValueError):
    """A pretraining folder or cached backbone the stage refuses; the message names it."""


def torchvision_state_dict(model) -> Dict[str, torch.Tensor]:
    """The backbone's stem and ``layer1..4`` under torchvision's ResNet names (``conv1.weight``,
    ``bn1.running_mean``, ``layer3.0.conv2.weight`` ...): what :func:`training.models.load_pretrained`
    reads. The pooling, BNNeck and classifier are dropped (an ImageNet file has no counterpart)."""
    stem = model.stem_names()[0]
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(f"{stem}."):
            out[name[len(stem) + 1:]] = tensor.detach().clone()
        elif name.startswith("layer"):
            out[name] = tensor.detach().clone()
    return out


def settings_digest(cfg: dict) -> str:
    """What decides the backbone's weights: the config without where it is written."""
    relevant = {k: v for k, v in cfg.items() if k != "out"}
    relevant["data"] = {k: v for k, v in cfg["data"].items() if k != "root"}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_out_folder(out: str) -> None:
    """``out`` is new, empty or this stage's own output; raises :class:`PretrainError` otherwise."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise PretrainError(f"--out: {out} exists and is not a folder")
    foreign = [name for name in sorted(os.listdir(out)) if name not in ENTRIES]
    if foreign:
        raise PretrainError(f"--out: {out} is not empty and not a pretraining folder (it holds {foreign[0]!r}, "
                            "which training.pretrain does not write); name a new or empty folder")


def cached_backbone(out: str, digest: Optional[str] = None) -> Optional[str]:
    """The cached ``<out>/backbone.pth`` if it is intact and was made with ``digest`` (any settings
    when ``None``); ``None`` if there is none; :class:`PretrainError` if it was made otherwise or
    is damaged."""
    path, manifest_path = os.path.join(out, BACKBONE), os.path.join(out, MANIFEST)
    if not os.path.exists(path) and not os.path.exists(manifest_path):
        return None
    if not os.path.isfile(manifest_path):
        raise PretrainError(f"{path}: no {MANIFEST} beside it, so its settings are unknown; delete it to pretrain again")
    try:
        with open(manifest_path, "rt") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as error:
        raise PretrainError(f"{manifest_path}: cannot be read ({error}); delete {out} to pretrain again") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise PretrainError(f"{manifest_path}: not written by training.pretrain (format "
                            f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, expected "
                            f"{MANIFEST_FORMAT!r})")
    if digest is not None and manifest.get("settings_digest") != digest:
        raise PretrainError(f"--out: {out} holds a backbone pretrained with other settings (digest "
                            f"{manifest.get('settings_digest')}, these are {digest}); name another folder or "
                            f"delete it to pretrain again")
    if not os.path.isfile(path):
        raise PretrainError(f"{path}: missing although {MANIFEST} records it; delete {out} to pretrain again")
    actual = file_sha256(path)
    if actual != manifest.get("sha256"):
        raise PretrainError(f"{path}: damaged (SHA-256 {actual[:12]}..., {MANIFEST} records "
                            f"{str(manifest.get('sha256'))[:12]}...); delete it to pretrain again")
    return path


def pretrain(out: str = "runs/pretrain", config: str = "pretrain_synth", overrides: Optional[List[str]] = None,
             updates: Optional[Dict[str, object]] = None, log=print) -> Dict[str, object]:
    """The pretrained backbone of these settings in ``out``: reused when cached, trained otherwise.
    Returns ``{"path", "cached", "seconds", "manifest"}``."""
    from .config import load_config
    from .engine.loop import Trainer

    check_out_folder(out)
    cfg = load_config(config, overrides or [], updates={**(updates or {}), "data.root": os.path.join(out, "data"),
                                                        "out": os.path.join(out, "run")})
    if cfg["model"]["stems"] != 1:
        raise PretrainError(f"model.stems: expected 1 (a torchvision ResNet has one stem, which --pretrained "
                            f"copies into every stem), got {cfg['model']['stems']}")
    digest = settings_digest(cfg)
    cached = cached_backbone(out, digest)
    if cached:
        log(f"reusing the pretrained backbone {cached} (settings {digest})")
        with open(os.path.join(out, MANIFEST), "rt") as handle:
            return {"path": cached, "cached": True, "seconds": 0.0, "manifest": json.load(handle)}
    # An interrupted pretraining left its run folder (this stage's own): continue it bit-exactly.
    resume = os.path.join(cfg["out"], "last.pt")
    resume = resume if os.path.isfile(resume) else None
    if resume:
        log(f"continuing the interrupted pretraining run from {resume}")
    torch.set_num_threads(cfg["train"]["threads"] or torch.get_num_threads())
    start = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "training from scratch": that is what pretraining is
        trainer = Trainer(cfg, quiet=False)
    try:
        result = trainer.fit(resume=resume)
    finally:
        trainer.close()
    seconds = time.time() - start
    path = os.path.join(out, BACKBONE)
    state = torchvision_state_dict(trainer.model)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    summary = result["eval"]["summary"] if result.get("eval") else None
    manifest = {"format": MANIFEST_FORMAT, "settings_digest": digest, "sha256": file_sha256(path),
                "config": cfg, "seconds": seconds, "reproducible": reproducible.state(),
                "identities": trainer.trainset.num_classes, "tensors": len(state),
                # the pretraining set's own held-out identities: a sanity check, not a demo figure
                "held_out": summary}
    atomic_write_text(os.path.join(out, MANIFEST), json.dumps(manifest, indent=1, default=float) + "\n")
    log(f"wrote {path}: {len(state)} tensors, {trainer.trainset.num_classes} identities, {seconds:.0f}s")
    return {"path": path, "cached": False, "seconds": seconds, "manifest": manifest}


def backbone_for_demo(out: str, updates: Optional[Dict[str, object]] = None, log=print) -> str:
    """``<out>/backbone.pth`` for ``training.demo --pretrain``: the cached file whatever settings made
    it (checked intact), else pretrained there first with the default settings and ``updates``."""
    check_out_folder(out)
    cached = cached_backbone(out)
    if cached:
        log(f"starting from the pretrained backbone {cached}")
        return cached
    return pretrain(out, updates=updates, log=log)["path"]


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import one_line_failures, parser as cli_parser
    from .data import DatasetError
    from .engine.checkpoint import CheckpointError
    from .reproducible import add_argument as add_reproducible_flag

    parser = cli_parser("pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/pretrain", help="a new or empty folder, or an earlier pretraining's")
    parser.add_argument("--config", default="pretrain_synth", help="config (default: pretrain_synth)")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's)")
    add_reproducible_flag(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_intermixed_args(argv)
    updates: Dict[str, object] = {}
    if args.epochs is not None:
        updates["train.epochs"] = args.epochs
    if args.threads is not None:
        updates["train.threads"] = args.threads

    def run() -> int:
        result = pretrain(args.out, args.config, args.overrides, updates)
        print(result["path"])
        return 0

    return one_line_failures(run, (CheckpointError, DatasetError, PretrainError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
