"""Sanity checks of saliency methods (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

Model randomisation, cascading: re-initialise the black box's layers from the output down and measure how
much each explainer's maps change (Spearman rank correlation with the maps of the trained model). A
method whose maps survive the loss of the weights explains the image, not the model.

Label randomisation: the maps of a classifier trained on shuffled labels must differ from those of the
classifier trained on the true labels (:func:`label_randomisation`, :class:`LabelRandomisationCheck`). The
second black box comes from ``train.py`` with the datamodule's ``shuffle_labels`` option (e.g.
``configs/train/embedded_classifier_shuffled.yaml``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from saliency_lab.callbacks.base import ProbeSetCallback, autograd_enabled, gather_rows
from saliency_lab.callbacks.probe import ProbeSet
from saliency_lab.explainers import ExplainerSpec, build_explainer, explainer_keys
from saliency_lab.metrics import TARGET_RULES
from saliency_lab.metrics.sanity import (  # noqa: F401  (re-exported: the check's parts, for callers of callbacks.sanity)
    DEFAULT_FRACTIONS,
    check_fractions,
    parameterised_layers,
    randomisation_rows,
    randomisation_table,
    randomise_layers,
    rank_correlation,
)


def explainer_factories(explainers: Sequence[ExplainerSpec], **common: Any) -> dict[str, Any]:
    """key -> ``blackbox -> explainer`` of each spec (registry names, spec dicts or factories), built with the
    keyword arguments ``common`` (e.g. seed) under the spec's own."""
    return {key: (lambda model, spec=spec: build_explainer(spec, model, **common))
            for key, spec in zip(explainer_keys(explainers), explainers)}


def model_randomisation(
    blackbox: nn.Module,
    explainers: Sequence[ExplainerSpec],
    images: Tensor,
    targets: Tensor,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    indices: Tensor | None = None,
) -> list[dict[str, Any]]:
    """Cascading model randomisation of ``explainers`` on one batch, aggregated: :func:`metrics.sanity.
    randomisation_rows` then :func:`metrics.sanity.randomisation_table` (see them for the procedure).

    Args:
        blackbox: a :class:`BlackBox` (its ``.net``'s layers are randomised in a copy; it is not touched).
        explainers: registry names, ``{"name": ..., "alias": ..., **hparams}`` dicts or factories
            ``blackbox -> explainer``. Not built explainers: they are bound to their black box.
        images: (B,3,H,W) in [0,1]. targets: (B,) long. indices: (B,) dataset indices (default 0..B-1).
        fractions: non-decreasing fractions in [0, 1] of layers randomised at each step. seed: of the init.

    Returns:
        One row per (step, explainer): ``{"step", "fraction", "layers", "layer", "explainer", "spearman"``
        (mean over images, NaN ignored), ``"images", "per_image"`` (list of B floats)``}``.
    """
    fractions = check_fractions(fractions)
    indices = torch.arange(len(images), device=images.device) if indices is None else indices
    rows = randomisation_rows(blackbox, explainer_factories(explainers), images, targets, indices, fractions, seed)
    return randomisation_table(rows, explainer_keys(explainers), fractions)


def label_randomisation(
    blackbox: nn.Module,
    shuffled: nn.Module,
    explainers: Sequence[ExplainerSpec],
    images: Tensor,
    targets: Tensor,
    *,
    indices: Tensor | None = None,
) -> list[dict[str, Any]]:
    """Label randomisation: each explainer's maps on ``blackbox`` (trained on the true labels) against its maps on
    ``shuffled`` (the same recipe trained on shuffled labels), by :func:`rank_correlation` of the raw maps.

    Both black boxes explain the same ``targets`` — the classes explained on the trained model — with the same
    hyper-parameters and per-image seeds, so a high correlation means the map does not depend on what the
    model learned from its labels. Neither black box is modified.

    Args:
        blackbox, shuffled: :class:`BlackBox` es with the same classes.
        explainers: as :func:`model_randomisation`.
        images: (B,3,H,W) in [0,1]. targets: (B,) long. indices: (B,) dataset indices (per-image seeds).

    Returns:
        One row per explainer: ``{"explainer", "spearman"`` (mean over images, NaN ignored), ``"per_image"``
        (list of B floats)``}``.
    """
    if int(blackbox.num_classes) != int(shuffled.num_classes):
        raise ValueError(f"the shuffled-label black box has {shuffled.num_classes} classes, the trained one "
                         f"{blackbox.num_classes}")
    specs = dict(zip(explainer_keys(explainers), explainers))
    rows = []
    with autograd_enabled():
        images, targets = images.clone(), targets.clone()
        for key, spec in specs.items():
            trained = build_explainer(spec, blackbox)(images, targets, indices)
            rho = rank_correlation(build_explainer(spec, shuffled)(images, targets, indices), trained)
            rows.append({"explainer": key, "spearman": torch.nanmean(rho).item(), "per_image": rho.tolist()})
    return rows


class ModelRandomisationCheck(ProbeSetCallback):
    """Cascading model randomisation of every explainer on a few probe images, at test (or validation) end.

    Logs ``{prefix}/{val|test}/randomisation/{explainer}/spearman_{ppp}`` — the mean over the probe images
    of the rank correlation after randomising ppp% of the layers (``spearman_000`` is 1 for a
    deterministic method). Each rank checks its share of the probe images; the per-image rows of all ranks
    are gathered and aggregated by :func:`metrics.sanity.randomisation_table`, as in ``evaluate.py``.
    Keeps :attr:`last_results` ({explainer: {fraction: mean}}) and :attr:`last_rows` (the table, with
    per-image values of every rank).

    Args:
        explainers: as :func:`model_randomisation` ("self" is not supported: a trained mask predictor is
            not rebuilt on a randomised black box).
        num_images: the probe set (see :class:`saliency_lab.callbacks.ExplainerEvaluation`); each costs one explanation
            per explainer and step.
        fractions, seed: as :func:`model_randomisation`.
        target: explained class, "predicted" (on the trained black box) or "label".
        stages, every_n_epochs, blackbox_attr, prefix: see :class:`saliency_lab.callbacks.base.ProbeSetCallback`.
    """

    def __init__(
        self,
        explainers: Sequence[ExplainerSpec],
        num_images: int = 4,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        seed: int = 0,
        target: str = "predicted",
        stages: Sequence[str] = ("test",),
        every_n_epochs: int = 1,
        blackbox_attr: str = "blackbox",
        prefix: str | None = None,
    ):
        super().__init__(num_images, every_n_epochs, stages, blackbox_attr, prefix)
        if target not in TARGET_RULES:
            raise ValueError(f"target must be one of {TARGET_RULES}, got {target!r}")
        self.keys = explainer_keys(explainers)
        self.explainers = list(explainers)
        self.fractions = tuple(check_fractions(fractions))
        self.seed = seed
        self.target = target
        self.last_results: dict[str, dict[float, float]] = {}
        self.last_rows: list[dict[str, Any]] = []

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, blackbox: nn.Module,
                 probe: ProbeSet) -> None:
        rows = []
        if len(probe):
            targets = self.explained_classes(blackbox, probe, self.target)
            rows = randomisation_rows(blackbox, explainer_factories(self.explainers), probe.images, targets,
                                      probe.indices, self.fractions, self.seed)
        # Every rank's rows on every rank (a collective: each rank calls it, even with no images), then the
        # aggregation evaluate.py uses: every rank logs the number one process would.
        table = randomisation_table(gather_rows(rows), self.keys, self.fractions)
        results: dict[str, dict[float, float]] = {key: {} for key in self.keys}
        for row in table:
            results[row["explainer"]][row["fraction"]] = row["spearman"]
            pl_module.log(self.name(stage, "randomisation", row["explainer"], f"spearman_{round(row['fraction'] * 100):03d}"),
                          row["spearman"], on_step=False, on_epoch=True, sync_dist=False)
        self.last_results, self.last_rows = results, table


class LabelRandomisationCheck(ProbeSetCallback):
    """Label randomisation of every explainer on a few probe images, at test (or validation) end.

    Logs ``{prefix}/{val|test}/label_randomisation/{explainer}/spearman``: the mean over the probe images of the
    rank correlation between the maps on the module's black box and on ``shuffled_blackbox`` (see
    :func:`label_randomisation`), reduced over ranks. Keeps :attr:`last_results` ({explainer: mean}) and this
    rank's :attr:`last_rows`.

    Args:
        shuffled_blackbox: the black box trained on shuffled labels, as ``BlackBox``'s spec (``"ckpt:PATH"``);
            built on first use, on the module's device.
        explainers, num_images, target: as :class:`ModelRandomisationCheck`.
        stages, every_n_epochs, blackbox_attr, prefix: see :class:`saliency_lab.callbacks.evaluation.ProbeSetCallback`.
    """

    def __init__(
        self,
        shuffled_blackbox: str,
        explainers: Sequence[ExplainerSpec],
        num_images: int = 4,
        target: str = "predicted",
        stages: Sequence[str] = ("test",),
        every_n_epochs: int = 1,
        blackbox_attr: str = "blackbox",
        prefix: str | None = None,
    ):
        super().__init__(num_images, every_n_epochs, stages, blackbox_attr, prefix)
        if target not in TARGET_RULES:
            raise ValueError(f"target must be one of {TARGET_RULES}, got {target!r}")
        self.shuffled_spec = shuffled_blackbox
        self.keys = explainer_keys(explainers)
        self.explainers = list(explainers)
        self.target = target
        self._shuffled: nn.Module | None = None
        self.last_results: dict[str, float] = {}
        self.last_rows: list[dict[str, Any]] = []

    def shuffled(self, device: torch.device) -> nn.Module:
        if self._shuffled is None:
            from saliency_lab.core.blackbox import BlackBox

            self._shuffled = BlackBox(self.shuffled_spec)
        return self._shuffled.to(device)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, blackbox: nn.Module,
                 probe: ProbeSet) -> None:
        rows = []
        if len(probe):
            targets = self.explained_classes(blackbox, probe, self.target)
            rows = label_randomisation(blackbox, self.shuffled(probe.images.device), self.explainers, probe.images,
                                       targets, indices=probe.indices)
        per_image = {row["explainer"]: row["per_image"] for row in rows}
        results = {}
        for key in self.keys:  # every rank walks the same keys: compute() is a collective under DDP
            mean = MeanMetric(nan_strategy="ignore").to(probe.images.device)
            mean.update(torch.tensor(per_image.get(key, [math.nan]), device=probe.images.device))
            results[key] = float(mean.compute())
            pl_module.log(self.name(stage, "label_randomisation", key, "spearman"), results[key], on_step=False,
                          on_epoch=True, sync_dist=False)
        self.last_results, self.last_rows = results, rows
