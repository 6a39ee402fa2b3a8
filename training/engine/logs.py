"""``train.log`` and the console, TensorBoard scalars, progress bars."""
from __future__ import annotations

import logging
import os
import sys
from typing import Dict, Optional


def make_logger(out: Optional[str], rank: int) -> logging.Logger:
    logger = logging.getLogger(f"training.{out}.{rank}")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if out and rank == 0:
        os.makedirs(out, exist_ok=True)
        handler = logging.FileHandler(os.path.join(out, "train.log"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    return logger


def null_logger() -> logging.Logger:
    logger = logging.getLogger("training.null")
    logger.handlers.clear()
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return logger


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def fmt(values: Dict[str, float]) -> str:
    return " ".join(f"{k} {float(v):.4g}" for k, v in values.items())


class TensorBoard:
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


def progress(total: int, desc: str, enabled: bool):
    """A redrawing bar in a terminal only: into a file or pipe the per-epoch log line is enough
    (a redrawn bar there is thousands of lines)."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
