"""The training engine, one concern per module (import the module you need):

* :mod:`training.engine.loop` -- :class:`~training.engine.loop.Trainer`: data -> sampler ->
  model -> recipe -> optimiser, epochs, hooks, evaluation;
* :mod:`training.engine.schedule` -- optimisers (SGD / Adam, two parameter groups) and the
  per-epoch warm-up + step-decay learning rate;
* :mod:`training.engine.checkpoint` -- atomic checkpoint files, RNG state, reading a
  checkpoint back into a model;
* :mod:`training.engine.logs` -- ``train.log``, TensorBoard, progress bars;
* :mod:`training.engine.distributed` -- ``torchrun`` environment, devices, barriers.

The engine knows no method: everything method-specific comes from the recipe
(:mod:`training.recipes.base`).
"""
