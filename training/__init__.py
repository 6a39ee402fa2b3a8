"""VI-ReID training application on top of reid_kernels (see training/README.md).

Data flows dataset -> sampler -> model -> recipe loss -> engine:
:mod:`training.data`, :mod:`training.models`, :mod:`training.recipes`, :mod:`training.engine`;
commands ``reid-train``, ``reid-evaluate``, ``reid-demo``, ``reid-synth``, ``reid-visualize``
(:mod:`training.commands`; ``python -m training.<module>`` in the checkout).

Installed, this package is ``reid_kernels.training`` (``setup.py`` maps the name onto this
folder); inside it every import is relative, so the code does not depend on the name it has.
"""
