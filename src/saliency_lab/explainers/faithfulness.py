"""Is a fast black box (bf16 autocast, channels-last, compiled) faithful to float32? The check behind the fast black box's defaults.

Two questions, each per image:

1. Probabilities: :func:`core.blackbox.probability_gap` — max_k |p_k - p_k^fp32| <= :data:`PROBABILITY_TOLERANCE`.
2. Maps: :func:`map_spearman` — the Spearman rank correlation between an explainer's map on the fast black box
   and on the float32 one (same seeds, same images, same targets) is at least :data:`MIN_SPEARMAN` — 0.99 for
   gradient-free methods (their maps are averages / searches over forward scores only), 0.95 for the
   gradient-based ones (a bf16 backward pass rounds every intermediate gradient, and pixel-level gradients
   are noisy to begin with).

An explainer whose maps hold the bar on the committed embedded black box (``tests/test_fast_blackbox.py``;
``benchmarks/fast_blackbox.py`` prints the figures) sets ``fast_passes = True`` and so runs its passes in bf16
when the black box is ``precision="auto"`` on bf16 hardware.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch
from torch import Tensor
from torchmetrics.functional import spearman_corrcoef

from saliency_lab.explainers.registry import _lookup, build

PROBABILITY_TOLERANCE = 0.02  # per image, max over classes, absolute
MIN_SPEARMAN = {"gradient_free": 0.99, "gradient": 0.95}


def min_spearman(name: str) -> float:
    """The bar of explainer ``name``: 0.95 if it back-propagates through the black box, else 0.99."""
    return MIN_SPEARMAN["gradient" if _lookup(name).needs_grad else "gradient_free"]


def spearman_per_image(first: Tensor, second: Tensor) -> Tensor:
    """Spearman rank correlation (B,) between maps (B, 1, H, W) image by image (ties get average ranks).

    Two constant maps of one image agree fully (1.0); a constant map against a varying one gives 0.
    """
    a, b = first.flatten(1).double(), second.flatten(1).double()
    out = torch.empty(a.shape[0], dtype=torch.float64)
    for i in range(a.shape[0]):
        flat_a, flat_b = a[i].std() == 0, b[i].std() == 0
        if flat_a or flat_b:
            out[i] = 1.0 if (flat_a and flat_b) else 0.0
        else:
            out[i] = spearman_corrcoef(a[i], b[i])
    return out


@dataclasses.dataclass
class MapFaithfulness:
    """One method's maps on a fast black box against float32: per-image Spearman and the bar it must hold."""

    name: str
    spearman: Tensor  # (B,)
    bar: float
    seconds_reference: float
    seconds_fast: float

    @property
    def holds(self) -> bool:
        return bool((self.spearman >= self.bar).all())


def map_spearman(name: str, fast, reference, images: Tensor, targets: Tensor, indices: Tensor | None = None,
                 clock: Callable[[], float] = time.perf_counter, **hparams) -> MapFaithfulness:
    """Explain ``targets`` (B,) on ``images`` (B, 3, H, W) in [0, 1] with method ``name`` (``hparams``) once on
    the ``reference`` (float32) black box and once on ``fast`` inside ``fast.fast()`` (so a
    ``precision="auto"`` black box runs bf16 whether or not the method opts in yet), same seeds. The reference
    must be ``precision="32"``: an ``"auto"`` one runs bf16 too for the methods that opt in. ``clock`` times
    the two calls (e.g. ``time.process_time`` on a shared machine).
    """
    if getattr(reference, "precision", "32") != "32":
        raise ValueError(f"the reference black box must be precision='32', got {reference.precision!r}")
    start = clock()
    reference_maps = build(name, reference, **hparams)(images, targets, indices)
    middle = clock()
    with fast.fast():
        fast_maps = build(name, fast, **hparams)(images, targets, indices)
    end = clock()
    return MapFaithfulness(name, spearman_per_image(fast_maps, reference_maps), min_spearman(name),
                           middle - start, end - middle)
