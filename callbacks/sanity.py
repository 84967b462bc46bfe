"""Sanity checks of saliency methods (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

Model randomisation, cascading: re-initialise the black box's layers from the output down and measure how
much each explainer's maps change (Spearman rank correlation with the maps of the trained model). A
method whose maps survive the loss of the weights explains the image, not the model.

Label randomisation: the maps of a classifier trained on shuffled labels must differ from those of the
classifier trained on the true labels (:func:`label_randomisation`, :class:`LabelRandomisationCheck`). The
second black box comes from ``train.py`` with the datamodule's ``shuffle_labels`` option (e.g.
``configs/experiment/embedded_classifier_shuffled.yaml``).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
from torch import Tensor
from torchmetrics.aggregation import MeanMetric
from torchmetrics.functional.regression import spearman_corrcoef

from callbacks.base import ProbeSetCallback, autograd_enabled
from callbacks.probe import ProbeSet
from explainers import ExplainerSpec, build_explainer, explainer_keys
from metrics import TARGET_RULES

DEFAULT_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def parameterised_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every submodule with parameters of its own and a ``reset_parameters()``, in
    registration order — input to output for the timm / torchvision CNNs we wrap.

    Parameters held by modules without ``reset_parameters`` (e.g. a layer-scale gamma) are not
    re-initialised; for the CNNs of this project every parameter lives in a conv, linear or norm layer.
    """
    return [(name, m) for name, m in module.named_modules()
            if callable(getattr(m, "reset_parameters", None)) and next(m.parameters(recurse=False), None) is not None]


def randomise_layers(layers: Sequence[tuple[str, nn.Module]], start: int, stop: int, seed: int) -> None:
    """``reset_parameters()`` of ``layers[start:stop]``; layer i is drawn from seed ``seed + i`` so its new
    weights do not depend on where a cascade step begins. The global RNG state is left as it was."""
    for position in range(start, stop):
        module = layers[position][1]
        device = next(module.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + position)
            module.reset_parameters()


def rank_correlation(maps: Tensor, reference: Tensor) -> Tensor:
    """(B,) Spearman rank correlation between each map (B,1,H,W) and its reference (B,1,H,W), in [-1, 1].

    Ties get their average rank (torchmetrics). A constant map has no ranking: its correlation is NaN
    (torchmetrics would report 0).
    """
    flat, ref = maps.detach().flatten(1).double(), reference.detach().flatten(1).double()
    rho = spearman_corrcoef(flat.T, ref.T).reshape(-1)  # columns are images
    constant = (flat.amax(1) == flat.amin(1)) | (ref.amax(1) == ref.amin(1))
    return rho.float().masked_fill(constant, math.nan)


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
    """Cascading model randomisation: how the maps change as the top layers are re-initialised.

    A deep copy of ``blackbox`` is randomised step by step: at step s the top ``round(fractions[s] * L)``
    of its L parameterised layers (:func:`parameterised_layers`, counted from the output) have been
    re-initialised with their ``reset_parameters()`` (PyTorch's default init, not the architecture's own
    init scheme). After each step every explainer is rebuilt on the copy and explains ``targets`` — the
    classes explained on the trained model, kept fixed — and each map is compared with its map from the
    trained model by :func:`rank_correlation` on the raw maps. ``blackbox`` itself is not touched.

    Args:
        blackbox: a :class:`BlackBox` (its ``.net``'s layers are randomised).
        explainers: registry names, ``{"name": ..., "alias": ..., **hparams}`` dicts or factories
            ``blackbox -> explainer``. Not built explainers: they are bound to their black box.
        images: (B,3,H,W) in [0,1]. targets: (B,) long. indices: (B,) dataset indices (per-image seeds).
        fractions: non-decreasing fractions in [0, 1] of layers randomised at each step.
        seed: of the re-initialisation.

    Returns:
        One row per (step, explainer): ``{"step", "fraction", "layers"`` (number randomised), ``"layer"``
        (the lowest layer randomised so far, "" for none), ``"explainer", "spearman"`` (mean over images,
        NaN ignored), ``"per_image"`` (list of B floats)``}``.
    """
    if any(not 0 <= f <= 1 for f in fractions) or list(fractions) != sorted(fractions):
        raise ValueError(f"fractions must be non-decreasing values in [0, 1], got {list(fractions)}")
    specs = dict(zip(explainer_keys(explainers), explainers))
    with autograd_enabled():  # deep copies made under inference mode would be unusable by autograd
        model = copy.deepcopy(blackbox)
        images, targets = images.clone(), targets.clone()
        layers = parameterised_layers(getattr(model, "net", model))[::-1]  # top (output) layer first
        original = {key: build_explainer(spec, model)(images, targets, indices) for key, spec in specs.items()}
        rows, randomised = [], 0
        for step, fraction in enumerate(fractions):
            count = round(fraction * len(layers))
            randomise_layers(layers, randomised, count, seed)
            randomised = count
            for key, spec in specs.items():
                maps = build_explainer(spec, model)(images, targets, indices) if count else original[key]
                rho = rank_correlation(maps, original[key])
                rows.append({"step": step, "fraction": float(fraction), "layers": count,
                             "layer": layers[count - 1][0] if count else "", "explainer": key,
                             "spearman": torch.nanmean(rho).item(), "per_image": rho.tolist()})
    return rows


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
    deterministic method). Means are reduced over ranks (each rank checks its share of the probe images).
    Keeps :attr:`last_results` ({explainer: {fraction: mean}}) and this rank's :attr:`last_rows` (the rows
    of :func:`model_randomisation`, with per-image values).

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
        self.fractions = tuple(float(f) for f in fractions)
        self.seed = seed
        self.target = target
        self.last_results: dict[str, dict[float, float]] = {}
        self.last_rows: list[dict[str, Any]] = []

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, blackbox: nn.Module,
                 probe: ProbeSet) -> None:
        rows = []
        if len(probe):
            targets = self.explained_classes(blackbox, probe, self.target)
            rows = model_randomisation(blackbox, self.explainers, probe.images, targets, fractions=self.fractions,
                                       seed=self.seed, indices=probe.indices)
        per_image = {(row["explainer"], row["step"]): row["per_image"] for row in rows}
        results: dict[str, dict[float, float]] = {}
        # Every rank walks the same (explainer, step) grid: compute() is a collective under DDP.
        for key in self.keys:
            results[key] = {}
            for step, fraction in enumerate(self.fractions):
                mean = MeanMetric(nan_strategy="ignore").to(probe.images.device)
                mean.update(torch.tensor(per_image.get((key, step), [math.nan]), device=probe.images.device))
                results[key][fraction] = float(mean.compute())
                pl_module.log(self.name(stage, "randomisation", key, f"spearman_{round(fraction * 100):03d}"),
                              results[key][fraction], on_step=False, on_epoch=True, sync_dist=False)
        self.last_results, self.last_rows = results, rows


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
        stages, every_n_epochs, blackbox_attr, prefix: see :class:`callbacks.evaluation.ProbeSetCallback`.
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
            from core.blackbox import BlackBox

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
