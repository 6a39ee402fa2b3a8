"""The training loop: data -> sampler -> model -> recipe -> optimiser, with hooks, checkpoints
and evaluation. It knows no method: the recipe (``cfg["recipe"]``) declares the batch it
needs, computes the losses and runs its own hooks.

* AMP (bf16, or fp16 with a gradient scaler) on CUDA only;
* DDP under ``torchrun`` (gloo on CPU, NCCL on CUDA): each rank takes every
  ``world_size``-th sampler batch; rank 0 logs, evaluates and writes checkpoints;
* ``resume`` continues bit-exactly from an epoch boundary (see :mod:`.checkpoint`), with the
  checkpoint's config: a key outside :data:`~training.config.RESUME_OVERRIDABLE` may differ only
  with ``resume_with_changes``; every change is logged, kept in the checkpoint and in
  ``history.json`` (``config_changes``) and in ``config_changes.yaml`` beside the run's original
  ``config.yaml``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Dict, List, Optional

import torch
from torch.utils.data import DataLoader

from .. import reproducible
from ..config import ConfigError, dump, undo_changes
from ..data import (CrossModalityIdentitySampler, DatasetError, ImageCache, ModalityDataset, build_train_transform,
                    collate_batch, load_trainset, resolve_data_root)
from ..data.check import check_dataset
from ..evaluate import evaluate
from ..features import extract_features
from ..recipes import TrainContext, build_model, recipe_class
from . import distributed
from .checkpoint import (CheckpointMismatch, atomic_save, check_model_state, check_processes, describe_changes,
                         read_checkpoint, resume_changes, rng_state, seal, seed_everything, set_rng_state,
                         toolkit_version)
from .durable import atomic_write_text
from .logs import TensorBoard, close_logger, fmt, make_logger, null_logger, progress
from .schedule import EpochSchedule, build_optimizer


class Trainer:
    """One training run. ``log``: the run's logger (default: a new one writing ``<out>/train.log``;
    ``quiet`` silences it); ``check_data``: decode every image and check the test split before
    training (:mod:`training.data.check`)."""

    def __init__(self, cfg: dict, out: Optional[str] = None, quiet: bool = False, check_data: bool = True,
                 log: Optional[logging.Logger] = None):
        self.cfg = cfg
        self.out = out or cfg["out"]
        self.rank, self.world_size, self.local_rank = distributed.distributed_env()
        self._owns_log = log is None  # a logger handed in is its owner's to close
        self.log = log or (make_logger(self.out, self.rank) if not quiet else null_logger())
        self.check_data = check_data
        t = cfg["train"]
        if t["threads"]:
            torch.set_num_threads(t["threads"])
        # which CPU kernels compute (training.reproducible): in the banner and in history.json
        self.reproducibility = reproducible.state()
        self.log.info(banner(cfg, self.out, self.world_size) + "\n" + reproducible.describe(self.reproducibility))
        self.determinism = reproducible.make_deterministic(self.log.info) if t["deterministic"] else None
        self.device = distributed.pick_device(t["device"], self.local_rank)
        distributed.init_process_group(self.world_size, self.device)
        seed_everything(cfg["seed"] + self.rank)
        self._build_data()
        # model, recipe, optimiser (in this order: the model's initialisation draws the global RNG)
        self.model = build_model(cfg, self.trainset.num_classes, log=self.log.info).to(self.device)
        self.net = distributed.wrap(self.model, self.world_size, self.device, self.local_rank)
        self.recipe = recipe_class(cfg)(cfg, self.trainset.num_classes, seed=cfg["seed"] + self.rank)
        self._build_loader()
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
        self.config_changes: List[dict] = []  # what resumes changed in the config, and from which epoch
        self.tb = TensorBoard(self.out, t["tensorboard"] and self.rank == 0 and not quiet, self.log.info)
        self.context = TrainContext(self.model, self.device, self.trainset, cfg, log=self.log.info,
                                    extract=self.extract_trainset)
        self.recipe.on_train_start(self.context)

    def _build_data(self) -> None:
        cfg = self.cfg
        if self.rank == 0:
            self.data_root = resolve_data_root(cfg, generate=True, log=self.log.info)
        self._barrier()
        if self.rank != 0:
            self.data_root = resolve_data_root(cfg, generate=False)
        # Absolute in the saved config, so `training.evaluate --checkpoint` works from any folder.
        self.data_root = os.path.abspath(self.data_root)
        cfg["data"]["root"] = self.data_root
        d = cfg["data"]
        self.trainset = load_trainset(d["dataset"], self.data_root, d["trial"])
        self.log.info(self.trainset.summary())
        if self.check_data:
            self._check_data()
        s = cfg["sampler"]
        try:
            self.sampler = CrossModalityIdentitySampler(self.trainset.visible.labels, self.trainset.infrared.labels,
                                                        s["num_ids"], s["num_pos"], seed=cfg["seed"], rank=self.rank,
                                                        world_size=self.world_size)
        except ValueError as error:  # a batch the training set cannot fill: a config value for this data
            raise ConfigError(f"{error} (in {self.trainset.name} at {self.data_root})") from error

    def _check_data(self) -> None:
        """Rank 0 checks; every rank raises the same error (no rank left waiting at a barrier)."""
        d = self.cfg["data"]
        problem = None
        if self.rank == 0:
            try:
                self.log.info(check_dataset(d["dataset"], self.data_root, self.trainset, self.cfg["eval"]["modes"],
                                            d["trial"]))
            except DatasetError as error:
                problem = str(error)
        problem = distributed.gather_objects(problem, self.world_size)[0]
        if problem:
            raise DatasetError(problem)

    def _build_loader(self) -> None:
        d = self.cfg["data"]
        images = ImageCache(d["height"], d["width"], d["cache"])
        dataset = ModalityDataset(self.trainset, build_train_transform(d), images, self.recipe.batch_spec())
        self.loader = DataLoader(dataset, batch_size=self.sampler.batch_size, sampler=self.sampler,
                                 num_workers=d["workers"], collate_fn=collate_batch, drop_last=True,
                                 persistent_workers=d["workers"] > 0, pin_memory=self.device.type == "cuda")

    def extract_trainset(self, modality: str, descriptor: str, derivation: Optional[str] = None, seed=0):
        """(features, labels) of every training image of ``modality``: :class:`TrainContext.extract`."""
        images = self.trainset.visible if modality == "visible" else self.trainset.infrared
        d = self.cfg["data"]
        # Under DDP: rank 0's BatchNorm statistics everywhere, each rank a contiguous shard, then
        # all-gathered -- every rank ends with the features a single process would compute.
        distributed.broadcast_buffers(self.model, self.world_size)
        start, stop = distributed.shard(len(images), self.rank, self.world_size)
        feats = extract_features(self.model, images.paths[start:stop], modality, height=d["height"],
                                 width=d["width"], descriptor=descriptor, batch_size=self.cfg["eval"]["batch_size"],
                                 workers=d["workers"], derivation=derivation, seed=seed, device=self.device,
                                 cache=d["cache"], first_index=start)
        feats = distributed.gather_rows(feats, len(images), self.world_size)
        return feats, torch.as_tensor(images.labels, dtype=torch.int64, device=self.device)

    # --- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The checkpoint. Under DDP a collective: every rank's RNG and recipe state (each rank
        seeds its own) are gathered into ``ranks``, so a resume restores each rank's own."""
        mine = {"rng": rng_state(), "recipe": self.recipe.state_dict()}
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "sampler": self.sampler.state_dict(),
                "recipe": mine["recipe"], "scaler": self.scaler.state_dict(), "rng": mine["rng"],
                "ranks": distributed.gather_objects(mine, self.world_size),
                "epoch": self.epoch, "step": self.step, "history": self.history, "config": self.cfg,
                "config_changes": self.config_changes, "num_classes": self.trainset.num_classes}

    def save(self, name: str) -> Optional[str]:
        state = self.state_dict()  # on every rank: it gathers the ranks' states
        if self.rank != 0:
            return None
        os.makedirs(self.out, exist_ok=True)
        path = os.path.join(self.out, name)
        atomic_save(seal(state), path)
        return path

    def load(self, path: str, with_changes: bool = False) -> None:
        """Continue the run of checkpoint ``path``. Everything is checked before anything is loaded:
        a damaged or foreign file, another process count, another class count, another model, a
        config change outside ``RESUME_OVERRIDABLE`` (unless ``with_changes``) raise with one line."""
        state = read_checkpoint(path, "--resume", for_resume=True)
        check_processes(state, self.world_size, path)
        if state["num_classes"] != self.trainset.num_classes:
            raise CheckpointMismatch(f"--resume: {path} was trained on {state['num_classes']} identities; the "
                                     f"training set at {self.data_root} has {self.trainset.num_classes}")
        changes = resume_changes(state, self.cfg, path, with_changes)
        check_model_state(self.model.state_dict(), state, path, "--resume")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.sampler.load_state_dict(state["sampler"])
        ranks = state.get("ranks") or [{"rng": state["rng"], "recipe": state["recipe"]}]
        self.recipe.load_state_dict(ranks[self.rank]["recipe"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(ranks[self.rank]["rng"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        self.config_changes = list(state.get("config_changes") or []) + changes
        written_by = state.get("version") or "unknown"
        self.log.info(f"resumed from {path} at epoch {self.epoch}"
                      + (f" (written by reid_kernels {written_by})" if written_by != toolkit_version() else ""))
        for forced in (False, True):
            picked = [c for c in changes if c["forced"] == forced]
            if picked:
                why = "changed by --resume-with-changes" if forced else "changed on resume"
                self.log.info(f"config {why}, from epoch {self.epoch + 1}: {describe_changes(picked)}")

    # --- training ----------------------------------------------------------------------
    def _sync_context(self) -> TrainContext:
        self.context.epoch, self.context.step = self.epoch, self.step
        return self.context

    def train_epoch(self) -> Dict[str, float]:
        t = self.cfg["train"]
        self.sampler.set_epoch(self.epoch)
        self.schedule.set_epoch(self.epoch)
        hook_start = time.time()
        hook_logs = self.recipe.on_epoch_start(self._sync_context()) or {}
        hook_seconds = time.time() - hook_start
        self.net.train()
        total = len(self.loader) if t["max_steps_per_epoch"] is None else min(len(self.loader), t["max_steps_per_epoch"])
        bar = progress(total, f"epoch {self.epoch + 1}/{t['epochs']}", t["progress"] and self.rank == 0)
        sums: Dict[str, float] = {}
        count, images, start = 0, 0, time.time()
        for i, batch in enumerate(self.loader):
            if i >= total:
                break
            batch = batch.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                out = self.net(batch.images)
                loss, logs = self.recipe.losses(self.net, batch, out)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {self.epoch}, step {i} ({fmt(logs)})")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            self.recipe.after_step(self._sync_context())
            count += 1
            images += batch.num_images()
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
        if hook_logs:
            means.update(hook_logs)
            # the epoch-start hook's share of the epoch (e.g. MCE's centroid refresh)
            means["epoch_start_share"] = hook_seconds / max(hook_seconds + means["seconds"], 1e-9)
        return means

    def evaluate(self) -> Dict[str, object]:
        return evaluate(self.model, self.data_root, self.cfg)

    def fit(self, resume: Optional[str] = None, resume_with_changes: bool = False) -> Dict[str, object]:
        """Train to ``train.epochs``; ``resume``: continue that checkpoint's run (:meth:`load`)."""
        t = self.cfg["train"]
        if resume:
            self.load(resume, with_changes=resume_with_changes)
        if self.rank == 0 and self.out:
            os.makedirs(self.out, exist_ok=True)
            self._remove_stale_temporaries()
            self._write_config(resumed=bool(resume))
        last_eval = None
        while self.epoch < t["epochs"]:
            means = self.train_epoch()
            self.epoch += 1
            record = {"epoch": self.epoch, **{k: round(v, 5) for k, v in means.items()}}
            self.log.info(f"epoch {self.epoch}: {fmt(means)} lr {self.optimizer.param_groups[0]['lr']:.2e}")
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
            history = {"history": self.history, "final": last_eval and {k: last_eval[k] for k in ("rows", "summary")},
                       "reproducible": self.reproducibility, "deterministic": self.determinism,
                       "config_changes": self.config_changes}
            atomic_write_text(os.path.join(self.out, "history.json"), json.dumps(history, indent=1, default=float))
        self.tb.close()
        self._barrier()
        return {"eval": last_eval, "history": self.history, "checkpoint": path}

    def _write_config(self, resumed: bool) -> None:
        """``config.yaml``: the config the run started with, never rewritten by a resume (written
        afresh only where it is missing: a resume into another folder); ``config_changes.yaml``
        beside it: what resumes changed, each change with the first epoch trained with it."""
        config_path = os.path.join(self.out, "config.yaml")
        changes_path = os.path.join(self.out, "config_changes.yaml")
        if not resumed or not os.path.isfile(config_path):
            atomic_write_text(config_path, dump(undo_changes(self.cfg, self.config_changes)))
        if self.config_changes:
            atomic_write_text(changes_path, "# config keys resumes changed (config.yaml: the run as started); epoch: "
                                            "the first epoch trained with the change\n" + dump(self.config_changes))
        elif not resumed and os.path.isfile(changes_path):
            os.remove(changes_path)  # the log of a run this fresh one replaces

    # temporaries of atomic_write (``<name>.tmp.<pid>``) of the files a run writes
    _TEMPORARY = re.compile(r"^(.+\.pt|history\.json|config\.yaml|config_changes\.yaml)\.tmp\.\d+$")

    def _remove_stale_temporaries(self) -> None:
        """Temporary files a killed save left behind (``last.pt.tmp.<pid>``, ``history.json.tmp.<pid>`` ...)."""
        for name in os.listdir(self.out):
            if self._TEMPORARY.match(name):
                os.remove(os.path.join(self.out, name))
                self.log.info(f"removed {name}, left by an interrupted save")

    def _log_eval(self, result: Dict[str, object]) -> None:
        self.log.info(result["table"])
        s = result["summary"]
        for k in ("mAP", "R1", "mINP"):
            self.tb.scalar(f"eval/{k}", s[k], self.epoch)

    def _barrier(self) -> None:
        distributed.barrier(self.world_size)

    def close(self) -> None:
        distributed.destroy(self.world_size)
        if self._owns_log:
            close_logger(self.log)


def banner(cfg: dict, out: str, world_size: int) -> str:
    """The run's first log line: what trains on what, where it writes (the whole config is in
    ``<out>/config.yaml``)."""
    d, m, t = cfg["data"], cfg["model"], cfg["train"]
    return (f"run: recipe {cfg['recipe']}, dataset {d['dataset']} at {d['root'] or '(generated)'}, "
            f"{d['height']}x{d['width']}, ResNet-{m['depth']} width {m['width']}, "
            f"pretrained {m['pretrained'] or 'none'}, epochs {t['epochs']}, seed {cfg['seed']}, device {t['device']}, "
            f"{world_size} process(es), out {out}")
