"""The console commands (``reid-train``, ``reid-evaluate``, ...) that ``pip install`` puts on PATH.

Each runs the ``main`` of one module of this package with the arguments the user typed, the same
arguments as ``python -m training.<module>`` in the checkout, and with ``--help`` and error lines
naming the command (:func:`training.cli.set_prog`).

Why a re-exec: the reproducible CPU setting (:mod:`training.reproducible`) must be in the
environment before torch loads, and an installed command cannot get there first -- importing
``reid_kernels.training`` imports ``reid_kernels``, which imports torch.  So when the pins are
wanted and not yet in the environment, the command starts the same command again in a fresh
interpreter with the pins set; that child finds them in place (no second re-exec).
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import List, Optional

from . import reproducible
from .cli import set_prog

# Modules whose __main__ pins the reproducible CPU setting before torch loads.
PINNING = ("train", "evaluate", "demo", "pretrain")


def _needs_restart(module: str, argv: List[str]) -> bool:
    return (module in PINNING and reproducible.wanted(argv) and reproducible.cpu_lacks_avx2() is None
            and not all(os.environ.get(k) == v for k, v in reproducible.PINS.items()))


def run(module: str, command: str, argv: Optional[List[str]] = None) -> int:
    """``<module>.main(argv)`` as the console command ``command``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if _needs_restart(module, argv):
        env = dict(os.environ, **reproducible.PINS)
        code = f"import sys; from {__name__} import run; sys.exit(run({module!r}, {command!r}))"
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-c", code, *argv], env)
    if module in PINNING:
        reproducible.pin_from_argv(argv)
    set_prog(command)
    main = importlib.import_module(f"{__package__}.{module}").main
    return main(argv)


def train() -> int:
    return run("train", "reid-train")


def evaluate() -> int:
    return run("evaluate", "reid-evaluate")


def demo() -> int:
    return run("demo", "reid-demo")


def synth() -> int:
    return run("synth", "reid-synth")


def visualize() -> int:
    return run("visualize", "reid-visualize")


def pretrain() -> int:
    return run("pretrain", "reid-pretrain")


def index() -> int:
    return run("index", "reid-index")


def search() -> int:
    return run("search", "reid-search")


def export() -> int:
    return run("export", "reid-export")
