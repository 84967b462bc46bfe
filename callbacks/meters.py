"""The accumulators of one explainer on a probe set: every metric's torchmetrics wrapper and the cost means,
summed over batches and DDP ranks, so a callback logs what one process over all images would."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from metrics import (
    CausalMetric,
    FaithfulnessMetric,
    IoUF1Metric,
    PointingGameMetric,
    PRAUCMetric,
    SaliencyScores,
    ValueMean,
)


class ScoreMeters:
    """The torchmetrics accumulators of one explainer on this rank (sums and counts, summed over ranks).

    :meth:`compute` is a collective under DDP (torchmetrics syncs its states): every rank must call it, in
    the same order, even with no images of its own.
    """

    REGION_SUFFIXES = ("", "_top", "_pixel")  # iou / f1, iou_top / f1_top, iou_pixel / f1_pixel
    COSTS = ("forwards", "backwards", "seconds")
    NORMALISED = ("deletion_norm", "insertion_norm")

    def __init__(self, steps: int, num_classes: int, device: torch.device):
        self.causal = CausalMetric(steps).to(device)
        self.normalised = {name: ValueMean(name).to(device) for name in self.NORMALISED}
        self.mf = FaithfulnessMetric().to(device)
        self.mi = PRAUCMetric().to(device)
        self.regions = {suffix: IoUF1Metric().to(device) for suffix in self.REGION_SUFFIXES}
        self.pointing = PointingGameMetric(num_classes).to(device)
        # NaN = "not counted" (an explainer without ``cost``): ignored, so such a mean is 0 / 0 = NaN.
        self.costs = {name: MeanMetric(nan_strategy="ignore").to(device) for name in self.COSTS}

    def update(self, scores: SaliencyScores, targets: Tensor, gt_mask: Tensor, cost: Any, seconds: float) -> None:
        """Add one chunk: its scores, explained classes (B,), ground truth (B,1,H,W), the explainer's
        ``cost`` of the call (None if it does not count) and the call's wall time."""
        values = scores.values
        self.causal.update(values["deletion"], values["insertion"], scores.deletion_curve, scores.insertion_curve)
        for name, metric in self.normalised.items():
            metric.update(values[name])
        self.mf.update(values["mf"])
        self.mi.update(values["mi"])
        for suffix, metric in self.regions.items():
            metric.update(values[f"iou{suffix}"], values[f"f1{suffix}"])
        # score_saliency counts an image without ground truth as a miss; here it is not evaluated at all.
        has_gt = gt_mask.flatten(1).any(1)
        self.pointing.update(values["pointing_game"][has_gt].bool(), targets[has_gt])
        images = targets.shape[0]
        measured = {"seconds": seconds, "forwards": getattr(cost, "forwards", math.nan),
                    "backwards": getattr(cost, "backwards", math.nan)}
        for name, total in measured.items():
            self.costs[name].update(torch.tensor(total / images), weight=images)

    def compute(self) -> tuple[dict[str, float], tuple[Tensor, Tensor]]:
        """Reduced means ({metric: float}, NaN where no image counted) and the mean (deletion, insertion)
        curves (n+1,)."""
        causal, mf, mi, pointing = self.causal.compute(), self.mf.compute(), self.mi.compute(), self.pointing.compute()
        values = {"deletion": causal["deletion"], "insertion": causal["insertion"], "mf": mf["mf"],
                  "mf_excluded": mf["excluded"], "mi": mi["pr_auc"], "pointing_game": pointing["accuracy"],
                  "pointing_game_hit_rate": pointing["hit_rate"]}
        for name, metric in self.normalised.items():
            normalised = metric.compute()
            values.update({name: normalised[name], f"{name}_excluded": normalised["excluded"]})
        for suffix, metric in self.regions.items():
            region = metric.compute()
            values.update({f"iou{suffix}": region["iou"], f"f1{suffix}": region["f1"]})
        for name, metric in self.costs.items():
            values[f"{name}_per_image"] = metric.compute()
        values["images"] = causal["count"] + causal["excluded"]
        scalars = {name: float(value) for name, value in values.items()}
        return scalars, (causal["deletion_curve"], causal["insertion_curve"])
