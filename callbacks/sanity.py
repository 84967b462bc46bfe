"""Sanity checks of saliency methods (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

Model randomisation, cascading: re-initialise the black box's layers from the output down and measure how
much each explainer's maps change (Spearman rank correlation with the maps of the trained model). A
method whose maps survive the loss of the weights explains the image, not the model.

Label randomisation (maps of a classifier trained on shuffled labels must differ) needs a second trained
black box; it is future work here: train one with ``train.py`` on shuffled labels and compare its maps
with :func:`rank_correlation`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch.nn as nn
from torch import Tensor

from callbacks.base import ProbeSetCallback, gather_rows
from callbacks.probe import ProbeSet
from explainers import ExplainerSpec, build_explainer, explainer_keys
from metrics import TARGET_RULES
from metrics.sanity import (  # noqa: F401  (re-exported: the check's parts, for callers of callbacks.sanity)
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
        num_images: the probe set (see :class:`callbacks.ExplainerEvaluation`); each costs one explanation
            per explainer and step.
        fractions, seed: as :func:`model_randomisation`.
        target: explained class, "predicted" (on the trained black box) or "label".
        stages, every_n_epochs, blackbox_attr, prefix: see :class:`callbacks.base.ProbeSetCallback`.
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
