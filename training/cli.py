"""What every training CLI shares: a bad argument is one line on stderr and exit status 2."""
from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line, ``error: <message> (see <prog> --help)``, exit 2
    (argparse's own form adds the whole usage text above it)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parser(module: str, **kwargs) -> ArgumentParser:
    """The parser of ``python -m training.<module>``."""
    return ArgumentParser(prog=f"python -m training.{module}", **kwargs)
