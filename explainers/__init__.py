"""Saliency explainers behind one contract (ARCHITECTURE.md, "The explainer contract").

    explainer = explainers.build("rise", blackbox, n_masks=4000, seed=0, max_forward_batch=256)
    saliency = explainer(images, targets)        # (B,3,H,W) in [0,1], (B,) -> (B,1,H,W)
    explainer.cost                               # Cost(forwards, backwards, images) of that call

This package must not import ``metrics`` (metrics imports ``explainers.perturbation``).
"""

from explainers.base import Cost, Explainer, preserved_state
from explainers.registry import available, build, load_checkpoint, register, register_checkpoint_loader

# Imported for their @register side effect: every module listed here is a registered method.
from explainers import cam, finv, gradients, iassa, igos, lime, mpert, rise, xpert  # noqa: E402,F401  isort: skip

__all__ = ["Cost", "Explainer", "available", "build", "load_checkpoint", "preserved_state", "register",
           "register_checkpoint_loader"]
from explainers import mask_predictor  # noqa: E402,F401  isort: skip  (checkpoint loaders of the trained predictor)
