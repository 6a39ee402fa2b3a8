"""Training engine: data -> sampler -> model -> recipe loss -> optimiser, with checkpoints and evaluation.

* SGD (Nesterov) with two learning rates (backbone / BNNeck + classifier), linear
  warm-up then x``gamma`` decays at the ``milestones`` epochs (LbA, ALGORITHMS.md §2.8),
  applied per epoch as the LbA code does;
* AMP (bf16 or fp16 with a gradient scaler) on CUDA only;
* checkpoints written atomically (temporary file + ``os.replace``) holding the model,
  optimiser, schedule, sampler, recipe generator and every RNG state, so ``resume``
  continues bit-exactly from an epoch boundary;
* DDP under ``torchrun`` (gloo on CPU, NCCL on CUDA): each rank takes every
  ``world_size``-th sampler batch; rank 0 logs, evaluates and writes checkpoints.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import random
import sys
import time
import warnings
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .config import dump
from .data import CrossModalityIdentitySampler, PairedDataset, build_train_transform, collate_pairs, load_trainset
from .models import build_model
from .recipes import RECIPES


# ---------------------------------------------------------------------------------------
# Learning-rate schedule (per epoch)
# ---------------------------------------------------------------------------------------
def lr_factor(epoch: int, warmup_epochs: int, milestones, gamma: float) -> float:
    """LbA: ``(e + 1) / warmup`` during warm-up, then ``gamma ** (#milestones passed)``."""
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    return gamma ** sum(1 for m in milestones if epoch >= m)


class EpochSchedule:
    """Sets each parameter group's lr to ``base_lr * lr_factor(epoch)``; state = the epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: dict):
        self.optimizer = optimizer
        self.cfg = cfg
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        f = lr_factor(epoch, self.cfg["warmup_epochs"], self.cfg["milestones"], self.cfg["gamma"])
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * f

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state) -> None:
        self.set_epoch(int(state["epoch"]))


def build_optimizer(model, cfg: dict) -> torch.optim.SGD:
    inner = model.module if hasattr(model, "module") else model
    o = cfg["optim"]
    groups = [{"params": list(inner.backbone_parameters()), "base_lr": o["lr_backbone"], "lr": o["lr_backbone"]},
              {"params": list(inner.head_parameters()), "base_lr": o["lr_head"], "lr": o["lr_head"]}]
    return torch.optim.SGD(groups, lr=o["lr_backbone"], momentum=o["momentum"], weight_decay=o["weight_decay"],
                           nesterov=o["nesterov"] and o["momentum"] > 0)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def rng_state() -> Dict[str, object]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, object]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_save(obj, path: str) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written checkpoint."""
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def resolve_data_root(cfg: dict, generate: bool = True, log=print) -> str:
    """The dataset folder; synthetic data is generated there on first use."""
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
        from .synth import SynthConfig, generate as synth_generate

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


def make_logger(out: Optional[str], rank: int) -> logging.Logger:
    logger = logging.getLogger(f"training.{out}.{rank}")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if out and rank == 0:
        os.makedirs(out, exist_ok=True)
        handler = logging.FileHandler(os.path.join(out, "train.log"))
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def load_model_from_checkpoint(state: dict, cfg: dict):
    model_cfg = dict(cfg["model"], pretrained=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(model_cfg, state["num_classes"], log=lambda *_: None)
    model.load_state_dict(state["model"])
    return model


class _TensorBoard:
    """Scalars to TensorBoard when ``torch.utils.tensorboard`` imports, otherwise nothing."""

    def __init__(self, out: str, enabled: bool, log):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: one notice, then silence
            log("TensorBoard not available (pip install tensorboard); logging to train.log only")
            return
        self.writer = SummaryWriter(os.path.join(out, "tb"))

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: dict, out: Optional[str] = None, quiet: bool = False):
        self.cfg = cfg
        self.out = out or cfg["out"]
        self.rank, self.world_size, self.local_rank = _distributed_env()
        self.log = make_logger(self.out, self.rank) if not quiet else _null_logger()
        t = cfg["train"]
        if t["threads"]:
            torch.set_num_threads(t["threads"])
        self.device = _pick_device(t["device"], self.local_rank)
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
        if t["deterministic"]:
            torch.use_deterministic_algorithms(True)
        seed_everything(cfg["seed"] + self.rank)

        # data
        if self.rank == 0:
            self.data_root = resolve_data_root(cfg, generate=True, log=self.log.info)
        self._barrier()
        if self.rank != 0:
            self.data_root = resolve_data_root(cfg, generate=False)
        d = cfg["data"]
        self.trainset = load_trainset(d["dataset"], self.data_root, d["trial"])
        self.log.info(self.trainset.summary())
        s = cfg["sampler"]
        self.sampler = CrossModalityIdentitySampler(self.trainset.visible.labels, self.trainset.infrared.labels,
                                                    s["num_ids"], s["num_pos"], seed=cfg["seed"], rank=self.rank,
                                                    world_size=self.world_size)
        dataset = PairedDataset(self.trainset, build_train_transform(d), d["height"], d["width"], d["cache"])
        self.loader = DataLoader(dataset, batch_size=self.sampler.batch_size, sampler=self.sampler,
                                 num_workers=d["workers"], collate_fn=collate_pairs, drop_last=True,
                                 persistent_workers=d["workers"] > 0, pin_memory=self.device.type == "cuda")

        # model, loss, optimiser
        self.model = build_model(cfg["model"], self.trainset.num_classes, log=self.log.info).to(self.device)
        self.net = self.model
        if self.world_size > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        self.recipe = RECIPES[cfg["recipe"]](cfg["loss"], s["num_ids"], s["num_pos"], seed=cfg["seed"] + self.rank)
        self.optimizer = build_optimizer(self.model, cfg)
        self.schedule = EpochSchedule(self.optimizer, cfg["optim"])
        self.amp_dtype = None
        if t["amp"] != "none":
            if self.device.type != "cuda":
                self.log.info(f"train.amp={t['amp']} ignored: AMP runs on CUDA only (training in float32)")
            else:
                self.amp_dtype = torch.bfloat16 if t["amp"] == "bf16" else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.epoch = 0  # next epoch to run
        self.step = 0
        self.history = []
        self.tb = _TensorBoard(self.out, t["tensorboard"] and self.rank == 0 and not quiet, self.log.info)

    # --- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "sampler": self.sampler.state_dict(),
                "recipe": self.recipe.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_state(),
                "epoch": self.epoch, "step": self.step, "history": self.history, "config": self.cfg,
                "num_classes": self.trainset.num_classes, "format": "reid_kernels.training/1"}

    def save(self, name: str) -> Optional[str]:
        if self.rank != 0:
            return None
        os.makedirs(self.out, exist_ok=True)
        path = os.path.join(self.out, name)
        atomic_save(self.state_dict(), path)
        return path

    def load(self, path: str) -> None:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("format") != "reid_kernels.training/1":
            raise ValueError(f"--resume: {path} is not a checkpoint written by training.train")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.sampler.load_state_dict(state["sampler"])
        self.recipe.load_state_dict(state["recipe"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        self.log.info(f"resumed from {path} at epoch {self.epoch}")

    # --- training ----------------------------------------------------------------------
    def train_epoch(self) -> Dict[str, float]:
        t = self.cfg["train"]
        self.sampler.set_epoch(self.epoch)
        self.schedule.set_epoch(self.epoch)
        self.net.train()
        total = len(self.loader) if t["max_steps_per_epoch"] is None else min(len(self.loader), t["max_steps_per_epoch"])
        bar = _progress(total, f"epoch {self.epoch + 1}/{t['epochs']}", t["progress"] and self.rank == 0)
        sums: Dict[str, float] = {}
        count, images, start = 0, 0, time.time()
        for i, (x_vis, x_ir, y_vis, y_ir) in enumerate(self.loader):
            if i >= total:
                break
            x_vis, x_ir = x_vis.to(self.device, non_blocking=True), x_ir.to(self.device, non_blocking=True)
            labels = torch.cat([y_vis, y_ir]).to(self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                out = self.net(x_vis, x_ir)
                loss, logs = self.recipe(self.net, out, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {self.epoch}, step {i} ({_fmt(logs)})")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            count += 1
            images += 2 * x_vis.shape[0]
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            rate = images / max(time.time() - start, 1e-9)
            if bar is not None:
                bar.set_postfix(loss=f"{float(logs['loss']):.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                img_s=f"{rate:.0f}")
                bar.update(1)
            if self.step % t["log_every"] == 0:
                for k, v in logs.items():
                    self.tb.scalar(f"train/{k}", float(v), self.step)
                self.tb.scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.step)
        if bar is not None:
            bar.close()
        means = {k: v / max(count, 1) for k, v in sums.items()}
        means["seconds"] = time.time() - start
        means["images_per_s"] = images / max(means["seconds"], 1e-9)
        return means

    def evaluate(self) -> Dict[str, object]:
        from .evaluate import evaluate

        return evaluate(self.model, self.data_root, self.cfg)

    def fit(self, resume: Optional[str] = None) -> Dict[str, object]:
        t = self.cfg["train"]
        if resume:
            self.load(resume)
        if self.rank == 0 and self.out:
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "config.yaml"), "wt") as handle:
                handle.write(dump(self.cfg))
        last_eval = None
        while self.epoch < t["epochs"]:
            means = self.train_epoch()
            self.epoch += 1
            record = {"epoch": self.epoch, **{k: round(v, 5) for k, v in means.items()}}
            self.log.info(f"epoch {self.epoch}: {_fmt(means)} lr {self.optimizer.param_groups[0]['lr']:.2e}")
            do_eval = t["eval_every"] and self.epoch % t["eval_every"] == 0 and self.epoch < t["epochs"]
            if do_eval and self.rank == 0:
                last_eval = self.evaluate()
                record["eval"] = last_eval["summary"]
                self._log_eval(last_eval)
            self.history.append(record)
            for k, v in means.items():
                self.tb.scalar(f"epoch/{k}", v, self.epoch)
            if self.epoch % t["checkpoint_every"] == 0 or self.epoch == t["epochs"]:
                self.save("last.pt")
            self._barrier()
        if self.cfg["eval"]["final"] and self.rank == 0:
            last_eval = self.evaluate()
            self._log_eval(last_eval)
        path = self.save("final.pt")
        if self.rank == 0 and self.out:
            with open(os.path.join(self.out, "history.json"), "wt") as handle:
                json.dump({"history": self.history, "final": last_eval and {k: last_eval[k] for k in ("rows", "summary")}},
                          handle, indent=1, default=float)
        self.tb.close()
        self._barrier()
        return {"eval": last_eval, "history": self.history, "checkpoint": path}

    def _log_eval(self, result: Dict[str, object]) -> None:
        self.log.info(result["table"])
        s = result["summary"]
        for k in ("mAP", "R1", "mINP"):
            self.tb.scalar(f"eval/{k}", s[k], self.epoch)

    def _barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
        for handler in list(self.log.handlers):
            handler.close()
            self.log.removeHandler(handler)


def _fmt(values: Dict[str, float]) -> str:
    return " ".join(f"{k} {float(v):.4g}" for k, v in values.items())


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _distributed_env():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def _pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device: 'cuda' requested but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _null_logger() -> logging.Logger:
    logger = logging.getLogger("training.null")
    logger.handlers.clear()
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return logger
