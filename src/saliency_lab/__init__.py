"""saliency-lab: learned saliency-mask predictors, iGOS++ and IASSA side by side, with one implementation of every
metric.

The ten-line Python API (``saliency_lab.api``, re-exported here on first use so that ``import saliency_lab.metrics``
stays light)::

    import saliency_lab as sl
    blackbox = sl.BlackBox.from_module(model, mean=(0.5,) * 3, std=(0.25,) * 3)   # any nn.Module classifier
    maps = sl.explain(blackbox, images, method="rise", n_masks=2000)             # (B,1,H,W), higher = more salient
    scores = sl.score(blackbox, images, maps)                                     # deletion, insertion, ... per image
    sl.overlay(images, maps, path="overlay.png")
"""
from __future__ import annotations

__version__ = "0.2.0"

_API = {"BlackBox": "saliency_lab.core.blackbox", "available": "saliency_lab.api", "build": "saliency_lab.api",
        "explain": "saliency_lab.api", "score": "saliency_lab.api", "overlay": "saliency_lab.api"}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'saliency_lab' has no attribute {name!r}")
