"""The error types every layer raises, at the bottom of the import graph.

Each is one line on stderr and exit status 2 in a CLI (:func:`training.cli.one_line_failures`).
They live here, importing nothing of the package, so that :mod:`training.cli` -- which every
command uses -- needs neither the config, the datasets nor the checkpoints to name them.  The
modules that raise them re-export them (``from training.config import ConfigError`` keeps working).
"""


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key."""


class DatasetError(RuntimeError):
    """A dataset folder or file is missing, unreadable or malformed; the message names it."""


class CheckpointError(ValueError):
    """A file that is not (or no longer) a readable training checkpoint; the message names it."""


__all__ = ["CheckpointError", "ConfigError", "DatasetError"]
