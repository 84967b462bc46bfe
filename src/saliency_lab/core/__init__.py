"""The foundation layer: what every other layer stands on, importing only torch, timm and torchvision.

- :mod:`core.blackbox` — ``BlackBox``, the only door to a classifier (owns its normalisation);
- :mod:`core.perturbation` — phi(I, M, A) = I * M + A * (1 - M) and its substrates;
- :mod:`core.seeding` — per-image seeds, so nothing depends on batch size or process count;
- :mod:`core.checkpoints` — ``safe_load`` (``weights_only=True``, local files only);
- :mod:`core.inputs` — the one input check of explainers and metrics (shape, dtype, finite, [0, 1], targets).
- :mod:`core.timing` — wall-clock seconds measured after a device synchronise.

Import from the modules (``from core.blackbox import BlackBox``). Nothing is re-exported here on purpose:
``saliency-lab export-blackbox CKPT OUT --half`` runs that module as ``__main__``, and a package that had already
imported it would hold a second copy of every class in it (runpy warns about exactly that).
"""
