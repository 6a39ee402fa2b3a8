"""VI-ReID training application on top of reid_kernels (see training/README.md).

Data flows dataset -> sampler -> model -> recipe loss -> engine:
:mod:`training.data`, :mod:`training.models`, :mod:`training.recipes`, :mod:`training.engine`;
entry points ``python -m training.{train,evaluate,demo,synth,visualize}``.
"""
