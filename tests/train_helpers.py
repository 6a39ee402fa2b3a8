"""Shared pieces of the recipe tests: a tiny synthetic set, small configs, trainers, resume runs,
the train CLI at a tiny size."""
import hashlib
import json
import os
import warnings

import torch

from reid_kernels.training.config import load_config
from reid_kernels.training.engine.loop import Trainer
from reid_kernels.training.synth import SynthConfig, generate
from reid_kernels.training.train import main as train_main

H, W = 32, 16


def tiny_synth(tmp_path_factory, name: str, seed: int) -> str:
    """30 identities (10 held out) of 32x16 images: seconds to generate, enough to learn on."""
    root = tmp_path_factory.mktemp(name)
    generate(str(root), SynthConfig(ids=30, test_ids=10, height=H, width=W, images_per_cam=3, seed=seed,
                                    occlusion=0.0, clutter=1, jitter=0.5, ir_material=0.2))
    return str(root)


def small_config(name: str, root=None, out="runs/unused", **updates):
    """``name`` (a built-in config) shrunk to a CPU test: 32x16 images, width 8, 4 ids x 2, 2 epochs."""
    base = {"data.height": H, "data.width": W, "data.pad": 2, "data.workers": 0, "data.cache": True,
            "sampler.num_ids": 4, "sampler.num_pos": 2, "model.width": 8, "train.epochs": 2, "train.device": "cpu",
            "train.threads": 1, "train.progress": False, "train.tensorboard": False, "eval.trials": 2,
            "eval.final": False, "out": out}
    if root:
        base["data.root"] = root
    base.update(updates)
    return load_config(name, updates=base)


def make_trainer(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Trainer(cfg, quiet=True)


def straight_and_resumed(config, tmp_path, epochs: int = 3, **updates):
    """Train ``epochs`` straight, and ``epochs - 1`` then ``--resume`` for the last one from another
    global RNG state; returns both finished trainers. ``config(out, **updates)`` builds a config."""
    updates = {"train.max_steps_per_epoch": 3, "train.epochs": epochs, **updates}
    straight = make_trainer(config(str(tmp_path / "a"), **updates))
    straight.fit()
    straight.close()
    first = make_trainer(config(str(tmp_path / "b"), **{**updates, "train.epochs": epochs - 1}))
    first.fit()
    first.close()
    torch.manual_seed(12345)  # resume must restore every RNG
    resumed = make_trainer(config(str(tmp_path / "b"), **updates))
    resumed.fit(resume=str(tmp_path / "b" / "last.pt"))
    resumed.close()
    return straight, resumed


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def train_and_evaluate(cfg, root):
    """(mAP of the untrained network, mAP after ``fit``, per-epoch losses, history) of one run."""
    from reid_kernels.training.evaluate import evaluate

    trainer = make_trainer(cfg)
    before = evaluate(trainer.model, root, cfg)["summary"]["mAP"]
    result = trainer.fit()
    trainer.close()
    after = evaluate(trainer.model, root, cfg)["summary"]["mAP"]
    return before, after, [h["loss"] for h in result["history"]], result["history"]


def cli_train_then_evaluate(config: str, root: str, tmp_path, evaluations=((),)):
    """``training.train --config config`` for 2 small steps, then ``training.evaluate --checkpoint
    final.pt --json`` once per tuple of overrides in ``evaluations``; returns each run's JSON rows."""
    from reid_kernels.training.evaluate import main as evaluate_main
    from reid_kernels.training.train import main as train_main

    out = str(tmp_path / "cli")
    args = ["--config", config, "--data-root", root, "--out", out, "data.height=32", "data.width=16",
            "data.pad=2", "model.width=8", "train.epochs=1", "train.max_steps_per_epoch=2", "train.progress=false",
            "eval.trials=1", "sampler.num_ids=4", "sampler.num_pos=2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train_main(args) == 0
    results = []
    for i, overrides in enumerate(evaluations):
        path = tmp_path / f"eval{i}.json"
        assert evaluate_main(["--checkpoint", os.path.join(out, "final.pt"), "--json", str(path), *overrides]) == 0
        results.append(json.loads(path.read_text())["rows"])
    return results


# The train CLI's overrides for a one-step run on tiny_synth's images.
CLI_SMALL = ["data.height=32", "data.width=16", "data.pad=2", "model.width=8", "train.epochs=1",
             "train.max_steps_per_epoch=1", "train.progress=false", "eval.final=false", "train.tensorboard=false"]


def folder_digest(folder) -> dict:
    """{relative path: SHA-1 of its bytes} of every file under ``folder``: "nothing changed" checks."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha1(open(path, "rb").read()).hexdigest()
    return out


def run_train_cli(args, capsys):
    """``python -m training.train ARGS`` in-process: (exit status, stderr stripped)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = train_main(args)
    return code, capsys.readouterr().err.strip()

