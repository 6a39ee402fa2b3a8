"""``train.log`` and the console, TensorBoard scalars, progress bars.

Everything a run prints goes through its logger, so ``train.log`` holds what the console
showed: information on stdout, warnings and ``error: ...`` lines on stderr, all of them in
the file (with the time). Python warnings raised during a run are routed there too
(:func:`warnings_to`), and an unexpected exception's traceback is added to the file
(:func:`file_only`) while Python prints it as usual.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Dict, Iterator, Optional


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def make_logger(out: Optional[str], rank: int) -> logging.Logger:
    """Rank 0: information to stdout, warnings and errors to stderr, all to ``<out>/train.log``
    (appended: a resumed run continues its log). Other ranks: warnings and errors to stderr."""
    logger = logging.getLogger(f"training.{out}.{rank}")
    close_logger(logger)
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    plain = logging.Formatter("%(message)s")
    info = logging.StreamHandler(sys.stdout)
    info.addFilter(_BelowWarning())
    problems = logging.StreamHandler(sys.stderr)
    problems.setLevel(logging.WARNING)
    for handler in (info, problems):
        handler.setFormatter(plain)
        logger.addHandler(handler)
    if out and rank == 0:
        os.makedirs(out, exist_ok=True)
        handler = logging.FileHandler(os.path.join(out, "train.log"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    return logger


def file_only(logger: logging.Logger, text: str) -> None:
    """``text`` into the logger's files only (a traceback Python prints to the console anyway)."""
    record = logger.makeRecord(logger.name, logging.ERROR, "", 0, text, None, None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@contextlib.contextmanager
def warnings_to(logger: logging.Logger) -> Iterator[None]:
    """Python warnings shown inside the block become one ``warning: ...`` line of ``logger``
    (so they reach ``train.log``); the filters still decide which are shown."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        logger.warning(f"warning: {message} ({category.__name__}, {os.path.basename(filename)}:{lineno})")

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


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
