"""Train a VI-ReID model.

    python -m training.train --config lba_sysu --data-root /data/SYSU-MM01 [--out runs/x] [key=value ...]
    python -m training.train --config lba_synth                       # synthetic data, CPU-sized
    torchrun --nproc_per_node 4 -m training.train --config lba_sysu --data-root ...   # DDP

``--config`` takes a YAML file or the name of a built-in config (``training/configs/<name>.yaml``);
``key=value`` overrides any config key (``train.epochs=5 loss.sites=[5]``), anywhere on the
command line. A folder that already holds a run (``final.pt`` or ``last.pt``) is not reused
without ``--resume`` (continue it) or ``--overwrite`` (replace it).

``--resume`` continues the saved run with the config stored in its checkpoint (``--config`` must
name the same recipe and dataset). Overrides on a resume may change only the keys of
``training.config.RESUME_OVERRIDABLE`` (where and how fast it runs, what it prints, how it is
evaluated, ``train.epochs``); another difference is refused naming each key with both values,
unless ``--resume-with-changes``, which applies it and records it (with the first epoch trained
with it) in ``train.log``, ``history.json`` and ``config_changes.yaml`` beside the run's original
``config.yaml``. ``--resume PATH`` without ``--out`` continues in PATH's folder. The checkpoint is
checked before the dataset check and the model build.

Before the first step the dataset is checked (every image decodes, every test identity has
both modalities the protocol needs; :mod:`training.data.check`); ``--skip-data-check``
skips that for huge trees. A known failure is one line on stderr, ``error: ...`` or
``config error: ...``, exit status 2; once the run folder exists that line, like everything
the run prints (warnings included), is in ``<out>/train.log`` too. An unexpected failure
keeps its traceback (also in ``train.log``).
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before anything loads torch: its CPU kernels are chosen then
    from .reproducible import pin_from_argv

    pin_from_argv()

import argparse
import os
import sys
import traceback
from typing import List, Optional

from .cli import parser as cli_parser
from .config import ConfigError, load_config
from .reproducible import add_argument as add_reproducible_flag


def parse_args(argv: Optional[List[str]] = None):
    parser = cli_parser("train", description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", required=True,
                        help="YAML file or built-in config name: lba_*, mce_*, saai_*, pea_* with * synth, sysu, regdb")
    parser.add_argument("--data-root", default=None, help="dataset folder (overrides data.root)")
    parser.add_argument("--out", default=None, help="output folder for log, checkpoints, history (overrides out)")
    parser.add_argument("--pretrained", default=None, help="torchvision-format ImageNet ResNet state_dict file")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="continue from a checkpoint (default: <out>/last.pt)")
    parser.add_argument("--resume-with-changes", action="store_true",
                        help="with --resume: also apply overrides that change what the run trains (logged)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in the output folder")
    parser.add_argument("--skip-data-check", action="store_true",
                        help="do not decode every image and check the test split before training (huge trees)")
    add_reproducible_flag(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (anywhere on the command line)")
    args = parser.parse_intermixed_args(argv)
    # `--resume key=value`: argparse took the override for a checkpoint path
    if args.resume not in (None, "auto") and "=" in args.resume and not os.path.isfile(args.resume):
        args.overrides.append(args.resume)
        args.resume = "auto"
    return args


def _existing_run(out: str) -> Optional[str]:
    for name in ("final.pt", "last.pt"):
        if os.path.isfile(os.path.join(out, name)):
            return name
    return None


def _refuse(message: str) -> int:
    """A known failure before the run folder exists: one line on stderr, exit status 2."""
    print(message, file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    updates = {}
    if args.data_root:
        updates["data.root"] = args.data_root
    if args.out:
        updates["out"] = args.out
    if args.pretrained:
        updates["model.pretrained"] = args.pretrained
    try:
        cfg = load_config(args.config, args.overrides, updates=updates)
    except ConfigError as error:
        return _refuse(f"config error: {error}")
    if args.resume_with_changes and not args.resume:
        return _refuse("--resume-with-changes: only with --resume (it applies changes to a resumed run)")
    resume = None
    if args.resume:
        resume = os.path.join(cfg["out"], "last.pt") if args.resume == "auto" else args.resume
        if not os.path.isfile(resume):
            return _refuse(f"--resume: checkpoint not found: {resume}")
        from .engine.checkpoint import CheckpointError

        try:
            cfg = _resumed_config(args, cfg, updates, resume)
        except ConfigError as error:
            return _refuse(f"config error: {error}")
        except CheckpointError as error:
            return _refuse(f"error: {error}")
    import torch

    if cfg["train"]["device"] == "cuda" and not torch.cuda.is_available():
        return _refuse("train.device: 'cuda' asked for, but no CUDA device is available "
                       "(use train.device=cpu or auto)")
    pretrained = cfg["model"]["pretrained"]
    if pretrained and not os.path.isfile(pretrained):
        return _refuse(f"--pretrained: file not found: {pretrained} (nothing is ever downloaded)")
    if os.path.exists(cfg["out"]) and not os.path.isdir(cfg["out"]):
        return _refuse(f"--out: {cfg['out']} exists and is not a folder")
    if not args.resume and not args.overwrite and (existing := _existing_run(cfg["out"])):
        return _refuse(f"--out: {cfg['out']} already holds a run ({existing}); pass --resume to continue "
                       "it, --overwrite to replace it, or choose another --out")
    if resume and not _same_folder(cfg["out"], os.path.dirname(resume)) and (existing := _existing_run(cfg["out"])):
        return _refuse(f"--out: {cfg['out']} already holds another run ({existing}); resume {resume} in its own "
                       "folder or a new one")
    return _run(cfg, resume, check_data=not args.skip_data_check, fresh_log=args.overwrite and not args.resume,
                with_changes=args.resume_with_changes)


def _same_folder(a: str, b: str) -> bool:
    return os.path.abspath(a or ".") == os.path.abspath(b or ".")


def _resumed_config(args, asked: dict, updates: dict, path: str) -> dict:
    """The config the resume of ``path`` trains with (the checkpoint's, with the command line's
    allowed overrides), every checkpoint check done first: readable and whole, this version's,
    the recipe and dataset of ``--config``, the process count, the model the config builds.
    Raises :class:`CheckpointError` or :class:`ConfigError` (refused changes)."""
    from .config import resume_config
    from .engine.checkpoint import (CheckpointMismatch, check_model_shape, check_processes, read_checkpoint,
                                    resume_changes, stored_config)
    from .engine.distributed import distributed_env

    state = read_checkpoint(path, "--resume", for_resume=True)
    stored = stored_config(state, path)
    kind = (asked["recipe"], asked["data"]["dataset"])
    if kind != (stored["recipe"], stored["data"]["dataset"]):
        raise CheckpointMismatch(f"--config {args.config} is recipe {kind[0]} on {kind[1]} data, but --resume {path} "
                                 f"is a run of recipe {stored['recipe']} on {stored['data']['dataset']} data; a run "
                                 "resumes with its own recipe")
    explicit = dict(updates, out=args.out or os.path.dirname(path) or ".")  # by default: on in the run's folder
    if args.data_root:
        explicit["data.root"] = os.path.abspath(args.data_root)  # the checkpoint records it absolute
    cfg = resume_config(stored, args.overrides, explicit)
    resume_changes(state, cfg, path, args.resume_with_changes)
    check_processes(state, distributed_env()[1], path)
    check_model_shape(state, cfg, path, "--resume")
    return cfg


def _run(cfg: dict, resume: Optional[str], check_data: bool, fresh_log: bool = False,
         with_changes: bool = False) -> int:
    """Train with the run's logger in place: from here on every line also goes to train.log."""
    from .data import DatasetError
    from .engine.checkpoint import CheckpointError
    from .engine.distributed import distributed_env
    from .engine.logs import close_logger, file_only, make_logger, warnings_to
    from .engine.loop import Trainer

    rank = distributed_env()[0]
    old_log = os.path.join(cfg["out"], "train.log")
    if fresh_log and rank == 0 and os.path.isfile(old_log):
        os.remove(old_log)  # --overwrite replaces the run: its log starts with this run
    log = make_logger(cfg["out"], rank)
    try:
        with warnings_to(log):
            trainer = Trainer(cfg, check_data=check_data, log=log)
            try:
                result = trainer.fit(resume=resume, resume_with_changes=with_changes)
            finally:
                trainer.close()
        if result["eval"] and trainer.rank == 0:
            s = result["eval"]["summary"]
            log.info(f"final {s['setting']}: mAP {100 * s['mAP']:.2f}  R1 {100 * s['R1']:.2f}  "
                     f"mINP {100 * s['mINP']:.2f}")
        return 0
    except ConfigError as error:
        log.error(f"config error: {error}")
        return 2
    except (CheckpointError, DatasetError, FileNotFoundError) as error:
        log.error(f"error: {error}")
        return 2
    except BaseException:
        file_only(log, traceback.format_exc().rstrip())
        raise
    finally:
        close_logger(log)


if __name__ == "__main__":
    sys.exit(main())
