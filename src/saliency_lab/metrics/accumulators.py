"""Thin ``torchmetrics.Metric`` wrappers that accumulate per-image metric values across batches and ranks.

The functional metrics (:mod:`metrics.causal`, :mod:`metrics.localisation`) compute per-image values;
these classes only keep sums and counts. Every state is added with ``dist_reduce_fx="sum"``, so the
DDP reduction (a sum over ranks) gives exactly the states one process would have accumulated over all
images, and ``compute`` divides after the reduction. Images whose value is NaN (no ground truth, the
M_F guard, excluded by min-max) are not averaged; they are counted in ``excluded``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class _MeanOfValues(Metric):
    """Mean over images of several per-image values; an image with any NaN value is excluded.

    States: ``<name>_sum`` (scalar float) per value name, ``count`` and ``excluded`` (scalar int64).
    compute() -> {name: sum / count, "count": count, "excluded": excluded}.
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, names: tuple[str, ...], **kwargs) -> None:
        super().__init__(**kwargs)
        self._names = names
        for name in names:
            self.add_state(f"{name}_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("excluded", default=torch.tensor(0), dist_reduce_fx="sum")

    def _accumulate(self, values: dict[str, Tensor]) -> Tensor:
        """Add (B,) values per name; return the (B,) bool mask of the images that were counted."""
        stacked = torch.stack([values[name].detach().float().reshape(-1) for name in self._names])
        valid = ~stacked.isnan().any(0)
        for name, row in zip(self._names, stacked):
            setattr(self, f"{name}_sum", getattr(self, f"{name}_sum") + row[valid].sum())
        self.count += valid.sum()
        self.excluded += (~valid).sum()
        return valid

    def compute(self) -> dict[str, Tensor]:
        means = {name: getattr(self, f"{name}_sum") / self.count for name in self._names}
        return {**means, "count": self.count, "excluded": self.excluded}


class CausalMetric(_MeanOfValues):
    """Mean deletion and insertion areas and, when ``steps`` is given, the mean (n + 1,) curves.

    update(deletion (B,), insertion (B,), deletion_curve (B, n + 1) | None, insertion_curve | None),
    the first four fields of :class:`saliency_lab.metrics.causal.CausalResult`: ``metric.update(*result[:4])``.
    compute() -> {"deletion", "insertion", "count", "excluded"} + {"deletion_curve", "insertion_curve"}.
    """

    higher_is_better = None  # deletion: lower is better, insertion: higher

    def __init__(self, steps: int | None = None, **kwargs) -> None:
        super().__init__(("deletion", "insertion"), **kwargs)
        self.steps = steps
        if steps is not None:
            for name in ("deletion_curve_sum", "insertion_curve_sum"):
                self.add_state(name, default=torch.zeros(steps + 1), dist_reduce_fx="sum")

    def update(self, deletion: Tensor, insertion: Tensor, deletion_curve: Tensor | None = None,
               insertion_curve: Tensor | None = None) -> None:
        valid = self._accumulate({"deletion": deletion, "insertion": insertion})
        if self.steps is None:
            return
        if deletion_curve is None or insertion_curve is None:
            raise ValueError("CausalMetric(steps=...) needs the curves in update()")
        for name, curve in (("deletion_curve_sum", deletion_curve), ("insertion_curve_sum", insertion_curve)):
            if curve.shape[-1] != self.steps + 1:
                raise ValueError(f"curves must have {self.steps + 1} points, got {curve.shape[-1]}")
            setattr(self, name, getattr(self, name) + curve.detach().float()[valid].sum(0))

    def compute(self) -> dict[str, Tensor]:
        result = super().compute()
        if self.steps is not None:
            result["deletion_curve"] = self.deletion_curve_sum / self.count
            result["insertion_curve"] = self.insertion_curve_sum / self.count
        return result


class ValueMean(_MeanOfValues):
    """Mean over images of one named per-image value, NaN excluded and counted (e.g. ``deletion_norm``,
    whose degenerate curves are NaN). update(values (B,)); compute() -> {name, "count", "excluded"}."""

    higher_is_better = None

    def __init__(self, name: str, **kwargs) -> None:
        super().__init__((name,), **kwargs)
        self.name = name

    def update(self, values: Tensor) -> None:
        self._accumulate({self.name: values})


class FaithfulnessMetric(_MeanOfValues):
    """Mean M_F over valid images; ``excluded`` counts the images the q_O - q_F guard dropped.

    update(mf (B,), valid (B,) bool | None): invalid images (valid False, or mf NaN) are excluded.
    Feed it raw M_F, or the per-image min-max normalised values of ``minmax_across_methods``.
    compute() -> {"mf", "count", "excluded"}.
    """

    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(("mf",), **kwargs)

    def update(self, mf: Tensor, valid: Tensor | None = None) -> None:
        if valid is not None:
            mf = torch.where(valid, mf, torch.nan)
        self._accumulate({"mf": mf})


class PRAUCMetric(_MeanOfValues):
    """Mean M_I (percent). update(pr_auc (B,)); NaN (no ground truth) is excluded.

    compute() -> {"pr_auc", "count", "excluded"}.
    """

    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(("pr_auc",), **kwargs)

    def update(self, pr_auc: Tensor) -> None:
        self._accumulate({"pr_auc": pr_auc})


class IoUF1Metric(_MeanOfValues):
    """Mean IoU and F1. update(iou (B,), f1 (B,)); an image with a NaN is excluded.

    compute() -> {"iou", "f1", "count", "excluded"}.
    """

    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(("iou", "f1"), **kwargs)

    def update(self, iou: Tensor, f1: Tensor) -> None:
        self._accumulate({"iou": iou, "f1": f1})


class PointingGameMetric(Metric):
    """Pointing-game accuracy per class (docs/protocols.md).

    States: ``hits`` and ``misses``, (num_classes,) int64 each, summed over ranks.
    update(hits (B,) bool, targets (B,) int class of each image).
    compute() -> {"accuracy": mean over the classes evaluated (>= 1 image) of hits / (hits + misses),
    "hit_rate": all hits / all images, "classes_evaluated", "count"}.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.add_state("hits", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("misses", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, hits: Tensor, targets: Tensor) -> None:
        hits, targets = hits.reshape(-1).bool(), targets.reshape(-1).long()
        if hits.shape != targets.shape:
            raise ValueError(f"hits {tuple(hits.shape)} and targets {tuple(targets.shape)} differ")
        if targets.numel() and (targets.min() < 0 or targets.max() >= self.num_classes):
            raise ValueError(f"targets must lie in [0, {self.num_classes})")
        self.hits += torch.bincount(targets[hits], minlength=self.num_classes)
        self.misses += torch.bincount(targets[~hits], minlength=self.num_classes)

    def compute(self) -> dict[str, Tensor]:
        seen = self.hits + self.misses
        evaluated = seen > 0
        accuracy = (self.hits[evaluated].float() / seen[evaluated]).mean()
        return {"accuracy": accuracy, "hit_rate": self.hits.sum() / seen.sum(),
                "classes_evaluated": evaluated.sum(), "count": seen.sum()}
