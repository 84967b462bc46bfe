"""The foundation layer: what every other layer stands on, importing only torch, timm and torchvision.

- :mod:`core.blackbox` — :class:`BlackBox`, the only door to a classifier (owns its normalisation);
- :mod:`core.perturbation` — phi(I, M, A) = I * M + A * (1 - M) and its substrates;
- :mod:`core.seeding` — per-image seeds, so nothing depends on batch size or process count;
- :mod:`core.checkpoints` — :func:`safe_load` (``weights_only=True``).
"""
from core.blackbox import BlackBox
from core.checkpoints import UnsafeCheckpointError, safe_load
from core.perturbation import make_substrate, perturb
from core.seeding import derive_seeds, seeded_generator

__all__ = ["BlackBox", "UnsafeCheckpointError", "derive_seeds", "make_substrate", "perturb", "safe_load",
           "seeded_generator"]
