"""The Python API in a few verbs, for your own model and images::

    import saliency_lab as sl

    blackbox = sl.BlackBox.from_module(model, mean=MEAN, std=STD, feature_layers=["layer1", "layer2", "layer3", "layer4"])
    maps = sl.explain(blackbox, images, method="rise", n_masks=2000)   # (B,1,H,W), higher = more important
    scores = sl.score(blackbox, images, maps)                          # {"deletion": (B,), "insertion": (B,), ...}
    sl.overlay(images, {"rise": maps}, path="overlay.png")             # a figure you can look at

``images`` are (B,3,H,W) float in [0,1]; the black box owns the normalisation. The explained class is the black
box's prediction unless ``targets`` (B,) is given, the same for :func:`explain` and :func:`score`.
:func:`available` lists the methods; :func:`build` gives an explainer object to reuse on many batches.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor

from saliency_lab import explainers
from saliency_lab.callbacks.figures import overlay_grid
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.metrics.causal import causal_curves, explained_class, make_protocol

__all__ = ["BlackBox", "available", "build", "explain", "overlay", "score"]


def available() -> list[str]:
    """The registered methods (``sl.build`` / ``sl.explain`` names), the trained predictors included."""
    return explainers.available()


def build(method: str, blackbox: BlackBox, checkpoint: str | os.PathLike | None = None, **hparams):
    """An explainer to call on many batches: ``explainer(images, targets) -> (B,1,H,W)``; ``checkpoint`` for a
    trained predictor. ``hparams`` are the method's own (e.g. ``n_masks`` for RISE)."""
    return explainers.build(method, blackbox, checkpoint=checkpoint, **hparams)


def _targets(blackbox: BlackBox, images: Tensor, targets: Tensor | None) -> Tensor:
    if targets is not None:
        return targets.to(images.device)
    return explained_class(blackbox, images)


def explain(blackbox: BlackBox, images: Tensor, method: str = "rise", targets: Tensor | None = None,
            checkpoint: str | os.PathLike | None = None, **hparams) -> Tensor:
    """Saliency maps (B,1,H,W) of ``images`` (B,3,H,W) in [0,1] for ``targets`` (default: the predicted classes)."""
    explainer = build(method, blackbox, checkpoint=checkpoint, **hparams)
    return explainer(images, _targets(blackbox, images, targets))


def score(blackbox: BlackBox, images: Tensor, maps: Tensor, targets: Tensor | None = None,
          protocol: str = "rise", **overrides) -> dict[str, Tensor]:
    """Per-image causal metrics of ``maps``: deletion (lower is better), insertion (higher is better) and their
    normalised forms (NaN where the curve's ends are too close), under the ``"rise"`` or ``"igos"`` preset with any
    :class:`~saliency_lab.metrics.causal.CausalProtocol` field overridden; also the curves and their x axis."""
    resolved = make_protocol({"preset": protocol, **overrides}, images.shape[-1])
    result = causal_curves(blackbox, images, maps, _targets(blackbox, images, targets), resolved)
    return {"deletion": result.deletion, "insertion": result.insertion, "deletion_norm": result.deletion_norm,
            "insertion_norm": result.insertion_norm, "deletion_curve": result.deletion_curve,
            "insertion_curve": result.insertion_curve, "fractions": result.fractions}


def overlay(images: Tensor, maps: Tensor | Mapping[str, Tensor], path: str | os.PathLike | None = None,
            titles: list[str] | None = None):
    """A grid of heat maps over their images (rows: images; columns: the image, then each method), saved to
    ``path`` (PNG, PDF, ...) when given; returns the matplotlib figure."""
    maps = {"saliency": maps} if isinstance(maps, Tensor) else dict(maps)
    resized = {name: torch.nn.functional.interpolate(m.float(), size=images.shape[-2:], mode="bilinear",
                                                     align_corners=False) if m.shape[-2:] != images.shape[-2:] else m
               for name, m in maps.items()}
    figure = overlay_grid(images.detach().cpu(), {k: v.detach().cpu() for k, v in resized.items()}, titles)
    if path is not None:
        figure.savefig(path, dpi=100, bbox_inches="tight")
    return figure
