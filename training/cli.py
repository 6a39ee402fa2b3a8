"""What every training CLI shares: a bad argument or a known failure is one line on stderr and
exit status 2; an unexpected error keeps its traceback."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Tuple, Type

from .errors import CheckpointError, ConfigError, DatasetError


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line, ``error: <message> (see <prog> --help)``, exit 2
    (argparse's own form adds the whole usage text above it)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


_prog: Optional[str] = None


def set_prog(command: Optional[str]) -> None:
    """Name the parsers after the console command the user typed (``reid-train``; see
    :mod:`training.commands`) instead of ``python -m <package>.<module>``."""
    global _prog
    _prog = command


def parser(module: str, **kwargs) -> ArgumentParser:
    """The parser of ``python -m training.<module>`` (``reid_kernels.training.<module>`` when
    installed), or of the console command that :func:`set_prog` named."""
    return ArgumentParser(prog=_prog or f"python -m {__package__}.{module}", **kwargs)


def one_line_failures(run: Callable[[], int], errors: Optional[Tuple[Type[BaseException], ...]] = None) -> int:
    """``run()``, with a config error printed as ``config error: ...`` and any of ``errors`` (default:
    checkpoint, dataset and missing-file errors) as ``error: ...``, one line on stderr, exit status 2."""
    if errors is None:
        errors = (CheckpointError, DatasetError, FileNotFoundError)
    try:
        return run()
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except errors as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
